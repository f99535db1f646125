"""experiments.rows: row configs over their base, the job of a row and seed, and a row's summary over the
runs that finished."""
import json
import os

import pytest

from experiments import rows
from experiments.runner import DONE_MARKER


def test_rows_resolve_their_base_and_keep_their_title(tmp_path):
    (tmp_path / "common.yaml").write_text("epochs: 3\nalpha: 1.0\n")
    (tmp_path / "row1_plain.yaml").write_text("# 1. Plain, no feature term.\nbase: common.yaml\nalpha: 0.0\n")
    (tmp_path / "row2_more.yaml").write_text("# 2. More epochs.\nbase: common.yaml\nepochs: 5\n")
    (tmp_path / "teacher.yaml").write_text("base: common.yaml\n")  # not a row
    found = rows.row_configs(str(tmp_path))
    assert [row["name"] for row in found] == ["row1_plain", "row2_more"]
    assert found[0]["settings"] == {"epochs": 3, "alpha": 0.0} and found[1]["settings"] == {"epochs": 5, "alpha": 1.0}
    assert found[0]["title"] == "1. Plain, no feature term." and found[1]["path"] == str(tmp_path / "row2_more.yaml")


def test_a_rows_job_is_its_config_and_seed():
    row = {"name": "row5_vkd", "path": "configs/ablation/row5_vkd.yaml"}
    job = rows.row_job(row, 2, "runs/ablation", threads=1)
    assert job.name == "row5_vkd/seed2" and job.output_dir == os.path.join("runs", "ablation", "row5_vkd", "seed2")
    assert job.command()[1:] == ["main_distributed.py", "--config", "configs/ablation/row5_vkd.yaml", "--seed", "2",
                                 "--output_dir", job.output_dir]
    assert job.threads == 1


def finish(job, accuracies, seconds):
    """What the runner leaves of a finished job: the log and the done marker."""
    os.makedirs(job.output_dir)
    with open(os.path.join(job.output_dir, "log.txt"), "w") as handle:
        handle.writelines(json.dumps({"epoch": epoch, "val_acc1": acc1}) + "\n"
                          for epoch, acc1 in enumerate(accuracies))
    with open(os.path.join(job.output_dir, DONE_MARKER), "w") as handle:
        json.dump({"command": job.shell_command(), "settings_sha256": job.settings_sha256(), "seconds": seconds}, handle)


def test_a_row_is_summarised_over_the_seeds_that_finished(tmp_path):
    (tmp_path / "row1_x.yaml").write_text("alpha: 0.0\n")
    row = {"name": "row1_x", "path": str(tmp_path / "row1_x.yaml"), "title": "1. X", "settings": {"alpha": 0.0}}
    out = str(tmp_path / "runs")
    finish(rows.row_job(row, 0, out), [50.0, 90.0], 10.0)
    finish(rows.row_job(row, 2, out), [60.0, 92.0], 12.5)
    os.makedirs(rows.row_job(row, 1, out).output_dir)  # started, never finished
    runs = rows.finished_runs(row, (0, 1, 2), out)
    assert [run["seed"] for run in runs] == [0, 2] and [run["acc1"] for run in runs] == [90.0, 92.0]
    summary = rows.summarise(row, runs, extra=[1, 2])
    assert summary["seeds"] == [0, 2] and summary["acc1_per_seed"] == [90.0, 92.0]
    assert summary["acc1_mean"] == pytest.approx(91.0) and summary["acc1_std"] == pytest.approx(2 ** 0.5)
    assert summary["seconds_per_run"] == [10.0, 12.5] and summary["seconds"] == pytest.approx(22.5)
    assert summary["commands"] == [rows.row_job(row, seed, out).shell_command() for seed in (0, 2)]
    assert "--seed 2" in summary["commands"][1]
    assert summary["extra"] == [1, 2] and summary["settings"] == {"alpha": 0.0}
    lonely = rows.summarise(row, runs[:1])
    assert lonely["acc1_mean"] == 90.0 and lonely["acc1_std"] is None
    assert rows.summarise(row, [])["acc1_mean"] is None
