"""Detection runs that survive the cluster and the user's slips, on a synthetic COCO set (CPU, one thread).

- SIGTERM mid-epoch: a mid-epoch checkpoint.pth, one line, exit 124; ``--resume auto`` then ends with the
  weights and log of an uninterrupted run, bit for bit. SIGTERM during evaluation keeps the epoch's line.
- two processes: a rank that reaches the run folder late does not take rank 0's args.json for an old run;
  an error of rank 1 reaches the terminal.
- a resume continues the same run: a changed optimisation flag is refused in one line; a new --epochs
  rebuilds the schedule for the new end.
- a data set is checked before any training: malformed JSON, a category id the model does not have and
  missing images are one line each.
- a full disk while saving: one line, exit 1, the previous checkpoint.pth intact.

Runs whose process behaviour matters (launchers) run as subprocesses; the others run ``vidt.main.main``
in this process, which sends itself the signal at a chosen step.
"""
import builtins
import contextlib
import errno
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from test_vidt import PAPER_FLAGS, SMALL_IMAGE_FLAGS, VIDT_DIR, free_port, parse_args

import vidt.engine
import vidt.main
import vkd.checkpoints
import vkd.saver
from vidt.arguments import parse_arguments, resumed_epochs
from vidt.tools.make_synthetic_coco import make_synthetic_coco
from vkd.errors import BadInput
from vkd.preemption import EXIT_PREEMPTED
from vkd.progress import Progress

REPO_ROOT = VIDT_DIR.parent
WORKER = REPO_ROOT / "tests" / "vidt_launch_worker.py"
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 4 training images in batches of 1


class KilledBySignal(Exception):
    """What SIGTERM does to this test process while no StopRequest holds it (instead of ending pytest)."""


@pytest.fixture(autouse=True)
def sigterm_raises():
    def killed(number, frame):
        raise KilledBySignal(signal.Signals(number).name)

    previous = signal.signal(signal.SIGTERM, killed)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), num_train=4, num_val=2, size=(160, 128))


def run_flags(coco_root, output_dir, *extra):
    return [*PAPER_FLAGS, *SMALL_IMAGE_FLAGS, "--backbone_name", "swin_nano", "--batch_size", "1", "--epochs",
            str(EPOCHS), "--coco_path", str(coco_root), "--output_dir", str(output_dir), *map(str, extra)]


def run_here(argv):
    """``vidt.main.main(argv)`` in this process with one thread; returns (exit code, stdout, stderr)."""
    printing, threads = builtins.print, torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            vidt.main.main([str(item) for item in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        builtins.print = printing  # main() silences print() on ranks other than 0
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def signal_after(monkeypatch, header, done):
    """SIGTERM to this process right after the first progress line '<header> [<done>/...]'."""
    sent = []

    class SignallingProgress(Progress):
        def update(self, count, fields=""):
            super().update(count, fields)
            if self.header == header and count == done and not sent:
                sent.append(count)
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vidt.engine, "Progress", SignallingProgress)


def load(path):
    return torch.load(path, weights_only=True)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


def assert_same_run(run_dir, reference_dir):
    """The same final weights, optimizer state and log lines, bit for bit."""
    actual, expected = load(run_dir / "checkpoint.pth"), load(reference_dir / "checkpoint.pth")
    assert actual["epoch"] == expected["epoch"] == EPOCHS - 1 and "mid_epoch" not in actual
    assert actual["model"].keys() == expected["model"].keys()
    assert all(torch.equal(actual["model"][k], v) for k, v in expected["model"].items())
    moments = [(a["exp_avg"], e["exp_avg"]) for a, e in zip(actual["optimizer"]["state"].values(),
                                                           expected["optimizer"]["state"].values())]
    assert moments and all(torch.equal(a, e) for a, e in moments)
    assert read_log(run_dir) == read_log(reference_dir)


@pytest.fixture(scope="module")
def reference(coco_root, tmp_path_factory):
    """An uninterrupted two-epoch run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out, err = run_here(run_flags(coco_root, run_dir))
    assert code == 0, out[-2000:] + err[-2000:]
    return run_dir


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_auto_ends_like_an_uninterrupted_run(coco_root, reference, tmp_path,
                                                                          monkeypatch):
    run_dir = tmp_path / "run"
    signal_after(monkeypatch, "Epoch: [1]", 1)
    code, out, err = run_here(run_flags(coco_root, run_dir))
    assert code == EXIT_PREEMPTED, out[-2000:] + err[-2000:]
    assert err.startswith("stopped: preempted at epoch 1 step 1 (pid ") and err.count("\n") == 1
    assert "--resume auto" in err
    saved = load(run_dir / "checkpoint.pth")
    assert saved["epoch"] == 0 and (saved["mid_epoch"]["epoch"], saved["mid_epoch"]["step"]) == (1, 1)
    [partial] = saved["mid_epoch"]["ranks"]
    assert partial["counts"]["loss"] == 1 and set(partial["rng"]) >= {"torch", "numpy", "python"}
    assert [line["epoch"] for line in read_log(run_dir)] == [0]

    monkeypatch.setattr(vidt.engine, "Progress", Progress)
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto"))
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"Epoch: [1] [2/{STEPS_PER_EPOCH}]" in out and f"Epoch: [1] [1/{STEPS_PER_EPOCH}]" not in out
    assert "Epoch: [0]" not in out  # no finished step is redone
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigterm_during_evaluation_keeps_the_epoch_then_stops(coco_root, reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    signal_after(monkeypatch, "Test:", 1)
    code, out, err = run_here(run_flags(coco_root, run_dir))
    assert code == EXIT_PREEMPTED, out[-2000:] + err[-2000:]
    assert err.startswith("stopped: preempted at the end of epoch 0 (pid ") and err.count("\n") == 1
    assert "Test: [2/2]" in out and "Epoch: [1]" not in out  # the evaluation finished; no epoch began
    assert [line["epoch"] for line in read_log(run_dir)] == [0]
    saved = load(run_dir / "checkpoint.pth")
    assert saved["epoch"] == 0 and "mid_epoch" not in saved

    monkeypatch.setattr(vidt.engine, "Progress", Progress)
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto"))
    assert code == 0, out[-2000:] + err[-2000:]
    assert_same_run(run_dir, reference)


# ---------------------------------------------------------------------------------------------
# Resume means the same run
# ---------------------------------------------------------------------------------------------

def cosine_lr(epoch, epochs, base=1e-4, floor=1e-7):
    """The lr epoch ``epoch`` trains at (one epoch behind the cosine, as the original steps it)."""
    t = max(epoch - 1, 0)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / epochs))


@pytest.mark.slow
def test_more_epochs_rebuild_the_schedule_for_the_new_end(coco_root, reference, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto", "--epochs", 4))
    assert code == 0, out[-2000:] + err[-2000:]
    assert ("| --epochs 4: the run was planned for 2 epochs; from epoch 2 on, the lr follows the warmupcos schedule "
            "of a 4-epoch run (epoch 2 at lr 8.54e-05)") in out
    # The epochs of a fresh 4-epoch run that come after the resume point: 8.5e-5 then 5e-5.
    assert [line["train_lr"] for line in read_log(run_dir)] == pytest.approx(
        [cosine_lr(0, 2), cosine_lr(1, 2), cosine_lr(2, 4), cosine_lr(3, 4)], rel=1e-9)
    assert cosine_lr(2, 4) == pytest.approx(8.536e-5, rel=1e-3) and cosine_lr(3, 4) == pytest.approx(5.005e-5, rel=1e-3)
    last = json.loads((run_dir / "args.json").read_text())["invocations"][-1]
    assert last["changes"] == {"epochs": {"from": 2, "to": 4}} and last["start_epoch"] == 2


def test_a_resume_leaves_the_arguments_as_asked(coco_root, reference, tmp_path, monkeypatch):
    """The run folder, the file --resume auto found and the epoch the run goes on from are derived, not written
    into the arguments: what the run was asked stays as parsed."""
    run_dir = copy_of(reference, tmp_path)
    parsed = []

    def parse_and_keep(argv):
        args, origins = parse_arguments(argv)
        parsed.append((args, dict(vars(args))))
        return args, origins

    monkeypatch.setattr(vidt.main, "parse_arguments", parse_and_keep)
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto"))
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"| resumed from {run_dir / 'checkpoint.pth'}" in out and "Epoch:" not in out  # nothing left to train
    [(args, asked)] = parsed
    assert vars(args) == asked
    assert (args.resume, args.start_epoch, args.output_dir, args.world_size) == ("auto", 0, str(run_dir), 1)
    assert json.loads((run_dir / "args.json").read_text())["invocations"][-1]["start_epoch"] == EPOCHS


def test_a_changed_lr_is_refused_and_the_way_named_works(coco_root, reference, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    checkpoint = run_dir / "checkpoint.pth"
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto", "--lr", "2e-4"))
    assert code == 2
    assert err == (f"error: --lr 0.0002 but {checkpoint} was trained with 0.0001: a resume continues the same run; "
                   f"to train its weights with other settings, start a new run: --student_ckpt {checkpoint} "
                   f"--output_dir NEW\n")
    assert len(json.loads((run_dir / "args.json").read_text())["invocations"]) == 1  # nothing written

    new_dir = tmp_path / "new"
    code, out, err = run_here(run_flags(coco_root, new_dir, "--student_ckpt", checkpoint, "--lr", "2e-4",
                                        "--epochs", 1))
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"| a new run from the weights of {checkpoint}: new optimizer and schedule from epoch 0" in out
    assert [line["train_lr"] for line in read_log(new_dir)] == pytest.approx([2e-4])


@pytest.mark.parametrize("flags, saved, message", [
    ([], {"world_size": 2}, "ckpt was trained on 2 process(es), this resume has 1: a resume continues the same run"),
    (["--min-lr", "1e-6"], {"min_lr": 1e-7}, "--min-lr 1e-06 but ckpt was trained with 1e-07"),
    (["--batch_size", "4"], {"batch_size": 2}, "--batch_size 4 but ckpt was trained with 2"),
    (["--sched", "step"], {"sched": "warmupcos"}, "--sched step but ckpt was trained with warmupcos"),
    (["--lr_drop", "10"], {"lr_drop": 40}, "--lr_drop 10 but ckpt was trained with 40"),
    (["--warmup-epochs", "1"], {"warmup_epochs": 0}, "--warmup-epochs 1 but ckpt was trained with 0"),
    (["--weight_decay", "0.05"], {"weight_decay": 1e-4}, "--weight_decay 0.05 but ckpt was trained with 0.0001"),
])
def test_each_run_defining_flag_is_compared(flags, saved, message):
    with pytest.raises(BadInput, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as raised:
        resumed_epochs(parse_args(*flags), {"args": dict(saved, epochs=50)}, 1, "ckpt")
    assert str(raised.value).endswith("start a new run: --student_ckpt ckpt --output_dir NEW")
    assert resumed_epochs(parse_args(*flags), {"args": {"epochs": 50}}, 1, "ckpt") is None  # flags the file lacks pass


def test_the_processes_that_trained_a_file_are_its_world_size_else_its_arguments():
    """Our files keep the number of processes beside the arguments as asked (--world_size 1 lets the launcher
    decide); files written before hold the launcher's count in their arguments."""
    two_processes = {"world_size": 2, "args": {"world_size": 1, "epochs": 50}}
    assert resumed_epochs(parse_args(), two_processes, 2, "ckpt") is None
    with pytest.raises(BadInput, match="^ckpt was trained on 2 process"):
        resumed_epochs(parse_args(), two_processes, 1, "ckpt")
    written_before = {"args": {"world_size": 2, "epochs": 50}}
    assert resumed_epochs(parse_args(), written_before, 2, "ckpt") is None
    with pytest.raises(BadInput, match="^ckpt was trained on 2 process"):
        resumed_epochs(parse_args(), written_before, 1, "ckpt")


# ---------------------------------------------------------------------------------------------
# The data set is checked before any training
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def own_coco(tmp_path):
    return make_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2, size=(160, 128))


def edit_annotations(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_malformed_annotation_json_is_one_line(own_coco, tmp_path):
    path = own_coco / "annotations" / "instances_val2017.json"
    path.write_text(path.read_text()[:-10])
    code, out, err = run_here(run_flags(own_coco, tmp_path / "run"))
    assert code == 2
    assert err.startswith(f"error: {path} is not valid JSON: ") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "run" / "args.json").exists()


def test_a_category_id_outside_the_model_is_one_line_before_training(own_coco, tmp_path):
    path = own_coco / "annotations" / "instances_train2017.json"
    edit_annotations(path, lambda content: content["annotations"][2].update(category_id=95))
    code, out, err = run_here(run_flags(own_coco, tmp_path / "run"))
    assert code == 2
    assert err == (f"error: {path}: category_id 95 (annotation 3) is not one of the model's 91 classes "
                   f"(0 to 90)\n")
    assert "Start training" not in out


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_images_are_one_line_before_training(own_coco, tmp_path, split):
    folder = own_coco / f"{split}2017"
    first, second = sorted(folder.iterdir())[:2]
    first.unlink()
    second.unlink()
    code, out, err = run_here(run_flags(own_coco, tmp_path / "run", "--num_workers", 2))
    total = 4 if split == "train" else 2
    assert code == 2
    assert err == (f"error: {first}, listed in {own_coco / 'annotations' / f'instances_{split}2017.json'}, does not "
                   f"exist; 2 of its {total} images are missing\n")
    assert "Start training" not in out


# ---------------------------------------------------------------------------------------------
# A full disk while saving
# ---------------------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint(coco_root, reference, tmp_path, monkeypatch):
    run_dir = copy_of(reference, tmp_path)
    before = (run_dir / "checkpoint.pth").read_bytes()
    save = torch.save

    def disk_full_for_the_checkpoint(obj, handle, *args, **kwargs):
        if os.path.basename(getattr(handle, "name", "")).startswith(".checkpoint.pth.tmp"):
            handle.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_for_the_checkpoint)
    code, out, err = run_here(run_flags(coco_root, run_dir, "--resume", "auto", "--epochs", 3))
    assert code == 1, out[-2000:] + err[-2000:]
    assert err.startswith(f"error: no space left in {run_dir} to write checkpoint.pth (") and err.count("\n") == 1
    assert "the previous checkpoint.pth was kept" in err
    assert (run_dir / "checkpoint.pth").read_bytes() == before
    assert not [path.name for path in run_dir.iterdir() if ".tmp" in path.name]


def test_a_folder_too_small_for_two_checkpoints_is_refused_before_training(coco_root, tmp_path, monkeypatch):
    monkeypatch.setattr(vkd.checkpoints, "_free_bytes", lambda folder: 2 ** 20)
    code, out, err = run_here(run_flags(coco_root, tmp_path / "run", "--epochs", 1))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, out[-2000:] + err[-2000:]
    assert "1 MiB free" in err and "2 checkpoints" in err and "Epoch:" not in out


def test_non_finite_weights_are_not_saved_and_leave_no_log_line(coco_root, tmp_path, monkeypatch):
    monkeypatch.setattr(vkd.saver, "all_finite", lambda state_dict: False)
    run_dir = tmp_path / "run"
    code, out, err = run_here(run_flags(coco_root, run_dir, "--epochs", 1))
    assert code == 1 and err == ("error: the weights became non-finite after 1 epoch(s); checkpoint.pth was "
                                 "left as it was\n"), out[-2000:] + err[-2000:]
    assert not (run_dir / "checkpoint.pth").exists() and not (run_dir / "log.txt").exists()


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------

def launch_worker(argv, timeout=240, **env):
    """tests/vidt_launch_worker.py under torch.distributed.launch, two processes, from the repository root;
    stdout and stderr together."""
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--nnodes=1", "--use_env",
               f"--master_port={free_port()}", str(WORKER), *map(str, argv)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_that_reaches_the_run_folder_late_joins_the_run(coco_root, tmp_path):
    """Rank 1 looks at the run folder seconds after rank 0 (a slow node): it must not take the args.json
    that rank 0 writes meanwhile for an earlier run."""
    run_dir = tmp_path / "run"
    result = launch_worker(run_flags(coco_root, run_dir, "--epochs", 1), VIDT_RANK1_DELAY_S="4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "already holds a run" not in result.stdout
    saved = load(run_dir / "checkpoint.pth")
    assert (saved["world_size"], saved["args"]["world_size"]) == (2, 1)  # the processes, and the flag as asked


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_error_of_rank_1_reaches_the_terminal(coco_root, tmp_path):
    incomplete = shutil.copytree(coco_root, tmp_path / "incomplete_coco")
    missing = incomplete / "val2017" / "000000000002.jpg"
    missing.unlink()
    result = launch_worker([*run_flags(coco_root, tmp_path / "run", "--epochs", 1), "--dist_timeout", "1"],
                           timeout=180, VIDT_RANK1_COCO=str(incomplete))
    assert result.returncode != 0
    assert (f"error: {missing}, listed in {incomplete / 'annotations' / 'instances_val2017.json'}, does not exist; "
            f"1 of its 2 images are missing") in result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_continues_there(coco_root, tmp_path):
    run_dir = tmp_path / "run"
    flags = run_flags(coco_root, run_dir, "--epochs", 1)  # 4 images over 2 processes: 2 steps each
    result = launch_worker(flags, VIDT_RANK1_SIGTERM_AFTER="0 1")
    assert result.stdout.count("stopped: preempted at epoch 0 step 1 (pid ") == 2, result.stdout[-3000:]
    saved = load(run_dir / "checkpoint.pth")
    assert saved["mid_epoch"]["step"] == 1 and len(saved["mid_epoch"]["ranks"]) == 2

    resumed = launch_worker([*flags, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Epoch: [0] [2/2]" in resumed.stdout and "Epoch: [0] [1/2]" not in resumed.stdout
    assert "mid_epoch" not in load(run_dir / "checkpoint.pth")
