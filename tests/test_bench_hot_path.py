"""The daemon's fast paths that `lstmd bench` drove in (issue 7) keep every per-event check."""

from __future__ import annotations

import numpy as np
from lstmd.clients import Producer, protocol


def test_string_int_and_bad_ids_in_one_message(make_daemon):
    daemon = make_daemon(serve__max_stream_id_length=5)
    with Producer(daemon.endpoints["events"]) as producer:
        streams = ["a", 7, "", "toolong", "b", 8]
        result = producer.send_detailed(streams, np.zeros((6, 8), dtype=np.float32))
    assert result.status.tolist() == [0, 0, 3, 3, 0, 0]
    assert result.reasons == {
        2: "stream id is empty",
        3: "stream id of 7 characters exceeds the limit of 5",
    }
    assert np.isfinite(result.predictions[[0, 1, 4, 5]]).all()


def test_int_ids_and_repeated_streams_in_one_batch_keep_order(make_daemon):
    daemon = make_daemon()
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        together = producer.send([1, 2, 1, 1, 2, 3], x)
    fresh = make_daemon()
    with Producer(fresh.endpoints["events"]) as producer:
        one_by_one = np.concatenate([producer.send([s], x[i : i + 1]) for i, s in enumerate([1, 2, 1, 1, 2, 3])])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    assert protocol.STATUS_NAMES[0] == "ok"
