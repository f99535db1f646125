"""run_with_submitit.py: the entry point's command, and a preemption of a job run by submitit's local executor
(the signal submitit sends before a time limit), which is requeued and ends as an uninterrupted run."""
import json
import os
import time

import pytest
import submitit
import torch
from conftest import REPO, TEACHER
from test_reliability import read_log, run_process

import run_with_submitit
from vkd.checkpoints import safe_torch_load
from vkd.errors import BadInput


def test_the_command_resumes_automatically_and_needs_an_output_folder():
    assert run_with_submitit.entry_point_command("detection", ["--output_dir", "out"]) == [
        "-m", "vidt.main", "--output_dir", "out", "--resume", "auto"]
    assert run_with_submitit.entry_point_command("classification", ["--output_dir=out", "--resume", "x.pth"]) == [
        "main_distributed.py", "--output_dir=out", "--resume", "x.pth"]
    with pytest.raises(BadInput, match="needs an output folder"):
        run_with_submitit.entry_point_command("classification", ["--epochs", "3"])


def child_processes(pid: int):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


@pytest.mark.slow
def test_a_preempted_local_job_is_requeued_and_ends_like_an_uninterrupted_run(tiny_image_folder, tiny_teacher_file,
                                                                              tmp_path, monkeypatch):
    flags = ["--data-set", "FOLDER", "--data-path", tiny_image_folder, "--input-size", "32", "--batch-size", "4",
             "--num_workers", "0", "--teacher", TEACHER, "--teacher-path", tiny_teacher_file, "--epochs", "3",
             "--print-freq", "1"]
    reference = run_process(flags + ["--output_dir", tmp_path / "reference"])
    assert reference.returncode == 0, reference.stdout[-3000:]

    monkeypatch.setenv("PYTHONPATH", REPO)  # the job's process unpickles run_with_submitit.Trainer
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=1, gpus_per_node=0)
    output_dir = tmp_path / "run"
    job = executor.submit(run_with_submitit.Trainer(
        run_with_submitit.entry_point_command("classification", flags + ["--output_dir", str(output_dir)])))
    deadline = time.time() + 240
    while "Epoch: [1] [1/4]" not in (job.stdout() or ""):
        assert time.time() < deadline and not job.done(), job.stderr()
        time.sleep(0.2)
    # What Slurm's --signal does before the time limit: the signal submitit listens to, sent to the job's task.
    [task] = child_processes(job._process.pid)
    os.kill(task, submitit.JobEnvironment._usr_sig())
    assert job.result() == 0, job.stderr()
    with open(output_dir / "args.json") as handle:
        invocations = json.load(handle)["invocations"]
    assert [entry["start_epoch"] for entry in invocations] == [0, 1]  # requeued, resumed in epoch 1
    expected, actual = (safe_torch_load(str(folder / "latest.pth.tar")) for folder in (tmp_path / "reference",
                                                                                       output_dir))
    assert actual["epoch"] == 2 and "mid_epoch" not in actual
    assert all(torch.equal(actual["student"][name], value) for name, value in expected["student"].items())
    assert [record["epoch"] for record in read_log(output_dir)] == [0, 1, 2]
