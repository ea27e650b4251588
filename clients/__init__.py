"""lstmd.clients: the producer library, the admin client and the `lstmd` command line.

`Producer`, `Admin` and the wire protocol import without torch or triton (pyzmq, numpy, msgspec only).
"""

from lstmd.clients.admin import Admin, DaemonError
from lstmd.clients.producer import PredictionUnavailableError, Producer, RejectedError, SendResult

__all__ = ["Admin", "DaemonError", "PredictionUnavailableError", "Producer", "RejectedError", "SendResult"]
