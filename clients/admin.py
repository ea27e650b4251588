"""Admin: control calls on a running daemon, mirroring the `lstmd` command line. Returns plain dicts/lists.

Imports only pyzmq and msgspec (through the protocol module).
"""

from __future__ import annotations

import base64
import io
import time
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import zmq
from lstmd.clients import protocol
from lstmd.clients.curve import TIMEOUT_HINT, apply_client_curve


class DaemonError(RuntimeError):
    """The daemon answered the command with an error; the message is the daemon's."""


class NoDaemonError(TimeoutError):
    """Nothing accepted the connection within connect_timeout: no daemon listens at that endpoint."""


class Admin:
    """Control calls on the daemon at `endpoint` (its serve.control).

    `connect_timeout`: seconds to wait for the daemon to accept the connection; nothing listening fails then
    (NoDaemonError). Default: 3 s, or `timeout` when that is shorter.
    `timeout`: seconds a connected daemon has to answer one command (a snapshot of many streams takes a while).
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float = 30.0,
        context: zmq.Context | None = None,
        connect_timeout: float | None = None,
        server_key: str | None = None,  # the daemon's public certificate file (CURVE; lstmd.clients.curve)
        client_key: str | None = None,  # this client's secret certificate file (an admin key for most commands)
    ) -> None:
        self.endpoint = endpoint
        self.server_key, self.client_key = server_key, client_key
        self.timeout_ms = int(timeout * 1000)
        self.connect_timeout_ms = int((min(timeout, 3.0) if connect_timeout is None else connect_timeout) * 1000)
        self._ctx = context or zmq.Context.instance()

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one control command; raise DaemonError with the daemon's message if it fails."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Writable only once a connection (with its ZeroMQ handshake, CURVE included) is up, so "nothing listens
        # there" or "the daemon refused this key" shows after connect_timeout instead of as a command that never
        # gets an answer.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # A DEALER whose peer went away waits in send: with CURVE, a daemon that refused the key drops it for good.
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        # The raw connection, seen apart from the handshake: "nothing listens" and "something listens but does
        # not speak lstmd's control protocol (or wants other CURVE keys)" call for different fixes.
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        keys_hint = TIMEOUT_HINT if self.server_key or self.client_key else ""
        try:
            apply_client_curve(sock, self.server_key, self.client_key)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(
                    f"cannot connect to {self.endpoint!r} ({exc}): an endpoint looks like tcp://127.0.0.1:5556"
                ) from None
            if not sock.poll(self.connect_timeout_ms, zmq.POLLOUT):
                waited = f"{self.connect_timeout_ms / 1000:g} s"
                if monitor.poll(0):
                    raise NoDaemonError(
                        f"something at {self.endpoint} accepted the connection, but no lstmd control handshake "
                        f"followed within {waited}: is it the daemon's control endpoint (serve.control), and, "
                        "with CURVE security, do the keys match?" + keys_hint
                    )
                raise NoDaemonError(
                    f"no daemon answered at {self.endpoint} within {waited}: is `lstmd serve` running? "
                    "(Control commands go to its serve.control endpoint.)" + keys_hint
                )
            try:
                sock.send(protocol.encode(protocol.ControlRequest(v=protocol.PROTOCOL_VERSION, cmd=cmd, args=args)))
            except zmq.Again:  # the connection went away between the poll and the send
                raise TimeoutError(
                    f"the connection to {self.endpoint} was lost before `{cmd}` was sent" + keys_hint
                ) from None
            if not sock.poll(self.timeout_ms, zmq.POLLIN):
                raise TimeoutError(
                    f"the daemon at {self.endpoint} accepted the connection but did not answer `{cmd}` within "
                    f"{self.timeout_ms / 1000:g} s: it may be busy (a long snapshot) or stuck; its /healthz "
                    "(serve.metrics) says whether the serving loop still runs"
                )
            data = sock.recv()
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        try:
            reply = protocol.control_reply_decoder.decode(data)
        except msgspec.MsgspecError:
            raise DaemonError(
                f"{self.endpoint} answered, but not as an lstmd control socket: is it another endpoint (events, "
                "publish)? Control commands go to serve.control"
            ) from None
        if not reply.ok:
            raise DaemonError(reply.error)
        return reply.result

    def status(self) -> dict:
        return self.call("status")

    def streams(self, limit: int = 100) -> list[dict]:
        return self.call("streams", limit=limit)

    def stream(self, stream_id) -> dict:
        return self.call("stream", stream=stream_id)

    def reset(self, stream_id) -> dict:
        return self.call("reset", stream=stream_id)

    def drop(self, stream_id) -> dict:
        return self.call("drop", stream=stream_id)

    def forecast(self, stream, horizon: int) -> list[list[float]]:
        """The next `horizon` predictions of one forecast stream, [horizon][O], each fed back as the next event
        (daemon/forecast.py); the stream itself is not changed. Raises DaemonError for an unknown stream."""
        result = self.call("forecast", streams=[stream], horizon=int(horizon))
        if result["errors"]:
            raise DaemonError(result["errors"]["0"])
        return result["forecasts"][0]

    def model_info(self) -> dict:
        return self.call("model_info")

    def export_model(self, path: str | Path) -> dict:
        """Write the serving model to `path` (safetensors); returns its version and path."""
        result = self.call("export_model")
        Path(path).write_bytes(base64.b64decode(result["safetensors_b64"]))
        return {"version": result["version"], "path": str(path)}

    def import_model(self, path: str | Path) -> dict:
        """Serve the model in `path`: safetensors (torch.nn.LSTM + nn.Linear names), or a Keras `.keras` / `.h5`
        file, which the daemon converts exactly or refuses (docs/models.md); returns the new version."""
        data = Path(path).read_bytes()
        key = "keras_b64" if is_keras_file(data) else "safetensors_b64"
        return self.call("import_model", **{key: base64.b64encode(data).decode()})

    def config(self) -> dict:
        return self.call("config")

    def snapshot(self) -> dict:
        return self.call("snapshot")

    def train_now(self, wait: float = 0.0) -> dict:
        """Start a training round now. With wait > 0, poll until it finished and return train_status()."""
        started = self.call("train_now")
        if wait <= 0:
            return started
        deadline = time.monotonic() + wait
        while True:
            status = self.train_status()
            last = status.get("last_round") or {}
            if status["rounds"] >= started["round"] and not last.get("pending"):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"training round {started['round']} did not finish within {wait:g}s")
            time.sleep(0.05)

    def train_status(self) -> dict:
        return self.call("train_status")

    def train_pause(self) -> dict:
        return self.call("train_pause")

    def train_resume(self) -> dict:
        return self.call("train_resume")

    def model_versions(self) -> list[dict]:
        """Kept model versions, newest first."""
        return self.call("model_versions")

    def rollback(self, version: int | None = None) -> dict:
        """Serve an earlier version's weights again (default: the version before the current one)."""
        return self.call("model_rollback", **({} if version is None else {"version": int(version)}))

    def shutdown(self) -> dict:
        return self.call("shutdown")

    def reload_keys(self) -> dict:
        """Re-read the daemon's producer and admin key directories (CURVE); returns how many keys of each."""
        return self.call("keys_reload")

def is_keras_file(data: bytes) -> bool:
    """Whether `data` is a Keras model file: a legacy .h5 (HDF5 signature) or a Keras 3 .keras archive (a zip
    holding config.json). Another zip (a torch .pt) or a safetensors file (it starts with its header's length)
    is not. Here, not in the daemon's converter, so the client needs neither torch nor h5py to choose."""
    if data.startswith(b"\x89HDF\r\n\x1a\n"):
        return True
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "config.json" in archive.namelist()
    except zipfile.BadZipFile:
        return False
