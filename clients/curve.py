"""The client side of CurveZMQ: make a socket authenticate to a daemon that runs with `[security]` keys.

One function, `apply_client_curve`, used by every client (`Producer`, `Admin`, `Subscriber`, the CLI) on each
socket before it connects. Keys are ZeroMQ certificate files as `lstmd keys generate` writes them (`NAME.key`
public, `NAME.key_secret` secret), read with pyzmq's `zmq.auth.load_certificate`. Imports only pyzmq.
"""

from __future__ import annotations

import struct
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

# Appended to a client's timeout message when it used keys: a refused key looks like silence to the client
# (libzmq drops the connection during the handshake and retries), so say what else the silence can mean.
TIMEOUT_HINT = (
    "; with CURVE keys, silence also means the daemon refused this client: check that its public key is in "
    "the daemon's producer or admin keys directory (then `lstmd keys reload`) and that the server key is the "
    "daemon's public key (refusals are counted in lstmd_auth_failures_total)"
)


class CurveKeyError(ValueError):
    """A key file is missing, unreadable, or not the kind of key it was given as."""


def load_key(path: str | Path, secret: bool, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret) of the certificate at `path`; `secret=True` requires the secret half (NAME.key_secret)."""
    if not Path(path).is_file():
        raise CurveKeyError(f"{what} {path} does not exist (create keys with `lstmd keys generate DIR --name NAME`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise CurveKeyError(f"{what} {path}: {exc.strerror or exc}") from None
    except ValueError:  # pyzmq: no public-key line in the file
        raise CurveKeyError(f"{what} {path} is not a ZeroMQ certificate file (no public-key line)") from None
    if secret and secret_key is None:
        raise CurveKeyError(
            f"{what} {path} holds only a public key: give the secret certificate (NAME.key_secret)"
        )
    for key in (public, secret_key):
        if key is not None and not _is_z85_key(key):
            raise CurveKeyError(f"{what} {path} does not hold a valid CURVE key (40 Z85 characters)")
    return public, secret_key


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, struct.error):  # KeyError: not a Z85 character; struct.error: out of range
        return False


def apply_client_curve(socket: zmq.Socket, server_key: str | Path | None, client_key: str | Path | None) -> None:
    """Make `socket` a CURVE client of the daemon whose public certificate is `server_key`, authenticating with
    the secret certificate `client_key`. Both None (or empty): leave the socket plain. Call before connect()."""
    if not server_key and not client_key:
        return
    if not server_key or not client_key:
        given, missing = ("server_key", "client_key") if server_key else ("client_key", "server_key")
        raise CurveKeyError(
            f"{given} is set but {missing} is not: a CURVE client needs the daemon's public key (server_key) "
            "and its own secret key (client_key)"
        )
    if not zmq.has("curve"):
        raise CurveKeyError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE security")
    server_public, _ = load_key(server_key, secret=False, what="server key")
    public, secret = load_key(client_key, secret=True, what="client key")
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret
