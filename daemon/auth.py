"""Who may talk to the daemon: CurveZMQ on every socket, the ZAP handler, key roles and their reload.

With `[security] server_secret_key` set, `Security.secure` makes each socket (events, control, publish) a CURVE
server before it binds: traffic is encrypted, and libzmq asks the ZAP handler about every client's public key
during the handshake. The handler (pyzmq's `ThreadAuthenticator`, on its own thread) accepts a key found in
`producer_keys_dir` or `admin_keys_dir` and names its role in the ZAP User-Id; libzmq attaches that to every
frame the client sends (frame property "User-Id"), so the control path knows the role of each request without
any state of its own. An unknown key is refused in the handshake: the client never gets a byte through.

Roles: a producer key may send events, subscribe to predictions and run the control commands in
`PRODUCER_COMMANDS` (read-only: health, the model's shape, and forecasts, which the events socket gives a
producer anyway); an admin key may do all
of that and run every command. Refusals are counted in `lstmd_auth_failures_total{reason}`: `unknown_key`
(ZAP), `wrong_role` (a producer key asked for an admin command), and from socket monitors on the same thread
as the counting, handshakes that never reach ZAP: `no_curve` (a plain client on a CURVE socket) and
`bad_handshake` (a client that used the wrong server public key, or garbage).

Key directories are re-read by `Security.reload` (`lstmd keys reload`, or SIGHUP): a key added is let in from
its next connection; a key removed is refused from its next connection (libzmq authenticates at connect, so a
connection already up stays up until it drops: restart the daemon to cut one off at once).

Also here: which bind addresses need security (`insecure_endpoints`): anything but loopback, ipc and inproc.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from lstmd.clients.curve import CurveKeyError, load_key
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("lstmd.auth")

PRODUCER, ADMIN = "producer", "admin"
# The only control commands a producer key may run (forecast: read-only, predictions a producer may already
# subscribe to). Everything else changes state (reset, drop, import,
# rollback, train, snapshot, shutdown, keys_reload) or reveals it (streams and their hidden state, the
# config with its paths, the exported weights, the version history): admin keys only.
PRODUCER_COMMANDS = frozenset({"status", "model_info", "train_status", "forecast"})
ZAP_DOMAIN = "lstmd"

# Handshake failures libzmq reports on a socket monitor before ZAP is asked (so ZAP never counts them).
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no_curve",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "bad_handshake",
}


class AuthError(RuntimeError):
    """The security configuration cannot be used (a key file or directory); the message says which."""


def is_local(endpoint: str) -> bool:
    """True for endpoints no other host can reach: ipc://, inproc://, tcp:// on a loopback address."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # `*`, an interface name or a host name: assume reachable
        return False


def insecure_endpoints(endpoints: dict[str, str]) -> list[str]:
    """The `name endpoint` pairs that other hosts could reach."""
    return [f"{name} {endpoint}" for name, endpoint in endpoints.items() if endpoint and not is_local(endpoint)]


def load_roles(producer_dir: str, admin_dir: str) -> dict[bytes, str]:
    """Z85 public key → role, from the `*.key` files of both directories (a key in both is an admin)."""
    roles: dict[bytes, str] = {}
    for role, directory in ((PRODUCER, producer_dir), (ADMIN, admin_dir)):
        if not directory:
            continue
        if not Path(directory).is_dir():
            raise AuthError(f"security.{role}_keys_dir {directory} is not a directory")
        try:
            keys = zmq.auth.load_certificates(directory)
        except (OSError, ValueError) as exc:
            raise AuthError(f"security.{role}_keys_dir {directory}: {exc}") from None
        roles.update(dict.fromkeys(keys, role))
    return roles


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, asking `Security` about each key and answering the key's role as the User-Id."""

    def __init__(self, context: zmq.Context, security: Security) -> None:
        super().__init__(context, log=logging.getLogger("lstmd.auth.zap"))
        self.security = security

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called only after the key was accepted; a reload in between that removed it leaves the weakest role.
        return self.security.role_of(z85.encode(client_public_key)) or PRODUCER


class Security:
    """The server's CURVE keys, the client keys by role, the ZAP thread and the handshake monitor."""

    def __init__(self, config, on_failure, clock=time.monotonic) -> None:
        """config: the `[security]` section; on_failure(reason): count one refusal (any thread); clock: for the
        log's rate limit."""
        self.config = config
        self.on_failure = on_failure
        self._clock = clock
        try:
            self.public, self.secret = load_key(
                config.server_secret_key, secret=True, what="security.server_secret_key"
            )
        except CurveKeyError as exc:
            raise AuthError(str(exc)) from None
        self._roles = load_roles(config.producer_keys_dir, config.admin_keys_dir)
        self._reload_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self._stop = threading.Event()
        self._monitors: list[zmq.Socket] = []
        self._authenticator: _Authenticator | None = None
        self._monitor_thread: threading.Thread | None = None
        self._last_logged: dict[str, float] = {}  # reason -> monotonic time of its last log line
        self._unlogged: dict[str, int] = {}  # reason -> refusals counted since then, not logged

    # ---- keys --------------------------------------------------------------------------------------------

    def role_of(self, z85_key: bytes) -> str | None:
        return self._roles.get(z85_key)

    def counts(self) -> dict[str, int]:
        roles = list(self._roles.values())
        return {"producer_keys": roles.count(PRODUCER), "admin_keys": roles.count(ADMIN)}

    def reload(self) -> dict[str, int]:
        """Re-read both key directories; on an error the keys in use stay and AuthError says why."""
        with self._reload_lock:
            self._roles = load_roles(self.config.producer_keys_dir, self.config.admin_keys_dir)
        counts = self.counts()
        log.info("client keys reloaded: %d producer, %d admin", counts["producer_keys"], counts["admin_keys"])
        return counts

    def request_reload(self) -> None:
        """Safe from a signal handler: the monitor thread reloads within its poll interval."""
        self._reload_requested.set()

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP's question (pyzmq's credentials-provider interface), on the ZAP thread: is this key known?"""
        if z85_key in self._roles:
            return True
        self._refused("unknown_key", f"a connection with an unknown CURVE key {z85_key.decode()}")
        return False

    def _refused(self, reason: str, what: str) -> None:
        """Count a refusal; log it, at most one line per reason and second (anyone can knock, as often as they
        like: the counter takes every one, the log a sample with how many it left out)."""
        self.on_failure(reason)
        now = self._clock()
        if now - self._last_logged.get(reason, -1.0) < 1.0:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        more = self._unlogged.pop(reason, 0)
        log.warning("refused %s%s", what, f" (and {more} more {reason} since the last such line)" if more else "")

    def refusal(self, role: str | None, cmd: str) -> str | None:
        """Why a control request from a client of `role` may not run `cmd`, or None when it may."""
        if role == ADMIN or cmd in PRODUCER_COMMANDS:
            return None
        self._refused("wrong_role", f"command {cmd!r} from a {role or 'unknown'} key")
        return f"command {cmd!r} needs an admin key (this client's key is a {role or 'unknown'} key)"

    # ---- sockets -----------------------------------------------------------------------------------------

    def start(self, context: zmq.Context) -> None:
        """Bind the ZAP handler (before any socket binds: see `secure`) and start the monitor thread."""
        self._authenticator = _Authenticator(context, self)
        self._authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
        self._authenticator.start()
        self._monitor_thread = threading.Thread(target=self._watch, name="lstmd-auth", daemon=True)
        self._monitor_thread.start()

    def secure(self, sock: zmq.Socket, what: str, monitor: bool = True) -> None:
        """Make `sock` a CURVE server authenticated through ZAP; call before it binds, on the thread creating it.
        `monitor`: watch its handshakes here; False for a socket whose own monitor calls handshake_failed()."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = ZAP_DOMAIN.encode()
        # Fail closed: without a ZAP handler libzmq would otherwise let every CURVE client in.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        if monitor:  # libzmq allows one monitor per socket: a socket that has its own passes its events on
            self._monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL))

    def handshake_failed(self, event: dict) -> None:
        """Count a handshake that failed before ZAP was asked (a socket monitor's parsed event)."""
        reason = _PROTOCOL_REASONS.get(event["value"], "bad_handshake")
        endpoint = event["endpoint"]
        where = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)
        self._refused(reason, f"a connection on {where}: {reason}")

    def stop(self) -> None:
        """Stop both threads and close their sockets (before the context terminates; after the sockets closed)."""
        self._stop.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(5)
        if self._authenticator is not None:
            self._authenticator.stop()

    def _watch(self) -> None:
        """Count handshakes that fail before ZAP; run requested reloads. Owns the monitor sockets."""
        try:
            while not self._stop.is_set():
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    try:
                        self.reload()
                    except AuthError as exc:
                        log.error("key reload failed, the keys in use stay: %s", exc)
                monitors = list(self._monitors)  # `secure` adds to it while the sockets are created
                if not monitors:
                    self._stop.wait(0.2)
                    continue
                poller = zmq.Poller()
                for monitor in monitors:
                    poller.register(monitor, zmq.POLLIN)
                for monitor, _ in poller.poll(200):
                    event = recv_monitor_message(monitor)
                    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                        self.handshake_failed(event)
        finally:
            for monitor in self._monitors:
                monitor.close(linger=0)
