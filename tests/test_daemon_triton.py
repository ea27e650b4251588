"""The daemon's Triton path end to end on the CPU, through Triton's interpreter: serve with
`serve.backend = "triton"`, compare every prediction with torch.nn.LSTM + nn.Linear over each stream's events,
then run one training round (the Triton sequence kernels forward and backward) and keep serving.

Tolerance: the kernels accumulate in another order than torch's CPU GEMMs; <= 1e-4 relative, as tests/test_kernels.py
states for the interpreter and for compiled CUDA with TF32 off. The cuda case is what scripts/gpu-check runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.kernels import _checks
from lstmd.kernels.backends import Backends, select_backends

_interp = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _checks.interpreter_active(), reason="TRITON_INTERPRET unset (a GPU runs the cuda case)"),
]
_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def test_backend_choice_follows_the_setting_and_the_device():
    cpu = torch.device("cpu")
    assert select_backends("auto", cpu) == Backends(step="cpu", sequence="torch-native")
    assert select_backends("torch", cpu) == Backends(step="torch", sequence="torch")
    if _checks.interpreter_active():
        assert select_backends("triton", cpu) == Backends(step="triton", sequence="triton")
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            select_backends("triton", cpu)
    assert select_backends("auto", torch.device("cuda", 0)) == Backends(step="triton", sequence="triton")
    # past the Triton kernels' H limit: auto serves through the reference kernels, an explicit triton is refused
    cuda = torch.device("cuda", 0)
    assert select_backends("auto", cuda, hidden_size=512) == Backends(step="triton", sequence="triton")
    assert select_backends("auto", cuda, hidden_size=513) == Backends(step="torch", sequence="torch")
    with pytest.raises(ValueError, match="hidden_size = 600 is past the Triton kernels' limit of 512"):
        select_backends("triton", cuda, hidden_size=600)
    assert select_backends("auto", cpu).kernel is None and select_backends("torch", cpu).kernel == "torch"
    with pytest.raises(ValueError, match="serve.backend"):
        select_backends("cudnn", cpu)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="interpreter", marks=_interp),
    pytest.param("cuda", id="cuda", marks=_cuda),
])
def test_triton_backend_serves_nn_lstm_predictions_and_trains(make_daemon, tmp_path, monkeypatch, device):
    n_in, H, L, n_out = 5, 20, 2, 3
    if device == "cuda":  # compare without TF32 in the kernels' products (tests/test_kernels.py does the same);
        from lstmd.kernels import triton_lstm  # before the daemon: it captures its CUDA graphs as it starts

        monkeypatch.setattr(triton_lstm, "ALLOW_TF32", False)
    daemon = make_daemon(**{
        "serve.backend": "triton", "serve.device": device,
        "model.input_size": n_in, "model.hidden_size": H, "model.num_layers": L,
        "model.output_size": n_out, "model.task": "regression", "train.enabled": True, "train.interval": 0.0,
        "train.k2": 4, "train.record_steps": 16, "train.holdout_windows": 1, "train.batch": 8, "train.steps": 3,
        "train.min_windows": 1,
    })
    assert daemon.engine.backend_name == "triton" and daemon.device.type == device
    admin = Admin(daemon.endpoints["control"])
    rng = np.random.default_rng(7)
    ids = [f"s{i}" for i in range(37)]
    events: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    served: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(8):  # 8 messages of 37 events: ~300 events, every stream several steps
            x = rng.standard_normal((len(ids), n_in)).astype(np.float32)
            y = rng.standard_normal((len(ids), n_out)).astype(np.float32)
            preds = producer.send(ids, x, targets=y)
            for sid, xi, pi in zip(ids, x, preds, strict=True):
                events[sid].append(xi)
                served[sid].append(pi)
        path = tmp_path / "served.safetensors"
        admin.export_model(path)
        lstm, head = _modules(path)
        with torch.no_grad():
            for sid in ids:
                want = head(lstm(torch.from_numpy(np.stack(events[sid]))[None])[0][0]).numpy()
                np.testing.assert_allclose(np.stack(served[sid]), want, rtol=1e-4, atol=1e-5, err_msg=sid)
        status = admin.train_now(wait=120)
        assert status["last_round"]["outcome"] in ("published", "rejected"), status["last_round"]
        assert status["rounds"] >= 1
        after = producer.send(ids[:3], rng.standard_normal((3, n_in)).astype(np.float32))
        assert np.isfinite(after).all()


def _modules(path):
    from lstmd.daemon.model import ServingModel

    return ServingModel.from_bytes(path.read_bytes()).to_modules()
