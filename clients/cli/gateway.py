"""`lstmd gateway`: the cluster's stateless ZeroMQ front (daemon/cluster/gateway.py); no torch needed."""

from __future__ import annotations

import signal

from lstmd.clients.cli._common import ConfigOpt, SetOpt, fail, load_config_or_exit
from lstmd.clients.cli.serve import LogLevel, LogLevelOpt, _setup_logging


def gateway(config: ConfigOpt = None, set_: SetOpt = None, log_level: LogLevelOpt = LogLevel.info) -> None:
    """Serve the events protocol on [serve] events and forward to the cluster named by [cluster] nats."""
    _setup_logging(log_level)
    cfg = load_config_or_exit(config, set_)
    if not cfg.cluster.nats:
        raise fail("lstmd gateway needs [cluster] nats: the URL of the cluster's NATS server")
    from lstmd.daemon.auth import AuthError
    from lstmd.daemon.cluster.gateway import Gateway
    from lstmd.daemon.cluster.log import ClusterError
    from lstmd.daemon.io import BindError

    gw = Gateway(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: gw.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: gw.reload_keys())  # as `lstmd serve`: re-read the client keys
    try:
        gw.start()
    except (ClusterError, AuthError, BindError) as exc:
        raise fail(str(exc)) from None
    gw.serve_forever()
