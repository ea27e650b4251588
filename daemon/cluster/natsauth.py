"""The NATS connection's own security, from `[cluster]`: what `NatsLink` passes to nats-py's connect.

NATS authenticates clients itself (docs.nats.io, "Authentication"); a cluster member or gateway uses the same
options any NATS client does, so the server's configuration is the one place that decides who may publish to
the log or claim key groups:
- `user` + `password` (the server's `--user/--pass` or `authorization { users }`), or `token` (`--auth`),
  or `creds` (a JWT + nkey credentials file made by `nsc`, for decentralized auth), or `nkey_seed` (a file
  holding the client's nkey seed): at most one of the four, checked here so a mix is a clear error at start
  instead of whichever nats-py happens to prefer. `creds` and `nkey_seed` sign the server's nonce with the
  `nkeys` package (the `cluster` extra declares it).
- TLS: `tls_ca` verifies the server's certificate against that CA (else the system's CAs, when the server
  requires TLS or the URL is `tls://`); `tls_cert` + `tls_key` present a client certificate to a server that
  verifies clients (`verify: true`).
Every file is checked before connecting, and the message names the key whose file is wrong.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from lstmd.daemon.cluster.log import ClusterError

_FILE_KEYS = ("creds", "nkey_seed", "tls_ca", "tls_cert", "tls_key")


def _readable(key: str, path: str) -> str:
    if not Path(path).is_file():
        raise ClusterError(f"cluster.{key} = {path}: no such file")
    return path


def connect_options(cluster) -> dict:
    """nats.connect keyword arguments for `cluster` (the `[cluster]` section); ClusterError says what is wrong."""
    methods = [name for name, on in (("user/password", cluster.user or cluster.password), ("token", cluster.token),
                                     ("creds", cluster.creds), ("nkey_seed", cluster.nkey_seed)) if on]
    if len(methods) > 1:
        raise ClusterError(f"cluster: set one NATS auth method, not {' and '.join(methods)}")
    for key in _FILE_KEYS:
        if getattr(cluster, key):
            _readable(key, getattr(cluster, key))
    options: dict = {}
    if cluster.password and not cluster.user:
        raise ClusterError("cluster.password is set without cluster.user")
    if cluster.user:
        options |= {"user": cluster.user, "password": cluster.password}
    if cluster.token:
        options["token"] = cluster.token
    if cluster.creds or cluster.nkey_seed:
        try:
            import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
        except ImportError:
            raise ClusterError("cluster.creds / cluster.nkey_seed need the nkeys package: pip install "
                               "'lstmd[cluster]'") from None
        if cluster.creds:
            options["user_credentials"] = cluster.creds
        else:
            options["nkeys_seed"] = cluster.nkey_seed
    tls = _tls_context(cluster)
    if tls is not None:
        options["tls"] = tls
    return options


def _tls_context(cluster) -> ssl.SSLContext | None:
    if bool(cluster.tls_cert) != bool(cluster.tls_key):
        raise ClusterError("cluster.tls_cert and cluster.tls_key go together (the client certificate and its key)")
    if not (cluster.tls_ca or cluster.tls_cert):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cluster.tls_ca or None)
        if cluster.tls_cert:
            context.load_cert_chain(cluster.tls_cert, cluster.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ClusterError(f"cluster TLS files (tls_ca, tls_cert, tls_key) cannot be used: {exc}") from None
    return context
