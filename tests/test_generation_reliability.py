"""Generation runs survive the cluster and a person's slips: a stop signal ends a run at an iteration
boundary with latest.pth written (exit 124) and ``--resume auto`` ends with the weights of an uninterrupted
run; Ctrl-C is one line (130); a resume with flags that would train differently is refused in one line
(only --iterations may grow); a bad path, value, weights file or config is one line (exit 2); a full disk
is one line (exit 1) that keeps the previous latest.pth."""
import errno
import glob
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import write_idx
from test_preemption import interrupted

import vkd.checkpoints
from generation import main as gan_main
from generation.arguments import RUN_DEFINING_FLAGS, parse_arguments
from generation.checkpointing import refuse_another_run
from generation.engine import GanStep
from vkd.checkpoints import safe_torch_load
from vkd.errors import BadInput
from vkd.preemption import EXIT_PREEMPTED

SAVE_EVERY = 4


@pytest.fixture(autouse=True, scope="module")  # module scope: the module's reference runs use it too
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical CPU results, and the machines running the tests are small
    yield
    torch.set_num_threads(threads)


def write_fashion(root, train_count: int) -> str:
    """Fashion-MNIST's four IDX files with ``train_count`` train and 20 test random images of 10 classes."""
    generator = np.random.RandomState(0)
    for split, count in (("train", train_count), ("t10k", 20)):
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte"), generator.randint(0, 256, (count, 28, 28)),
                  compress=True)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), np.arange(count) % 10, compress=True)
    return str(root)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> str:
    return write_fashion(tmp_path_factory.mktemp("fashion"), 60)


def flags(data_path, output_dir, iterations, *extra):
    """A tiny run without teacher or FID (LeCam on, so its averages are resumed too); 60 images in batches
    of 8 and 2 D steps: the data stream starts a new epoch every 3.5 iterations."""
    return ["--dataset", "FASHION", "--data-path", str(data_path), "--g-ch", "2", "--d-ch", "2", "--dim-z", "8",
            "--batch-size", "8", "--num-d-steps", "2", "--iterations", str(iterations), "--ema-start", "1",
            "--ema-decay", "0.5", "--lecam-weight", "0.3", "--lecam-start", "1", "--fid-extractor", "none",
            "--save-every", str(SAVE_EVERY), "--sample-every", "1000", "--print-freq", "1", "--device", "cpu",
            "--output-dir", str(output_dir), "--resume", "auto", *map(str, extra)]


def run(argv) -> int:
    try:
        gan_main.main(argv)
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def run_main(argv, capsys):
    code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, code: int, expected_code: int, label: str = "error") -> str:
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith(f"{label}: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


def latest(output_dir) -> dict:
    return safe_torch_load(os.path.join(output_dir, "latest.pth"))


def assert_same_training_state(expected: dict, actual: dict) -> None:
    assert actual["iteration"] == expected["iteration"]
    for part in ("G", "D", "G_ema"):
        assert expected[part].keys() == actual[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(value, actual[part][key]), (part, key)
    for part in ("g_optimizer", "d_optimizer"):
        for index, state in expected[part]["state"].items():
            assert all(torch.equal(value, actual[part]["state"][index][name]) for name, value in state.items())
    assert actual["lecam"] == expected["lecam"] and actual["real_batches"] == expected["real_batches"]
    assert len(actual["rng"]) == len(expected["rng"])  # each rank's generators
    for saved, wanted in zip(actual["rng"], expected["rng"]):
        assert torch.equal(saved["torch"], wanted["torch"]) and torch.equal(saved["numpy"][1], wanted["numpy"][1])


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def straight_run(fashion, tmp_path_factory):
    """The reference: 7 iterations from start to end."""
    output_dir = tmp_path_factory.mktemp("straight")
    assert run(flags(fashion, output_dir, 7)) == 0
    return output_dir


# ============================================================================ stop signals

@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_writes_latest_at_the_next_iteration_and_resume_auto_matches_an_uninterrupted_run(
        fashion, straight_run, tmp_path, capsys, monkeypatch, signal_number):
    def not_handled(number, frame):  # instead of the default action, which would end pytest too
        raise AssertionError(f"{signal.Signals(number).name} reached the default handler: training ignores it")

    iteration_of = GanStep.iteration

    def signalled_during_the_third(step, real_batches, iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal_number)
        return iteration_of(step, real_batches, iteration)

    output_dir = tmp_path / "run"
    previous = signal.signal(signal_number, not_handled)
    monkeypatch.setattr(GanStep, "iteration", signalled_during_the_third)
    try:
        code, out, err = run_main(flags(fashion, output_dir, 7), capsys)
    finally:
        signal.signal(signal_number, previous)
    monkeypatch.undo()
    line = one_line(err, code, EXIT_PREEMPTED, "stopped")
    assert line.startswith("stopped: preempted at iteration 3 (pid ") and line.endswith("--resume auto"), line
    assert "Iteration [3/7]" in out and "Iteration [4/7]" not in out
    assert latest(output_dir)["iteration"] == 3  # not a --save-every iteration: written for the stop
    assert not glob.glob(str(output_dir / ".latest.pth.tmp.*"))

    code, out, err = run_main(flags(fashion, output_dir, 7), capsys)
    assert code == 0, err
    assert "at iteration 3" in out and "Iteration [4/7]" in out and "Iteration [3/7]" not in out
    assert_same_training_state(latest(straight_run), latest(output_dir))
    assert read_log(output_dir) == read_log(straight_run)


@pytest.mark.slow
def test_sigterm_from_outside_stops_with_exit_124_and_the_run_resumes_bit_for_bit(fashion, tmp_path, capsys):
    iterations = 60  # long enough that the signal lands well before the end (a few seconds)
    reference, output_dir = tmp_path / "reference", tmp_path / "run"
    assert run(flags(fashion, reference, iterations)) == 0
    command = [sys.executable, "-m", "generation.main"] + flags(fashion, output_dir, iterations)
    code, output = interrupted(command, output_dir, r"^Iteration \[2/", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if line.startswith("stopped: ")]
    stopped_at = latest(output_dir)["iteration"]
    assert 2 <= stopped_at < iterations and f"preempted at iteration {stopped_at} (pid" in line
    assert f"Iteration [{stopped_at}/{iterations}]" in output
    assert f"Iteration [{stopped_at + 1}/{iterations}]" not in output  # it stopped at the boundary it reached

    capsys.readouterr()
    assert run(flags(fashion, output_dir, iterations)) == 0
    assert f"at iteration {stopped_at}" in capsys.readouterr().out
    assert_same_training_state(latest(reference), latest(output_dir))
    assert read_log(output_dir) == read_log(reference)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130_keeping_the_last_checkpoint(fashion, tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "generation.main"] + flags(fashion, output_dir, 200)
    code, output = interrupted(command, output_dir, rf"^Iteration \[{SAVE_EVERY + 1}/", signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and output.count("stopped: interrupted") == 1
    assert latest(output_dir)["iteration"] % SAVE_EVERY == 0 and latest(output_dir)["iteration"] >= SAVE_EVERY
    assert not glob.glob(str(output_dir / ".latest.pth.tmp.*"))


# ============================================================================ a resume is the same run

@pytest.fixture(scope="module")
def saved_run(fashion, tmp_path_factory):
    """A finished 2-iteration run; its latest.pth is at position 4 of the data's 7 batches per epoch."""
    output_dir = tmp_path_factory.mktemp("saved")
    assert run(flags(fashion, output_dir, 2, "--save-every", 1)) == 0
    return output_dir


def copy_of(saved_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(saved_run, output_dir)
    return output_dir


@pytest.mark.parametrize("changed, named", [
    (["--batch-size", 30], ("--batch-size 30 but", "trained with 8:")),  # once: empty batches, a non-finite loss
    (["--g-lr", "1e-3"], ("--g-lr 0.001 but", "trained with 0.0002:")),
    (["--d-lr", "1e-3"], ("--d-lr 0.001 but", "trained with 0.0002:")),
    (["--adam-betas", 0.5, 0.9], ("--adam-betas 0.5 0.9 but", "trained with 0.0 0.999:")),
    (["--num-d-steps", 3], ("--num-d-steps 3 but", "trained with 2:")),
    (["--iterations", 1], ("--iterations 1 but", "trained with 2:")),
    (["--ema-decay", 0.9], ("--ema-decay 0.9 but", "trained with 0.5:")),
    (["--ema-start", 5], ("--ema-start 5 but", "trained with 1:")),
    (["--lecam-weight", 0], ("--lecam-weight 0.0 but", "trained with 0.3:")),
    (["--diffaug", "translation"], ("--diffaug translation but", "trained with translation,cutout:")),
    (["--data-fraction", 0.5], ("--data-fraction 0.5 but", "trained with 1.0:")),
    (["--subset-draw", "balanced"], ("--subset-draw balanced but", "trained with uniform:")),
    (["--no-hflip"], ("--hflip False but", "trained with True:")),
    (["--seed", 1], ("--seed 1 but", "trained with 0:")),
])
def test_a_resume_with_flags_that_train_differently_is_refused_in_one_line(fashion, saved_run, tmp_path, capsys,
                                                                           changed, named):
    output_dir = copy_of(saved_run, tmp_path)
    before = (output_dir / "latest.pth").read_bytes()
    code, out, err = run_main(flags(fashion, output_dir, 2, *changed), capsys)
    line = one_line(err, code, 2)
    assert all(part in line for part in named) and "start a new run" in line and "--output-dir" in line, line
    assert (output_dir / "latest.pth").read_bytes() == before
    assert "Iteration" not in out  # refused before any work


def test_a_changed_flag_in_the_config_file_is_refused_too(fashion, saved_run, tmp_path, capsys):
    output_dir = copy_of(saved_run, tmp_path)
    config = tmp_path / "bigger.yaml"
    config.write_text("batch-size: 30\n")
    argv = flags(fashion, output_dir, 2)
    del argv[argv.index("--batch-size"):argv.index("--batch-size") + 2]  # the file's value, not the flag's
    code, _, err = run_main(argv + ["--config", str(config)], capsys)
    line = one_line(err, code, 2)
    assert "--batch-size 30 but" in line and "trained with 8:" in line, line


def test_another_number_of_processes_is_refused():
    args = parse_arguments(["--iterations", "5"])
    checkpoint = {"args": dict(vars(args)), "processes": 2}
    with pytest.raises(BadInput, match=r"trained on 2 process\(es\), this resume has 1.*start a new run"):
        refuse_another_run(args, checkpoint, "latest.pth", processes=1)
    assert refuse_another_run(args, checkpoint, "latest.pth", processes=2) is None


# What may change on a resume: where the files are, how often to print, save, sample and evaluate, and the
# evaluation itself. Every other flag is run-defining: a new flag must be put on one side.
MAY_CHANGE_ON_RESUME = {
    "config", "data_path", "download", "teacher_path", "device", "output_dir", "resume", "overwrite", "print_freq",
    "save_every", "sample_every", "local_rank", "dist_url", "dist_timeout", "fid_extractor", "fid_weights",
    "fid_model", "fid_input_size", "fid_reference", "eval_samples", "eval_every", "is_splits", "eval_checkpoint",
    "eval_repeats", "iterations"}


def test_every_flag_either_defines_the_run_or_may_change_on_resume():
    defining = {flag.lstrip("-").replace("-", "_") for flag in RUN_DEFINING_FLAGS}
    every = set(vars(parse_arguments([])))
    assert defining | MAY_CHANGE_ON_RESUME == every and not defining & MAY_CHANGE_ON_RESUME


def test_where_the_files_are_and_how_often_to_save_may_change(tmp_path):
    args = parse_arguments(["--iterations", "5", "--download", "--save-every", "7", "--device", "cpu"])
    saved = dict(vars(parse_arguments(["--iterations", "5", "--save-every", "3", "--output-dir", str(tmp_path)])))
    assert refuse_another_run(args, {"args": saved, "processes": 1}, "latest.pth", processes=1) is None
    assert refuse_another_run(parse_arguments(["--iterations", "9"]), {"args": saved}, "latest.pth", processes=1) == 5


def test_other_data_under_the_same_flags_is_refused(saved_run, tmp_path, capsys):
    output_dir = copy_of(saved_run, tmp_path)
    smaller = write_fashion(tmp_path / "smaller", 40)
    code, _, err = run_main(flags(smaller, output_dir, 2), capsys)
    line = one_line(err, code, 2)
    assert "was trained on 60 images, the data here gives 40" in line and "--data-path" in line


def test_a_longer_run_is_honoured_announced_and_recorded(fashion, saved_run, tmp_path, capsys):
    output_dir = copy_of(saved_run, tmp_path)
    code, out, err = run_main(flags(fashion, output_dir, 3, "--print-freq", 5, "--sample-every", 7), capsys)
    assert code == 0, err
    assert "--iterations 3 extends the run's 2 iterations" in out and "Iteration [3/3]" in out
    recorded = json.loads((output_dir / "args.json").read_text())
    assert recorded["invocations"][-1]["changes"] == {"iterations": {"from": 2, "to": 3}}
    assert latest(output_dir)["iteration"] == 3 and latest(output_dir)["args"]["iterations"] == 3
    code, out, err = run_main(flags(fashion, output_dir, 3), capsys)  # now the run's own length
    assert code == 0 and "Nothing to train" in out, err


# ============================================================================ bad input: one line, exit 2

@pytest.mark.parametrize("dataset", ["DIGITS", "FASHION", "C10"])
def test_a_data_path_naming_a_file_is_one_line(tmp_path, capsys, dataset):
    a_file = tmp_path / "cifar.tar.gz"
    a_file.write_bytes(b"not a folder")
    code, _, err = run_main(["--dataset", dataset, "--data-path", str(a_file), "--fid-extractor", "none",
                             "--device", "cpu", "--output-dir", str(tmp_path / "out")], capsys)
    assert f"--data-path {a_file} is a file" in one_line(err, code, 2)
    assert not (tmp_path / "out").exists()


def test_a_count_that_is_not_a_number_is_one_line(capsys):
    code, _, err = run_main(["--iterations", "many"], capsys)
    line = one_line(err, code, 2)
    assert "--iterations" in line and "'many'" in line and "usage" not in err


def test_the_collective_timeout_is_a_flag_like_the_other_trees_and_must_be_positive(monkeypatch, capsys):
    asked = {}

    def start_processes(device, local_rank, init_method, timeout_minutes):
        asked["timeout"] = timeout_minutes
        raise BadInput("stopped here")

    monkeypatch.setattr(gan_main, "start_processes", start_processes)
    assert run_main(["--dist-timeout", "2.5"], capsys)[0] == 2 and asked == {"timeout": 2.5}
    code, _, err = run_main(["--dist-timeout", "0"], capsys)
    assert one_line(err, code, 2) == "error: --dist-timeout must be > 0 minutes, got 0"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_safetensors_clip_file_is_one_line(fashion, tmp_path, capsys, damage):
    from safetensors.torch import save_file
    path = tmp_path / "open_clip_model.safetensors"
    save_file({"visual.proj": torch.zeros(64, 64)}, str(path))
    path.write_bytes(b"\xff" * 100 if damage == "garbage" else path.read_bytes()[:200])
    code, _, err = run_main(flags(fashion, tmp_path / "out", 1, "--teacher", "clip", "--teacher-path", path), capsys)
    line = one_line(err, code, 2)
    assert f"could not read {path}: not a complete safetensors file" in line, line
    assert not (tmp_path / "out" / "latest.pth").exists()


@pytest.mark.parametrize("content, key", [
    ("batch-size: 4.5\n", "batch-size: expected an integer, got 4.5"),
    ('hflip: "no"\n', "hflip: expected true or false, got 'no'"),
    ("adam-betas: 0.9\n", "adam-betas: expected a list, got 0.9"),
    ("batch-size: 8\ng-lr: 1e-4\nbatch-size: 16\n", "key 'batch-size' appears twice (line 3)"),
])
def test_a_config_key_of_the_wrong_type_is_one_line_before_any_work(fashion, tmp_path, capsys, content, key):
    config = tmp_path / "recipe.yaml"
    config.write_text(content)
    code, out, err = run_main(["--config", str(config)] + flags(fashion, tmp_path / "out", 1), capsys)
    line = one_line(err, code, 2)
    assert f"config {config}: " in line and key in line, line
    assert not (tmp_path / "out").exists() and out == ""


# ============================================================================ a full disk: one line, exit 1

def test_a_folder_too_small_for_two_checkpoints_is_refused_before_training(fashion, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vkd.checkpoints, "_free_bytes", lambda folder: 2 ** 10)
    code, out, err = run_main(flags(fashion, tmp_path / "out", 2), capsys)
    line = one_line(err, code, 2)
    assert "0 MiB free" in line and "2 checkpoints" in line and "Iteration" not in out
    assert not (tmp_path / "out" / "latest.pth").exists()


def test_a_full_disk_at_the_latest_save_is_one_line_keeping_the_previous_file(saved_run, fashion, tmp_path, capsys,
                                                                              monkeypatch):
    output_dir = copy_of(saved_run, tmp_path)
    before = (output_dir / "latest.pth").read_bytes()
    save = torch.save

    def disk_fills_up(obj, handle, *args, **kwargs):
        if ".latest.pth.tmp." in str(getattr(handle, "name", handle)):
            handle.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    code, _, err = run_main(flags(fashion, output_dir, 3), capsys)
    line = one_line(err, code, 1)
    assert f"no space left in {output_dir}" in line and "MiB free" in line and "previous latest.pth was kept" in line
    assert (output_dir / "latest.pth").read_bytes() == before and latest(output_dir)["iteration"] == 2
    assert not glob.glob(str(output_dir / ".latest.pth.tmp.*"))

