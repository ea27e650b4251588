"""daemon/tasks.py: each task's target sizes, target joining and cleaning, loss, reply transform and per-stream
state — the task policy the loop, engine, trainer and recorder wiring ask for instead of testing `spec.task`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lstmd.daemon.model import ModelSpec
from lstmd.daemon.tasks import TASKS, ClassificationTask, ForecastTask, RegressionTask, task_for


def _spec(task: str, output_size: int = 3, columns=()) -> ModelSpec:
    input_size = 4
    if task == "forecast":
        output_size = len(columns) or input_size
    return ModelSpec(input_size, 8, 1, output_size, task, tuple(columns))


def test_every_configured_task_has_a_policy():
    assert set(TASKS) == {"regression", "classification", "forecast"}
    assert isinstance(task_for(_spec("classification")), ClassificationTask)
    with pytest.raises(ValueError, match="'ranking' is not one of"):
        task_for(ModelSpec(4, 8, 1, 3, "ranking", ()))


def test_target_sizes():
    for task, sizes in (("regression", (3, 3)), ("classification", (1, 1))):
        policy = task_for(_spec(task))
        assert (policy.wire_target_dim, policy.recorded_target_size) == sizes
    forecast = task_for(_spec("forecast", columns=(0, 2)))
    assert (forecast.wire_target_dim, forecast.recorded_target_size, forecast.takes_targets) == (0, 2, False)


def test_batch_targets_join_messages_and_classification_drops_labels_out_of_range():
    regression = RegressionTask(_spec("regression", output_size=1))
    joined = regression.batch_targets([None, np.array([[1.0], [2.0]], dtype=np.float32)], [1, 2], 3)
    assert np.isnan(joined[0, 0]) and joined[1:, 0].tolist() == [1.0, 2.0]
    assert regression.batch_targets([None, None], [1, 2], 3) is None
    labels = np.array([[0], [2], [3], [-1]], dtype=np.int64)
    cleaned = ClassificationTask(_spec("classification")).batch_targets([labels], [4], 4)
    assert cleaned[:2, 0].tolist() == [0.0, 2.0] and np.isnan(cleaned[2:, 0]).all()
    assert ForecastTask(_spec("forecast")).batch_targets([np.ones((2, 4))], [2], 2) is None


def test_losses_are_the_tasks_losses():
    torch.manual_seed(0)
    out, mask = torch.randn(2, 5, 3), torch.rand(2, 5) > 0.3
    y = torch.randn(2, 5, 3)
    want = ((out - y)[mask] ** 2).mean()
    data = {"y": y, "mask": mask}
    torch.testing.assert_close(RegressionTask(_spec("regression")).loss(out, data, None, None), want)
    labels = torch.randint(0, 3, (2, 5, 1)).float()
    want = F.cross_entropy(out[mask], labels[..., 0].long()[mask])
    got = ClassificationTask(_spec("classification")).loss(out, {"y": labels, "mask": mask}, None, None)
    torch.testing.assert_close(got, want)


def test_classification_replies_are_probabilities():
    probs = ClassificationTask(_spec("classification")).replies(torch.tensor([[0.0, 0.0, math.log(2.0)]]))
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.25, 0.5]]))


def test_forecast_keeps_each_streams_last_event():
    task = ForecastTask(_spec("forecast", columns=(1,)))
    assert task.columns(torch.device("cpu")).tolist() == [1]
    assert RegressionTask(_spec("regression")).stream_state(4, torch.device("cpu")) is None
    last = task.stream_state(4, torch.device("cpu"))
    slots, x = torch.tensor([2, 0]), torch.arange(8.0).reshape(2, 4)
    torch.testing.assert_close(last.previous(x, slots, None), x)  # not known yet: change 0
    assert last.known(2, reset_pending=False) == [0.0, 1.0, 2.0, 3.0] and last.known(1, False) is None
    torch.testing.assert_close(last.previous(x + 1, slots, torch.tensor([True, False])), torch.stack([x[0] + 1, x[1]]))
    saved = last.snapshot_tensors(slots)
    other = task.stream_state(4, torch.device("cpu"))
    other.restore_tensors(saved, slots)
    assert torch.equal(other.rows[[2, 0]], last.rows[[2, 0]])
