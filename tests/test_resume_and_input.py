"""A resume is the same run (a changed optimisation flag is refused in one line; a new --epochs is honoured
exactly), a full disk is one line with the last checkpoint kept, a folder linked back into itself is refused,
and YAML values must have their flag's type."""
import errno
import json
import os

import pytest
from conftest import TEACHER

import checkpoint
import vkd.checkpoints
from config import check_arguments, parse_arguments
from vkd.data import folders
from vkd.errors import BadInput, DatasetError
from vkd.runs import ARGS_FILE


@pytest.fixture
def run_flags(data_flags, tiny_teacher_file):
    """A cosine run with warm-up on the tiny data (18 images, batches of 4: 4 steps an epoch)."""
    return data_flags + ["--teacher", TEACHER, "--teacher-path", tiny_teacher_file, "--unscale-lr", "--lr", "1e-3",
                         "--min-lr", "1e-5", "--warmup-epochs", "1", "--warmup-lr", "1e-5"]


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("changed, named", [
    (["--batch-size", "2"], "--batch-size 2 but"),
    (["--lr", "1e-2", "--weight-decay", "0.5"], "--lr 0.01 but"),
    (["--min-lr", "1e-6"], "--min-lr 1e-06 but"),
])
def test_a_resume_that_changes_the_optimisation_is_refused_in_one_line(run_main, run_flags, tmp_path, changed, named):
    output_dir = tmp_path / "run"
    assert run_main(run_flags + ["--epochs", "1", "--output_dir", output_dir])[0] == 0
    before = (output_dir / "latest.pth.tar").read_bytes()
    code, out, err = run_main(run_flags + ["--epochs", "2", "--output_dir", output_dir, "--resume", "auto", *changed])
    line = one_error_line(err)
    assert code == 2 and named in line and "--student-ckpt" in line
    assert (output_dir / "latest.pth.tar").read_bytes() == before


def test_a_resume_on_another_number_of_processes_is_refused(run_main, run_flags, tmp_path):
    output_dir = tmp_path / "run"
    assert run_main(run_flags + ["--epochs", "1", "--output_dir", output_dir])[0] == 0
    args, _ = parse_arguments([str(item) for item in run_flags + ["--output_dir", output_dir]])
    trainer = checkpoint.TrainingState(args, 2, None, None, None, None, None)
    saved = vkd.checkpoints.safe_torch_load(str(output_dir / "latest.pth.tar"))
    with pytest.raises(BadInput, match=r"trained on 1 process\(es\), this resume has 2"):
        trainer._refuse_a_different_run(saved, "latest.pth.tar")


@pytest.mark.slow
def test_extending_epochs_follows_the_schedule_of_the_longer_run(run_main, run_flags, tmp_path):
    fresh, extended = tmp_path / "fresh", tmp_path / "extended"
    assert run_main(run_flags + ["--epochs", "4", "--output_dir", fresh])[0] == 0
    assert run_main(run_flags + ["--epochs", "2", "--output_dir", extended])[0] == 0
    code, out, _ = run_main(run_flags + ["--epochs", "4", "--output_dir", extended, "--resume", "auto"])
    assert code == 0 and "the run was planned for 2 epochs" in out
    fresh_lr = [record["train_lr"] for record in read_log(fresh)]
    extended_lr = [record["train_lr"] for record in read_log(extended)]
    assert extended_lr[2:] == pytest.approx(fresh_lr[2:], rel=1e-12)
    assert extended_lr[2] > 1.01e-5  # not stuck at --min-lr, as when the old 2-epoch curve was restored
    with open(extended / ARGS_FILE) as handle:
        assert json.load(handle)["invocations"][-1]["changes"] == {"epochs": {"from": 2, "to": 4}}


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(run_main, run_flags, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    assert run_main(run_flags + ["--epochs", "1", "--output_dir", output_dir])[0] == 0
    before = (output_dir / "latest.pth.tar").read_bytes()

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vkd.checkpoints.torch, "save", disk_full)
    code, _, err = run_main(run_flags + ["--epochs", "2", "--output_dir", output_dir, "--resume", "auto"])
    line = one_error_line(err)
    assert code == 1 and f"no space left in {output_dir}" in line and "MiB free" in line
    assert (output_dir / "latest.pth.tar").read_bytes() == before
    assert not [name for name in os.listdir(output_dir) if ".tmp." in name]


def test_a_folder_too_small_for_two_checkpoints_is_refused_before_training(run_main, run_flags, tmp_path, monkeypatch):
    monkeypatch.setattr(vkd.checkpoints, "_free_bytes", lambda folder: 2 ** 20)
    code, out, err = run_main(run_flags + ["--epochs", "1", "--output_dir", tmp_path / "run"])
    line = one_error_line(err)
    assert code == 2 and "1 MiB free" in line and "2 checkpoints" in line and "Epoch:" not in out


def test_a_folder_linked_back_into_itself_is_refused(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.png").write_bytes(b"")
    os.symlink(".", root / "val" / "cat" / "again")
    with pytest.raises(DatasetError, match="again leads to"):
        folders.split_and_classes(str(root), is_train=True)
    os.remove(root / "val" / "cat" / "again")
    os.symlink("..", root / "train" / "cat" / "up")
    with pytest.raises(DatasetError, match="up leads to"):
        folders.split_and_classes(str(root), is_train=True)


@pytest.mark.parametrize("yaml_text, expected", [
    ("student-ema: 'false'", "expected true or false"),
    ("projector-weight-decay: 'False'", "expected true or false"),
    ("unscale-lr: 'no'", "expected true or false"),
    ("lr: true", "expected a number"),
    ("epochs: 2.5", "expected an integer"),
    ("batch-size: 4.5", "expected an integer"),
    ("opt-betas: 0.9", "expected a list"),
    ("opt-betas: [0.9]", "a list of 2 values"),
    ("seed: null", "null is not a value"),
    ("batch-size: [16, 32]", "expected one value"),
    ("base: [a.yaml]", "base must be one file name"),
    ("lr: 1.0e-3\nlr: 2.0e-3", "key 'lr' appears twice"),
])
def test_a_yaml_value_of_the_wrong_type_is_one_error_naming_the_file_and_key(tmp_path, yaml_text, expected):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml_text + "\n")
    with pytest.raises(BadInput, match=expected) as error:
        check_arguments(*parse_arguments(["--config", str(config)]))
    assert str(config) in str(error.value)


def test_yaml_values_of_the_right_type_are_taken(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("student-ema: true\nlr: 5e-4\nopt-betas: [0.9, 0.95]\nepochs: 3\n")
    args, _ = parse_arguments(["--config", str(config)])
    assert (args.student_ema, args.lr, args.opt_betas, args.epochs) == (True, 5e-4, [0.9, 0.95], 3)


def test_a_resume_reads_its_checkpoint_once_and_refuses_another_run_before_loading_weights(monkeypatch, run_main,
                                                                                           run_flags, tmp_path):
    import checkpoint
    code, _, err = run_main(run_flags + ["--output_dir", tmp_path, "--epochs", 1])
    assert code == 0, err
    reads, loads = [], []
    real_load, real_student_load = checkpoint.safe_torch_load, checkpoint.load_student_checkpoint
    monkeypatch.setattr(checkpoint, "safe_torch_load", lambda path, *a: reads.append(path) or real_load(path, *a))
    monkeypatch.setattr(checkpoint, "load_student_checkpoint",
                        lambda *a, **k: loads.append(a[1]) or real_student_load(*a, **k))
    code, _, err = run_main(run_flags + ["--output_dir", tmp_path, "--epochs", 2, "--resume", "auto", "--lr", "2e-3"])
    assert code == 2 and "--lr 0.002 but" in err and loads == [] and len(reads) == 1, err
    code, _, err = run_main(run_flags + ["--output_dir", tmp_path, "--epochs", 2, "--resume", "auto"])
    assert code == 0 and len(reads) == 2 and len(loads) == 1, err
