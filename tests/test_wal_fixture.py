"""Old WAL files still replay: tests/data/wal_v1 (a snapshot + log written by lstmd before the WAL codec moved
into daemon/wal_records.py; tests/data/make_wal_fixture.py made it) restores to exactly the states it held."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from lstmd.clients import Admin

FIXTURE = Path(__file__).parent / "data" / "wal_v1"
SETTINGS = json.loads((FIXTURE / "settings.json").read_text())
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.mark.parametrize("from_snapshot", [2, 1], ids=["newest-snapshot", "older-snapshot-and-both-segments"])
def test_a_log_written_before_the_codec_move_replays_exactly(make_daemon, tmp_path, from_snapshot):
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    if from_snapshot == 1:  # replay every record kind of both segments on top of the first snapshot
        (state / "snapshot-000000000002.safetensors").unlink()
    daemon = make_daemon(state_dir=state, **SETTINGS)
    restored = daemon.status()["durability"]["restored"]
    assert restored["records"] == (12 if from_snapshot == 2 else 15)
    admin = Admin(daemon.endpoints["control"])
    got = {str(row["stream"]): admin.stream(row["stream"]) for row in admin.streams(limit=100)}
    assert set(got) == set(EXPECTED)
    assert admin.train_status()["paused"] is True  # the logged `train pause`
    for sid, want in EXPECTED.items():
        assert (got[sid]["events"], got[sid]["last_seq"]) == (want["events"], want["last_seq"]), sid
        np.testing.assert_allclose(got[sid]["h"], want["h"], rtol=0, atol=1e-6, err_msg=sid)
        np.testing.assert_allclose(got[sid]["c"], want["c"], rtol=0, atol=1e-6, err_msg=sid)
