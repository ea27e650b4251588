"""lstmd.clients: the producer library, the admin client and the `lstmd` command line.

`Producer`, `Admin`, `Subscriber` and the wire protocol import without torch or triton (pyzmq, numpy, msgspec
only).
"""

from lstmd.clients.admin import Admin, DaemonError
from lstmd.clients.producer import PredictionUnavailableError, Producer, RejectedError, SendResult
from lstmd.clients.subscriber import Prediction, Subscriber

__all__ = [
    "Admin",
    "DaemonError",
    "Prediction",
    "PredictionUnavailableError",
    "Producer",
    "RejectedError",
    "SendResult",
    "Subscriber",
]
