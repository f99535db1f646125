"""Fault injection: each fault a long training run can meet is tried on CPU with tiny models and data.

- kill -9 at a random point of an epoch, then ``--resume auto``: the run ends as an uninterrupted one;
- a kill in the middle of a checkpoint write: the previous file stays complete and loadable;
- non-finite losses (a diverging LR, a teacher file of NaN weights): each term printed, the
  ``--skip-nonfinite`` budget honoured, no checkpoint overwritten;
- one DDP rank killed or hung: the others exit within a bounded time with a clear message;
- unreadable image files: skipped and counted, or one error line with ``--strict-data``;
- bad input: one ``error:`` line on stderr and exit code 2 before any long work;
- safe loading: a checkpoint whose unpickling would run code is refused everywhere, and the code
  provably did not run.

Training runs whose process behaviour matters (kills, launchers) run as subprocesses; the rest run
``main_distributed.main`` in this process (conftest's ``run_main``), which saves an import per case.
"""
import ast
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import timm
import torch
from conftest import CLASSES, REPO, TEACHER, free_port, launcher_command

import models
from vidt.util import checkpoint as vidt_checkpoint
from vkd.checkpoints import add_ddp_prefix, safe_torch_load, save_atomically
from vkd.errors import CheckpointError, RunFailed

STEPS_PER_EPOCH = 4  # 18 training images, batches of 4, the last partial batch dropped
EPOCHS = 2
# One thread per process: the machines running the tests are small, and a fixed thread count keeps
# floating-point sums in the same order in every run, so an interrupted run can match bit for bit.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
PROGRESS_LINE = re.compile(r"^Epoch: \[(\d+)\] \[(\d+)/\d+\]\s+eta \S+\s+lr (\S+)", re.M)
DDP_EXIT_BOUND_S = 60  # a surviving rank must be gone this long after its peer failed (timeouts included)


def main_command(argv):
    return [sys.executable, "main_distributed.py"] + [str(item) for item in argv]


def run_process(argv, timeout=180) -> subprocess.CompletedProcess:
    """main_distributed.py in a subprocess; stdout and stderr together in ``.stdout``."""
    return subprocess.run(main_command(argv), cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle]


def without_timing(records):
    return [{key: value for key, value in record.items() if key != "train_seconds"} for record in records]


def per_step_lr(output: str):
    """{(epoch, iteration): lr} from the progress lines (printed every iteration with --print-freq 1)."""
    return {(int(epoch), int(step)): lr for epoch, step, lr in PROGRESS_LINE.findall(output)}


def sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def assert_one_error_line(code, stderr, exit_code=2):
    """The contract for bad input and refused files: exit code, and stderr exactly one ``error:`` line."""
    lines = stderr.strip().splitlines()
    assert code == exit_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def wait_for_output(process: subprocess.Popen, pattern: str, seen: list, timeout: float = 120) -> None:
    """Reads ``process``'s stdout line by line into ``seen`` until a line matches ``pattern``; after
    ``timeout`` seconds the process is killed, which ends the read."""
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            seen.append(line)
            if re.search(pattern, line):
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"the process ended (or was killed after {timeout} s) before printing {pattern!r}:\n"
                         f"{''.join(seen)[-3000:]}")


@pytest.fixture(scope="module")
def recipe_flags(tiny_image_folder, tiny_teacher_file):
    """A 2-epoch run with a non-trivial LR curve (one warm-up epoch, then cosine), every step printed,
    and a checkpoint kept after every epoch (ep1.pth.tar is the state after epoch 0)."""
    return ["--data-set", "FOLDER", "--data-path", tiny_image_folder, "--input-size", 32, "--batch-size", 4,
            "--num_workers", 0, "--teacher", TEACHER, "--teacher-path", tiny_teacher_file, "--epochs", EPOCHS,
            "--unscale-lr", "--lr", "1e-3", "--min-lr", "1e-5", "--warmup-epochs", 1, "--warmup-lr", "1e-5",
            "--checkpoint-freq", 1, "--print-freq", 1]


@pytest.fixture(scope="module")
def uninterrupted_run(recipe_flags, tmp_path_factory):
    """(output folder, output) of the recipe run once from start to end, the reference of every recovery."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_process(recipe_flags + ["--output_dir", output_dir])
    assert result.returncode == 0, result.stdout[-3000:]
    return output_dir, result.stdout


# ============================================================================ kill -9 and resume

@pytest.mark.slow
def test_kill_at_a_random_point_then_resume_auto_ends_like_an_uninterrupted_run(recipe_flags, uninterrupted_run,
                                                                                 tmp_path):
    reference_dir, reference_output = uninterrupted_run
    reference_log = read_log(reference_dir)
    assert [record["epoch"] for record in reference_log] == [0, 1]
    assert reference_log[0]["train_lr"] != reference_log[1]["train_lr"]  # the curve is not flat

    # A random point of epoch 1: after a random number of its iterations (0 = right after epoch 0's
    # checkpoint, STEPS_PER_EPOCH = during its evaluation), then a random part of an iteration.
    # The delay stays below the time from the last iteration's line to epoch 1's checkpoint
    # (evaluation, then two or three checkpoint files), so the kill always lands inside epoch 1.
    chooser = random.Random()
    finished_steps = chooser.randint(0, STEPS_PER_EPOCH)
    extra_delay = chooser.uniform(0.0, 0.15)
    point = f"killed after {finished_steps} iteration(s) of epoch 1 + {extra_delay:.3f} s"
    output_dir = tmp_path / "run"
    process = subprocess.Popen(main_command(recipe_flags + ["--output_dir", output_dir, "--resume", "auto"]),
                               cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen = []
    try:
        if finished_steps == 0:
            wait_for_output(process, r"^Max accuracy", seen)  # epoch 0's last line before its checkpoint
            while not os.path.exists(output_dir / "latest.pth.tar"):
                time.sleep(0.01)
        else:
            wait_for_output(process, rf"^Epoch: \[1\] \[{finished_steps}/{STEPS_PER_EPOCH}\]", seen)
        time.sleep(extra_delay)
        assert process.poll() is None, f"the run ended before the kill ({point})"
        process.send_signal(signal.SIGKILL)
        seen.append(process.stdout.read())
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert safe_torch_load(str(output_dir / "latest.pth.tar"))["epoch"] == 0, point

    result = run_process(recipe_flags + ["--output_dir", output_dir, "--resume", "auto"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "latest.pth.tar: continuing at epoch 1" in result.stdout, point
    # Same epochs, same LR at every iteration of the redone epoch, same metrics (bit for bit).
    assert without_timing(read_log(output_dir)) == without_timing(reference_log), point
    resumed_lrs = per_step_lr(result.stdout)
    assert sorted(resumed_lrs) == [(1, step) for step in range(1, STEPS_PER_EPOCH + 1)]
    assert resumed_lrs == {key: lr for key, lr in per_step_lr(reference_output).items() if key[0] == 1}
    expected, actual = (safe_torch_load(str(folder / "latest.pth.tar")) for folder in (reference_dir, output_dir))
    assert actual["epoch"] == expected["epoch"] == EPOCHS - 1
    assert actual["lr"] == expected["lr"]
    steps = {int(state["step"]) for state in actual["optimizer"]["state"].values()}
    assert steps == {int(state["step"]) for state in expected["optimizer"]["state"].values()} == \
        {EPOCHS * STEPS_PER_EPOCH}
    assert actual["student"].keys() == expected["student"].keys()
    assert all(torch.equal(actual["student"][name], value) for name, value in expected["student"].items()), point


@pytest.mark.slow
def test_kill_between_the_log_line_and_the_checkpoint_redoes_the_epoch_once(recipe_flags, uninterrupted_run,
                                                                           run_main, tmp_path):
    """The one moment a kill leaves files of two epochs: epoch 1's log line is written (a last line
    torn by the kill, too), its latest.pth.tar not yet. The resumed run must log epoch 1 once."""
    reference_dir, _ = uninterrupted_run
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copy(reference_dir / "ep1.pth.tar", output_dir / "latest.pth.tar")  # the state after epoch 0
    reference_lines = (reference_dir / "log.txt").read_text().splitlines(keepends=True)
    (output_dir / "log.txt").write_text("".join(reference_lines) + reference_lines[1][:40])

    code, stdout, stderr = run_main(recipe_flags + ["--output_dir", output_dir, "--resume", "auto"])
    assert code == 0, stderr
    assert "continuing at epoch 1" in stdout
    assert without_timing(read_log(output_dir)) == without_timing(read_log(reference_dir))


# ============================================================================ atomic checkpoint writes

# Saves version 1 normally, then version 2 through a torch.save that writes half of the bytes, reports
# it and waits to be killed: a SIGKILL that lands in the middle of a checkpoint write, every time.
HALF_WRITER = """
import io, sys, time
import torch
from vkd.checkpoints import save_atomically

path = sys.argv[1]
save_atomically({"version": 1, "weights": torch.full((2 ** 20,), 1.0)}, path)
real_save = torch.save

def save_half_then_hang(obj, handle):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    handle.flush()
    print("half written", flush=True)
    time.sleep(600)

torch.save = save_half_then_hang
save_atomically({"version": 2, "weights": torch.full((2 ** 20,), 2.0)}, path)
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "latest.pth.tar"
    process = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(path)], cwd=REPO, env=SUBPROCESS_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        wait_for_output(process, r"^half written", seen, timeout=60)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    [partial] = [entry for entry in os.listdir(tmp_path) if entry != path.name]  # the interrupted write
    assert os.path.getsize(tmp_path / partial) < os.path.getsize(path)
    checkpoint = safe_torch_load(str(path))
    assert checkpoint["version"] == 1 and torch.equal(checkpoint["weights"], torch.full((2 ** 20,), 1.0))
    save_atomically({"version": 3}, str(path))  # the next save (the resumed run) clears the dead writer's file
    assert os.listdir(tmp_path) == [path.name] and safe_torch_load(str(path))["version"] == 3


def test_a_failing_checkpoint_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth.tar"
    save_atomically({"version": 1}, str(path))
    real_save = torch.save

    def write_half_then_fail(obj, handle):  # e.g. the disk filling up half way
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(RunFailed, match=f"no space left in {tmp_path} to write latest.pth.tar"):
        save_atomically({"version": 2, "weights": torch.ones(1000)}, str(path))
    assert os.listdir(tmp_path) == [path.name]
    assert safe_torch_load(str(path)) == {"version": 1}


# ============================================================================ non-finite losses

def test_diverging_lr_skips_the_allowed_steps_then_stops_with_every_term(run_main, train_flags, tmp_path):
    # A real divergence: AdamW moves every weight by about the LR (1e30), so the next forward overflows.
    code, stdout, stderr = run_main(train_flags + ["--epochs", 1, "--unscale-lr", "--lr", "1e30",
                                                   "--skip-nonfinite", 2, "--output_dir", tmp_path / "run"])
    assert code == 1, stderr
    skipped = re.findall(r"^warning: non-finite loss at epoch 0, iteration (\d+): step skipped \((\d)/2\)$",
                         stderr, re.M)
    assert skipped == [("1", "1"), ("2", "2")]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at epoch 0, iteration 3 (global step 3): "
                           "loss=nan, ce=nan, kd=nan, vkd=nan; 2 step(s) already skipped of --skip-nonfinite 2")
    assert not os.path.exists(tmp_path / "run" / "latest.pth.tar")


@pytest.mark.slow
def test_nan_teacher_on_resume_stops_and_leaves_the_last_checkpoint_untouched(recipe_flags, uninterrupted_run,
                                                                             run_main, tmp_path):
    reference_dir, _ = uninterrupted_run
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copy(reference_dir / "ep1.pth.tar", output_dir / "latest.pth.tar")
    (output_dir / "log.txt").write_text((reference_dir / "log.txt").read_text().splitlines(keepends=True)[0])
    before = {name: sha256(output_dir / name) for name in ("latest.pth.tar", "log.txt")}
    # A loadable teacher file whose weights are NaN (a corrupted-but-valid download, say).
    teacher = timm.create_model(TEACHER, num_classes=len(CLASSES))
    nan_teacher = tmp_path / "nan_teacher.pth"
    torch.save({"model": {name: value.fill_(float("nan")) if value.is_floating_point() else value
                          for name, value in teacher.state_dict().items()}}, nan_teacher)

    code, stdout, stderr = run_main(recipe_flags + ["--teacher-path", nan_teacher, "--skip-nonfinite", 1,
                                                    "--output_dir", output_dir, "--resume", "auto"])
    assert code == 1, stderr
    last = stderr.strip().splitlines()[-1]
    terms = dict(re.findall(r"\b(loss|ce|kd|vkd)=(\S+?)[,;]", last))
    assert last.startswith("error: non-finite loss at epoch 1, iteration 1 (global step 5)"), last
    assert terms.keys() == {"loss", "ce", "kd", "vkd"}
    assert (terms["loss"], terms["kd"], terms["vkd"]) == ("nan", "nan", "nan") and float(terms["ce"]) > 0
    assert {name: sha256(output_dir / name) for name in before} == before
    assert safe_torch_load(str(output_dir / "latest.pth.tar"))["epoch"] == 0


# ============================================================================ a DDP rank dies or hangs

def _children(pid: int):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        variables = dict(entry.split(b"=", 1) for entry in handle.read().split(b"\0") if b"=" in entry)
    return int(variables[b"RANK"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
def test_torchrun_job_ends_when_a_rank_is_killed(train_flags, tmp_path):
    command = ([sys.executable, "-m"] + launcher_command("torchrun", 2) + ["main_distributed.py"]
               + [str(item) for item in train_flags + ["--epochs", 3, "--print-freq", 1, "--dist-timeout", 0.5,
                                                       "--output_dir", tmp_path / "run"]])
    launcher = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen, workers = [], {}
    try:
        wait_for_output(launcher, r"^Epoch: \[0\] \[1/", seen)
        workers = {_rank_of(pid): pid for pid in _children(launcher.pid)}
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        seen.append(launcher.communicate(timeout=DDP_EXIT_BOUND_S)[0])
        elapsed = time.time() - killed_at
    finally:
        launcher.kill()
        launcher.wait()
    output = "".join(seen)
    assert launcher.returncode != 0 and elapsed < DDP_EXIT_BOUND_S, output[-3000:]
    assert not any(_alive(pid) for pid in workers.values())
    # torchrun names the rank that died; rank 0 saw its peer go before torchrun stopped it, or was stopped.
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", output), output[-3000:]
    assert not os.path.exists(tmp_path / "run" / "latest.pth.tar")


# fault: (rank hit, signal, --dist-timeout in minutes). A killed peer's connections close at once, so
# the survivor must leave well before the timeout; a hung (stopped) one closes nothing, and only the
# timeout, short here, can end the wait.
RANK_FAULTS = {"rank 0 killed": (0, signal.SIGKILL, 0.5), "rank 1 hung": (1, signal.SIGSTOP, 0.1)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", sorted(RANK_FAULTS))
def test_surviving_rank_exits_with_a_clear_message_without_a_launcher_to_stop_it(fault, train_flags, tmp_path):
    """Ranks started separately (srun, or one torchrun per node): only the process group's own failure
    detection and --dist-timeout can end the survivor."""
    victim, fault_signal, dist_timeout = RANK_FAULTS[fault]
    survivor = 1 - victim
    argv = train_flags + ["--epochs", 3, "--print-freq", 1, "--dist-timeout", dist_timeout,
                          "--output_dir", tmp_path / "run"]
    port = str(free_port())
    processes = {}
    try:
        for rank in (0, 1):
            env = dict(SUBPROCESS_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            processes[rank] = subprocess.Popen(main_command(argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
        wait_for_output(processes[0], r"^Epoch: \[0\] \[1/", [])  # both ranks are training
        processes[victim].send_signal(fault_signal)
        failed_at = time.time()
        _, survivor_stderr = processes[survivor].communicate(timeout=DDP_EXIT_BOUND_S)
        elapsed = time.time() - failed_at
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    last = survivor_stderr.strip().splitlines()[-1]
    assert processes[survivor].returncode == 1, survivor_stderr[-3000:]
    assert last.startswith(f"error: rank {survivor}: distributed communication failed, probably because another "
                           f"process died or hung (collectives give up after --dist-timeout {dist_timeout:g} min)")
    if fault_signal == signal.SIGSTOP:
        assert "Timed out" in last and dist_timeout * 60 - 1 < elapsed < DDP_EXIT_BOUND_S, (elapsed, last)
    else:
        assert elapsed < dist_timeout * 60, (elapsed, last)


# ============================================================================ unreadable image files

@pytest.fixture
def data_with_unreadable_images(tiny_image_folder, tmp_path):
    """The tiny data plus 2 broken training images (20 in all: 5 full batches, so none is left out by
    the sampler) and 1 broken validation image."""
    root = tmp_path / "data"
    shutil.copytree(tiny_image_folder, root)
    good = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "cat" / "truncated.png").write_bytes(good[:len(good) // 3])
    (root / "train" / "dog" / "garbage.jpg").write_bytes(random.Random(0).randbytes(3000))
    (root / "val" / "fox" / "empty.png").write_bytes(b"")
    return root


def test_unreadable_images_are_skipped_and_counted_at_the_end_of_the_epoch(data_with_unreadable_images, run_main,
                                                                           train_flags, tmp_path):
    code, stdout, stderr = run_main(train_flags + ["--data-path", data_with_unreadable_images, "--epochs", 1,
                                                   "--num_workers", 1, "--output_dir", tmp_path / "run"])
    assert code == 0, stderr
    assert "warning: 2 unreadable training images in epoch 0 were skipped" in stderr
    assert "warning: 1 unreadable validation images were skipped" in stderr
    [record] = read_log(tmp_path / "run")
    assert (record["train_unreadable_images"], record["val_unreadable_images"], record["val_images"]) == (2, 1, 7)
    # With seed 0 the two broken images fall in different batches, each left with 3 readable images,
    # and Mixup, which needs even batches, drops one more from each: 20 - 2 - 2.
    assert record["train_images"] == 16
    assert safe_torch_load(str(tmp_path / "run" / "latest.pth.tar"))["epoch"] == 0


def test_strict_data_makes_an_unreadable_image_one_error_line_naming_it(data_with_unreadable_images, run_main,
                                                                       train_flags, tmp_path):
    # A loader worker re-raises its error in the main process around the worker's whole traceback.
    code, _, stderr = run_main(train_flags + ["--data-path", data_with_unreadable_images, "--epochs", 1,
                                              "--num_workers", 1, "--strict-data", "--output_dir", tmp_path / "run"])
    line = assert_one_error_line(code, stderr)
    assert re.fullmatch(rf"error: unreadable image file: {re.escape(str(data_with_unreadable_images))}/train/"
                        r"(cat/truncated\.png|dog/garbage\.jpg) \(.+\)", line), line
    assert not os.path.exists(tmp_path / "run" / "latest.pth.tar")


# ============================================================================ bad input

def _copy_data(folder, tmp_path, change):
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def _file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _truncated_checkpoint(tmp_path, name):
    path = tmp_path / name
    torch.save({"model": {"weight": torch.zeros(10000)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[:5000])  # what a non-atomic write leaves when killed
    return path


def _student_of_another_run(tmp_path, name, num_classes):
    """A checkpoint of a deit_ti_distilled trained on ``num_classes`` classes, in the released layout."""
    torch.manual_seed(0)
    student = models.create_student("deit_ti_distilled", num_classes=num_classes, img_size=32, teacher_dim=512)
    path = tmp_path / name
    torch.save({"student": add_ddp_prefix(student.state_dict()), "epoch": 0}, path)
    return path


GARBAGE = random.Random(7).randbytes(5000)
HEAD_MISMATCH = re.escape("shape mismatch: head.weight file [5, 192] vs model [3, 192], head.bias file [5] vs "
                          "model [3], head_dist.weight file [5, 192] vs model [3, 192], head_dist.bias file [5] vs "
                          "model [3]; file has 5 classes, data set has 3")

# case: (extra flags from (folder, tmp_path), regular expression the error line must match; {tmp} is tmp_path)
BAD_INPUTS = {
    "missing data folder": (lambda folder, tmp: ["--data-path", tmp / "nowhere"],
                            r"data folder not found: {tmp}/nowhere"),
    "empty data folder": (lambda folder, tmp: ["--data-path", _copy_data(folder, tmp, lambda d: [
        shutil.rmtree(d / split) for split in ("train", "val")])], r"data folder is empty: {tmp}/data"),
    "missing split": (lambda folder, tmp: ["--data-path", _copy_data(folder, tmp, lambda d: shutil.rmtree(d / "val"))],
                      r"missing split folder: {tmp}/data/val"),
    "empty class folder": (lambda folder, tmp: ["--data-path", _copy_data(
        folder, tmp, lambda d: (d / "train" / "zebra").mkdir())],
        r"class folder has no images .*: {tmp}/data/train/zebra"),
    "unknown student": (lambda folder, tmp: ["--student-model", "deit_tiny"],
                        r"unknown student model 'deit_tiny'; any name in timm.list_models\(\) works .*; or one of this repository's: deit_ti_distilled.*"),
    "unknown teacher": (lambda folder, tmp: ["--teacher", "regnety160"],
                        r"unknown teacher model 'regnety160'; .*closest: regnety_160, .*"),
    "missing student checkpoint": (lambda folder, tmp: ["--student-ckpt", tmp / "missing.pth.tar"],
                                   r"checkpoint file not found: {tmp}/missing\.pth\.tar"),
    "garbage student checkpoint": (lambda folder, tmp: ["--student-ckpt", _file(tmp, "garbage.pth.tar", GARBAGE)],
                                   r"could not read checkpoint {tmp}/garbage\.pth\.tar: corrupt, truncated or not a "
                                   r"PyTorch file \(UnpicklingError: unreadable pickle data\)"),
    "truncated resume checkpoint": (lambda folder, tmp: ["--resume", _truncated_checkpoint(tmp, "latest.pth.tar")],
                                    r"could not read checkpoint {tmp}/latest\.pth\.tar: corrupt, truncated or not a "
                                    r"PyTorch file \(\w+: .+\)"),
    "empty resume checkpoint": (lambda folder, tmp: ["--resume", _file(tmp, "latest.pth.tar", b"")],
                                r"checkpoint file is empty: {tmp}/latest\.pth\.tar"),
    "missing teacher file": (lambda folder, tmp: ["--teacher-path", tmp / "teacher.pth"],
                             r"checkpoint file not found: {tmp}/teacher\.pth"),
    "garbage teacher file": (lambda folder, tmp: ["--teacher-path", _file(tmp, "teacher.pth", GARBAGE)],
                             r"could not read checkpoint {tmp}/teacher\.pth: corrupt, .*"),
    "truncated teacher file": (lambda folder, tmp: ["--teacher-path", _truncated_checkpoint(tmp, "teacher.pth")],
                               r"could not read checkpoint {tmp}/teacher\.pth: corrupt, .*"),
    "wrong-architecture student checkpoint": (
        lambda folder, tmp: ["--student-ckpt", _student_of_another_run(tmp, "five_classes.pth", 5)],
        r"{tmp}/five_classes\.pth does not fit DistilledVisionTransformer: " + HEAD_MISMATCH),
    "wrong-architecture resume checkpoint": (
        lambda folder, tmp: ["--resume", _student_of_another_run(tmp, "latest.pth.tar", 5)],
        r"{tmp}/latest\.pth\.tar does not fit DistilledVisionTransformer: " + HEAD_MISMATCH),
    "eval-student without student checkpoint": (lambda folder, tmp: ["--eval-student"],
                                                r"--eval-student needs --student-ckpt PATH"),
    "batch size 0": (lambda folder, tmp: ["--batch-size", 0], r"--batch-size must be at least 1, got 0"),
    "negative batch size": (lambda folder, tmp: ["--batch-size", -4], r"--batch-size must be at least 1, got -4"),
    "eval crop ratio above 1": (lambda folder, tmp: ["--eval-crop-ratio", 1.5],
                                r"--eval-crop-ratio must be in \(0, 1\], got 1\.5"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_before_any_work(case, run_main, train_flags, tiny_image_folder, tmp_path):
    extra_flags, expected = BAD_INPUTS[case]
    code, stdout, stderr = run_main(train_flags + extra_flags(tiny_image_folder, tmp_path)
                                    + ["--output_dir", tmp_path / "run"])
    line = assert_one_error_line(code, stderr)
    assert re.fullmatch("error: " + expected.format(tmp=re.escape(str(tmp_path))), line), line
    assert "could run code" not in line
    assert not os.path.exists(tmp_path / "run" / "log.txt") and "Start training" not in stdout


# ============================================================================ safe loading

class RunsCodeWhenUnpickled:
    """Unpickling it calls ``open(marker, 'w')``: the marker file existing proves that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def code_running_checkpoint(tmp_path):
    """(path, marker): a checkpoint in the released layout with a payload that creates ``marker`` when
    unpickled; checked once with an unsafe load, so the refusals below are refusals of working code."""
    marker = tmp_path / "code_ran"
    torch.manual_seed(0)
    student = models.create_student("deit_ti_distilled", num_classes=len(CLASSES), img_size=32, teacher_dim=512)
    path = tmp_path / "crafted.pth.tar"
    torch.save({"student": add_ddp_prefix(student.state_dict()), "model": student.state_dict(), "epoch": 0,
                "payload": RunsCodeWhenUnpickled(marker)}, path)
    torch.load(path, weights_only=False)["payload"].close()  # the unsafe load this project never does
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("flag", ["--student-ckpt", "--teacher-path", "--resume"])
def test_a_checkpoint_that_would_run_code_is_refused(flag, code_running_checkpoint, run_main, train_flags, tmp_path):
    path, marker = code_running_checkpoint
    code, _, stderr = run_main(train_flags + [flag, path, "--output_dir", tmp_path / "run"])
    line = assert_one_error_line(code, stderr)
    assert line == (f"error: refused to load {path}: it refers to io.open, which is neither a tensor nor a plain "
                    f"container, and unpickling it could run code")
    assert not marker.exists()


def test_the_vidt_loader_refuses_code_and_allows_only_argparse_namespace(code_running_checkpoint, tmp_path):
    import argparse
    path, marker = code_running_checkpoint
    with pytest.raises(vidt_checkpoint.CheckpointError, match=rf"^refused to load {re.escape(str(path))}: it refers "
                                                              r"to io\.open, .*could run code$"):
        vidt_checkpoint.load_checkpoint(str(path))
    assert not marker.exists()
    released = tmp_path / "released_vidt.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(backbone_name="swin_nano")}, released)
    assert vidt_checkpoint.load_checkpoint(str(released))["args"].backbone_name == "swin_nano"
    with pytest.raises(CheckpointError, match=r"it refers to argparse\.Namespace"):
        safe_torch_load(str(released))  # main_distributed's files hold tensors and containers only
    with pytest.raises(vidt_checkpoint.CheckpointError, match=r"corrupt, truncated or not a PyTorch file"):
        vidt_checkpoint.load_checkpoint(str(_file(tmp_path, "garbage.pth", GARBAGE)))


def _project_python_files():
    """Every .py file of the repository but this one, whose crafted checkpoint is loaded unsafely on purpose."""
    skipped = {".venv", ".git", "__pycache__", "node_modules"}
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if name not in skipped]
        yield from (os.path.join(folder, name) for name in files
                    if name.endswith(".py") and os.path.join(folder, name) != os.path.abspath(__file__))


def test_every_load_in_the_project_is_weights_only():
    """torch.load / load_state_dict_from_url with ``weights_only=True`` written out, and no pickle loads."""
    unsafe, loads = [], 0
    for path in _project_python_files():
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            where = f"{os.path.relpath(path, REPO)}:{node.lineno}"
            if node.func.attr in ("load", "load_state_dict_from_url") and owner in ("torch", "torch.hub"):
                loads += 1
                weights_only = [keyword.value for keyword in node.keywords if keyword.arg == "weights_only"]
                if not (len(weights_only) == 1 and isinstance(weights_only[0], ast.Constant)
                        and weights_only[0].value is True):
                    unsafe.append(where)
            elif owner in ("pickle", "dill", "joblib") and node.func.attr in ("load", "loads", "Unpickler"):
                unsafe.append(where)
    assert loads >= 2  # vkd.checkpoints.safe_torch_load and the tests' own reads were found
    assert unsafe == []
