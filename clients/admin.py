"""Admin: control calls on a running daemon, mirroring the `lstmd` command line. Returns plain dicts/lists.

Imports only pyzmq and msgspec (through the protocol module).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import zmq
from lstmd.clients import protocol
from lstmd.clients.curve import TIMEOUT_HINT, apply_client_curve


class DaemonError(RuntimeError):
    """The daemon answered the command with an error; the message is the daemon's."""


class Admin:
    def __init__(
        self,
        endpoint: str,
        timeout: float = 30.0,
        context: zmq.Context | None = None,
        server_key: str | None = None,  # the daemon's public certificate file (CURVE; lstmd.clients.curve)
        client_key: str | None = None,  # this client's secret certificate file (an admin key for most commands)
    ) -> None:
        self.endpoint = endpoint
        self.server_key, self.client_key = server_key, client_key
        self.timeout_ms = int(timeout * 1000)
        self._ctx = context or zmq.Context.instance()

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one control command; raise DaemonError with the daemon's message if it fails."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A DEALER without a peer waits in send: with CURVE, a daemon that refused the key drops it for good.
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        try:
            apply_client_curve(sock, self.server_key, self.client_key)
            sock.connect(self.endpoint)
            request = protocol.encode(protocol.ControlRequest(v=protocol.PROTOCOL_VERSION, cmd=cmd, args=args))
            try:
                sock.send(request)
                answered = sock.poll(self.timeout_ms, zmq.POLLIN)
            except zmq.Again:
                answered = False
            if not answered:
                waited = self.timeout_ms / 1000
                raise TimeoutError(
                    f"no reply from lstmd at {self.endpoint} within {waited:g}s: is `lstmd serve` running?"
                    + (TIMEOUT_HINT if self.server_key or self.client_key else "")
                )
            reply = protocol.control_reply_decoder.decode(sock.recv())
        finally:
            sock.close(linger=0)
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

    def model_info(self) -> dict:
        return self.call("model_info")

    def export_model(self, path: str | Path) -> dict:
        """Write the serving model to `path` (safetensors); returns its version and path."""
        result = self.call("export_model")
        Path(path).write_bytes(base64.b64decode(result["safetensors_b64"]))
        return {"version": result["version"], "path": str(path)}

    def import_model(self, path: str | Path) -> dict:
        """Serve the model in `path` (safetensors, torch.nn.LSTM + nn.Linear names); returns the new version."""
        data = Path(path).read_bytes()
        return self.call("import_model", safetensors_b64=base64.b64encode(data).decode())

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
