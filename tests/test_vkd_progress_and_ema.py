"""vkd.progress (the meter's lines, running means, JSON lines) and vkd.ema (both decay rules, buffers)."""
import json

import torch
import torch.nn as nn

from vkd.ema import ModelEMA, after_start, linear_momentum
from vkd.progress import Progress, RunningMeans, append_json_line


def test_progress_prints_the_first_step_of_every_interval_and_the_last(capsys):
    progress = Progress("Epoch: [0]", total=5, every=2)
    for done in range(1, 6):
        progress.update(done, {"loss": f"{done:.1f}"})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]  ")[0] for line in lines] == ["Epoch: [0] [1/5", "Epoch: [0] [3/5", "Epoch: [0] [5/5"]
    assert all("eta " in line for line in lines) and lines[-1].endswith("loss 5.0")


def test_progress_is_silent_where_disabled(capsys):
    progress = Progress("Test:", total=2, every=1, enabled=False)
    progress.update(1, "x")
    progress.line(2, "y")
    assert capsys.readouterr().out == ""


def test_running_means_and_json_lines(tmp_path):
    means = RunningMeans()
    means.add({"d": 1.0, "g": 2.0})
    means.add({"d": 3.0})
    assert means.means() == {"d": 2.0, "g": 2.0}
    means.reset()
    assert means.means() == {}
    path = tmp_path / "log.txt"
    append_json_line(str(path), {"epoch": 0})
    append_json_line(str(path), {"epoch": 1})
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]


def test_the_students_ema_momentum_rises_to_one_and_copies_buffers():
    model = nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, linear_momentum(0.5, total_steps=4))
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    ema.update(0)  # momentum 0.5
    assert torch.allclose(ema.model.weight, torch.full((2,), 2.0))
    assert torch.equal(ema.model.running_mean, torch.full((2,), 7.0))
    ema.update(4)  # momentum 1.0: the average stays
    assert torch.allclose(ema.model.weight, torch.full((2,), 2.0))
    assert not ema.model.weight.requires_grad


def test_the_generators_ema_copies_before_its_start_and_averages_floating_buffers_after():
    model, average = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    ema = ModelEMA(model, after_start(0.75, start=10), average_buffers=True, average_model=average)
    with torch.no_grad():
        model.weight.fill_(4.0)
        model.running_mean.fill_(8.0)
    ema.update(9)
    assert torch.equal(average.weight, torch.full((2,), 4.0))
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.running_mean.fill_(0.0)
    ema.update(10)
    assert torch.allclose(average.weight, torch.full((2,), 3.0))
    assert torch.allclose(average.running_mean, torch.full((2,), 6.0))
    assert average.num_batches_tracked.item() == model.num_batches_tracked.item()
