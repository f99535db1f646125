"""Running on a cluster: scripts/train_slurm.sh passes Slurm's signal to the tasks and requeues a preempted
job; run_with_submitit.py builds the entry point's command, and a job of submitit's local executor that gets
submitit's signal is requeued and ends as an uninterrupted run."""
import json
import os
import signal
import stat
import subprocess
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
    assert run_with_submitit.entry_point_command("generation", ["--output_dir", "out"]) == [
        "-m", "generation.main", "--output_dir", "out", "--resume", "auto"]
    with pytest.raises(BadInput, match="needs an output folder"):
        run_with_submitit.entry_point_command("classification", ["--epochs", "3"])
    with pytest.raises(BadInput, match=r"needs an output folder \(--output-dir DIR after '--'\)"):
        run_with_submitit.entry_point_command("generation", ["--iterations", "3"])


def test_without_slurm_a_job_is_refused_unless_local_is_asked(run_entry_point, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    jobs = tmp_path / "jobs"
    code, out, err = run_entry_point(run_with_submitit, ["--job-dir", jobs, "--", "--output_dir", tmp_path / "run"])
    assert (code, out) == (2, "") and err == ("error: Slurm is not available here (no srun on PATH): submit from a "
                                              "Slurm login node, or pass --local to run the job on this host\n")
    assert not jobs.exists()


@pytest.mark.parametrize("tree, flags, message", [
    ("classification", ["--epohcs", "3"], "unrecognized arguments: --epohcs 3 (--help lists every flag)"),
    ("detection", ["--coco_path", "/coco", "--batch_size", "3", "--n_iter_to_acc", "2"],
     "--n_iter_to_acc 2 must divide --batch_size 3"),
    ("generation", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_the_entry_point_s_flags_are_checked_before_submitting(tree, flags, message, run_entry_point, tmp_path):
    jobs = tmp_path / "jobs"
    code, out, err = run_entry_point(run_with_submitit, ["--local", "--tree", tree, "--job-dir", jobs, "--",
                                                         "--output_dir", tmp_path / "run", *flags])
    assert (code, out, err) == (2, "", f"error: the {tree} flags after '--': {message}\n")
    assert not jobs.exists()


@pytest.mark.slow
def test_a_job_submitted_from_outside_the_repository_finds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    args = run_with_submitit.build_parser().parse_args(["--local", "--gpus-per-node", "1", "--timeout-min", "5",
                                                        "--job-dir", str(tmp_path / "jobs")])
    job = run_with_submitit.make_executor(args).submit(run_with_submitit.Trainer(["main_distributed.py", "--help"]))
    assert job.result() == 0
    assert "usage: " in job.stdout()


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
    while "Epoch: [0] [1/4]" not in (job.stdout() or ""):
        assert time.time() < deadline and not job.done(), job.stderr()
        time.sleep(0.2)
    # What Slurm's --signal does before the time limit: the signal submitit listens to, sent to the job's task.
    [task] = child_processes(job._process.pid)
    os.kill(task, submitit.JobEnvironment._usr_sig())
    assert job.result() == 0, job.stderr()
    with open(output_dir / "args.json") as handle:
        invocations = json.load(handle)["invocations"]
    # Requeued once: resumed mid-epoch, or at an epoch's end when the signal came during its last step.
    assert len(invocations) == 2 and invocations[1]["start_epoch"] in (0, 1, 2)
    expected, actual = (safe_torch_load(str(folder / "latest.pth.tar")) for folder in (tmp_path / "reference",
                                                                                       output_dir))
    assert actual["epoch"] == 2 and "mid_epoch" not in actual
    assert all(torch.equal(actual["student"][name], value) for name, value in expected["student"].items())
    assert [record["epoch"] for record in read_log(output_dir)] == [0, 1, 2]


FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$CALLS/srun"
trap 'echo USR1 >> "$CALLS/signals"; exit 124' USR1
while true; do sleep 0.05; done
"""


def test_the_slurm_script_passes_the_signal_on_and_requeues_a_preempted_job(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", '#!/usr/bin/env bash\necho "$@" > "$CALLS/scontrol"\n')):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=REPO, OUT=str(tmp_path / "out"))
    script = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "train_slurm.sh"), "--epochs", "3"], env=env)
    deadline = time.time() + 30
    while not (calls / "srun").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # the script is waiting on its tasks
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch script
    assert script.wait(timeout=30) == 124
    assert "--resume auto" in (calls / "srun").read_text() and "--epochs 3" in (calls / "srun").read_text()
    assert (calls / "signals").read_text().split() == ["USR1"]
    assert (calls / "scontrol").read_text().split() == ["requeue", "4242"]
