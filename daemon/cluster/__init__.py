"""Cluster mode on NATS JetStream: streams sharded over replicas by key group, the log as the source of truth.

Modules: `log` (key groups, the JetStream names and records, the NATS connection on its own thread),
`gateway` (the stateless ZeroMQ front, `lstmd gateway`), `replica` (the events source of a `lstmd serve` with
`[cluster] nats` set), `membership` and `ownership` (who owns which key group), `weights` (one model version
across the cluster: the version table, markers in the log, weight deltas and the averager). Nothing here is
imported in single-process mode; nats-py is needed only here.
"""
