"""Preemption: SIGTERM (or SIGUSR1) mid-epoch stops a run at the next step boundary with one line and exit
code 124, having saved a mid-epoch checkpoint; ``--resume auto`` then ends with the weights of an
uninterrupted run, bit for bit. Ctrl-C (SIGINT) is one line and exit code 130, the last checkpoint kept."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TEACHER, launcher_command
from test_reliability import SUBPROCESS_ENV, main_command, read_log, run_process, wait_for_output, without_timing

from vkd.checkpoints import safe_torch_load
from vkd.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH, EPOCHS = 4, 3


@pytest.fixture(scope="module")
def run_flags(tiny_image_folder, tiny_teacher_file):
    """Three epochs of four steps, every step printed; the LR curve is not flat (warm-up then cosine)."""
    return ["--data-set", "FOLDER", "--data-path", tiny_image_folder, "--input-size", 32, "--batch-size", 4,
            "--teacher", TEACHER, "--teacher-path", tiny_teacher_file, "--epochs", EPOCHS, "--unscale-lr",
            "--lr", "1e-3", "--min-lr", "1e-5", "--warmup-epochs", 1, "--warmup-lr", "1e-5", "--print-freq", 1]


def assert_same_final_weights(reference_dir, output_dir):
    expected, actual = (safe_torch_load(str(folder / "latest.pth.tar")) for folder in (reference_dir, output_dir))
    assert actual["epoch"] == expected["epoch"] == EPOCHS - 1 and "mid_epoch" not in actual
    assert actual["student"].keys() == expected["student"].keys()
    assert all(torch.equal(actual["student"][name], value) for name, value in expected["student"].items())
    assert without_timing(read_log(output_dir)) == without_timing(read_log(reference_dir))


def interrupted(command, output_dir, after: str, signal_number, env=SUBPROCESS_ENV):
    """Runs ``command``, sends ``signal_number`` once a line matches ``after``; returns (code, output)."""
    # SIGINT's default restored: a shell starts background jobs with it ignored, which Python then keeps, and
    # the test stands for a Ctrl-C at a terminal however the suite itself was started.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        wait_for_output(process, after, seen)
        os.killpg(process.pid, signal_number)  # the whole group, as a scheduler signals a job step
        seen.append(process.stdout.read())
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, "".join(seen)


@pytest.mark.parametrize("workers, signal_number", [(0, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_a_stop_signal_mid_epoch_then_resume_auto_ends_like_an_uninterrupted_run(run_flags, workers, signal_number,
                                                                                  tmp_path):
    flags = run_flags + ["--num_workers", workers]
    reference = run_process(flags + ["--output_dir", tmp_path / "reference"])
    assert reference.returncode == 0, reference.stdout[-3000:]

    output_dir = tmp_path / "run"
    code, output = interrupted(main_command(flags + ["--output_dir", output_dir]), output_dir,
                               rf"^Epoch: \[1\] \[1/{STEPS_PER_EPOCH}\]", signal_number)
    assert code == EXIT_PREEMPTED, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert "preempted at " in line and "--resume auto" in line
    assert "Traceback" not in output
    saved = safe_torch_load(str(output_dir / "latest.pth.tar"))
    # The next step boundary after the signal: almost always within epoch 1 (the step it was running).
    mid_epoch = saved.get("mid_epoch")
    if mid_epoch is not None:
        epoch, step = mid_epoch["epoch"], mid_epoch["ranks"][0]["step"]
        assert saved["epoch"] == epoch - 1 and f"epoch {epoch} step {step} (" in line

    resumed = run_process(flags + ["--output_dir", output_dir, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    if mid_epoch is not None:
        assert f"Epoch: [{epoch}] [{step + 1}/{STEPS_PER_EPOCH}]" in resumed.stdout
        assert f"Epoch: [{epoch}] [{step}/{STEPS_PER_EPOCH}]" not in resumed.stdout  # no finished step is redone
    assert_same_final_weights(tmp_path / "reference", output_dir)


@pytest.mark.multiprocess
def test_preemption_under_torchrun_with_two_processes_resumes_exactly(run_flags, tmp_path):
    flags = run_flags + ["--num_workers", 0]
    launcher = [sys.executable, "-m"] + launcher_command("torchrun", 2)
    command = lambda output_dir, *extra: launcher + ["main_distributed.py"] + [str(item) for item in (  # noqa: E731
        *flags, "--output_dir", output_dir, *extra)]
    reference = subprocess.run(command(tmp_path / "reference"), cwd=REPO, env=SUBPROCESS_ENV, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    output_dir = tmp_path / "run"
    code, output = interrupted(command(output_dir), output_dir, r"^Epoch: \[1\] \[1/2\]", signal.SIGTERM)
    assert "stopped: preempted at " in output, output[-3000:]
    saved = safe_torch_load(str(output_dir / "latest.pth.tar"))
    assert saved["epoch"] < EPOCHS - 1
    if saved.get("mid_epoch"):
        assert len(saved["mid_epoch"]["ranks"]) == 2

    resumed = subprocess.run(command(output_dir, "--resume", "auto"), cwd=REPO, env=SUBPROCESS_ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final_weights(tmp_path / "reference", output_dir)


def test_ctrl_c_is_one_line_and_exit_130_keeping_the_last_checkpoint(run_flags, tmp_path):
    output_dir = tmp_path / "run"
    code, output = interrupted(main_command(run_flags + ["--num_workers", 0, "--output_dir", output_dir]),
                               output_dir, rf"^Epoch: \[1\] \[1/{STEPS_PER_EPOCH}\]", signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and output.count("stopped: interrupted") == 1
    assert safe_torch_load(str(output_dir / "latest.pth.tar"))["epoch"] == 0
