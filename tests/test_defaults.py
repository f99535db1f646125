"""Defaults that must not hurt a user: a new run never destroys an old one, VkD is on when asked for, the
teacher is the one named, and bad input is one line that says how to fix it."""
import glob
import json
import os
import time

import pytest
import timm
import torch

import models
from config import check_arguments, parse_arguments
from distillers import distiller_class
from models.loading import load_student_checkpoint
from optim import build_optimizer
from vkd import teachers
from vkd.checkpoints import add_ddp_prefix
from vkd.errors import BadInput, CheckpointError


def read_args_json(folder):
    with open(os.path.join(folder, "args.json")) as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------- run folders

def test_a_second_run_in_the_same_folder_is_refused_and_loses_nothing(run_main, train_flags, tmp_path):
    run_dir = tmp_path / "run"
    code, _, stderr = run_main(train_flags + ["--epochs", 1, "--output_dir", run_dir])
    assert code == 0, stderr
    before = {name: (run_dir / name).read_bytes() for name in ("log.txt", "latest.pth.tar", "args.json")}

    code, _, stderr = run_main(train_flags + ["--epochs", 1, "--output_dir", run_dir])
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_overwrite_moves_the_old_run_aside(run_main, train_flags, tmp_path):
    run_dir = tmp_path / "run"
    assert run_main(train_flags + ["--epochs", 1, "--output_dir", run_dir])[0] == 0
    old_log = (run_dir / "log.txt").read_text()
    code, stdout, stderr = run_main(train_flags + ["--epochs", 1, "--output_dir", run_dir, "--overwrite"])
    assert code == 0, stderr
    [aside] = [path for path in tmp_path.iterdir() if path.name.startswith("run.previous-")]
    assert (aside / "log.txt").read_text() == old_log and (aside / "latest.pth.tar").is_file()
    assert str(aside) in stdout
    assert len(read_args_json(run_dir)["invocations"]) == 1


def test_resume_appends_its_invocation_to_args_json(run_main, train_flags, tmp_path):
    run_dir = tmp_path / "run"
    assert run_main(train_flags + ["--epochs", 1, "--output_dir", run_dir])[0] == 0
    first = read_args_json(run_dir)
    assert run_main(train_flags + ["--epochs", 2, "--output_dir", run_dir, "--resume", "auto"])[0] == 0
    record = read_args_json(run_dir)
    assert record["args"] == first["args"] and record["command"] == first["command"]
    assert [entry["start_epoch"] for entry in record["invocations"]] == [0, 1]
    assert "--epochs" in record["invocations"][1]["command"] and "2" in record["invocations"][1]["command"]
    assert all("git_dirty" in entry and "git_commit" in entry for entry in record["invocations"])


def test_overwrite_cannot_be_combined_with_resume(run_main, train_flags, tmp_path):
    code, _, stderr = run_main(train_flags + ["--output_dir", tmp_path, "--overwrite", "--resume", "auto"])
    assert code == 2 and "--overwrite" in stderr


# ----------------------------------------------------------------------------- the projector under AdamW

def optimizer_step_on_projector(argv, impl):
    """One AdamW step (lr 5e-4, decay 0.05, as the paper's recipe) of a student's projector, built by the
    real optimizer builder from parsed flags."""
    args, _ = parse_arguments(argv + ["--projector-impl", impl])
    torch.manual_seed(0)
    student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32, teacher_dim=256,
                                    projector_impl=impl)
    decay_projector = distiller_class(args.distiller).decays_projector(args)  # as main_distributed.py
    optimizer = build_optimizer(args, student, lr=args.lr, decay_projector=decay_projector)
    student.projector(torch.randn(4, 192)).square().sum().backward()
    optimizer.step()
    return student.projector.weight.detach()


@pytest.mark.parametrize("impl", ["torch", "fast"])
def test_default_optimizer_keeps_the_projector_an_isometry(impl):
    weight = optimizer_step_on_projector([], impl)
    torch.testing.assert_close(weight.T @ weight, torch.eye(192), atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "fast"])
def test_projector_weight_decay_flag_reproduces_the_original_collapse(impl):
    weight = optimizer_step_on_projector(["--projector-weight-decay"], impl)
    assert weight.abs().max() == 0


def test_original_recipe_config_sets_the_projector_weight_decay():
    args, _ = parse_arguments(["--config", "configs/deit_ti_vkd_original.yaml"])
    assert args.projector_weight_decay is True
    assert parse_arguments(["--config", "configs/deit_ti_vkd.yaml"])[0].projector_weight_decay is False


SHIPPED_CONFIGS = [path for path in sorted(glob.glob("configs/*.yaml") + glob.glob("configs/*/*.yaml"))
                   if not path.startswith("configs/generation/") and not path.endswith("common.yaml")]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_every_shipped_classification_config_is_accepted(path):
    args, explicit = parse_arguments(["--config", path])
    check_arguments(args, explicit)
    assert args.config == path


# ----------------------------------------------------------------------------- the teacher

def test_regnety_160_means_deits_teacher():
    assert teachers.pretrained_name("regnety_160") == "regnety_160.deit_in1k"
    assert teachers.pretrained_name("regnety_160.sw_in12k_ft_in1k") == "regnety_160.sw_in12k_ft_in1k"
    assert teachers.pretrained_name("resnet18") == "resnet18"


def test_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path):
    from huggingface_hub import constants as hub
    monkeypatch.setattr(hub, "ENDPOINT", "https://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    started = time.monotonic()
    with pytest.raises(teachers.TeacherError, match=r"regnety_160\.deit_in1k.*--teacher-path"):
        teachers.create_teacher("regnety_160")
    assert time.monotonic() - started < 15
    assert hub.HF_HUB_OFFLINE is False  # restored


def test_teacher_file_and_checksum_are_printed_and_recorded(run_main, train_flags, tiny_teacher_file, tmp_path):
    code, stdout, stderr = run_main(train_flags + ["--epochs", 1, "--output_dir", tmp_path / "run"])
    assert code == 0, stderr
    weights = read_args_json(tmp_path / "run")["teacher_weights"]
    assert weights["source"] == os.path.abspath(tiny_teacher_file) and len(weights["sha256"]) == 64
    assert weights["sha256"] in stdout


def test_teacher_of_another_class_count_is_refused_unless_gamma_is_zero(run_main, data_flags, tmp_path):
    teacher_file = tmp_path / "teacher5.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=5).state_dict()}, teacher_file)
    flags = data_flags + ["--teacher", "resnet10t", "--teacher-path", teacher_file, "--epochs", 1]
    code, _, stderr = run_main(flags)
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert "teacher has 5 classes, data set has 3" in line and "--train-teacher" in line
    code, _, stderr = run_main(flags + ["--gamma", 0])
    assert code == 0, stderr


# ----------------------------------------------------------------------------- hints

def saved_student(path, num_classes, img_size):
    student = models.create_student("deit_ti_distilled", num_classes=num_classes, img_size=img_size)
    torch.save({"student": add_ddp_prefix(student.state_dict())}, path)


def test_checkpoint_of_another_input_size_names_the_size(tmp_path):
    saved_student(tmp_path / "s64.pth", 3, 64)
    student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32)
    with pytest.raises(CheckpointError, match=r"trained at input size 64.*--input-size 64"):
        load_student_checkpoint(student, str(tmp_path / "s64.pth"))


def test_checkpoint_of_another_class_count_names_both(run_main, data_flags, tmp_path):
    saved_student(tmp_path / "s5.pth", 5, 32)
    code, _, stderr = run_main(data_flags + ["--eval-student", "--student-ckpt", tmp_path / "s5.pth"])
    assert code == 2 and "file has 5 classes, data set has 3" in stderr


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be in (0, inf), got -1"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1), got 1.5"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--epochs", "many"], "invalid int value: 'many'"),
])
def test_bad_values_are_one_line_without_usage(run_main, data_flags, flags, message):
    code, stdout, stderr = run_main(data_flags + flags)
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()] and message in stderr
    assert "usage:" not in stderr + stdout


def test_a_bad_value_from_a_config_file_is_named_by_its_file_and_key(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("batch_size: 0\n")
    with pytest.raises(BadInput, match=f"^config {config}: batch-size must be at least 1, got 0$"):
        check_arguments(*parse_arguments(["--config", str(config)]))
    config.write_text("lr: -1.0\n")
    with pytest.raises(BadInput, match=rf"^config {config}: lr must be in \(0, inf\), got -1$"):
        check_arguments(*parse_arguments(["--config", str(config)]))
    with pytest.raises(BadInput, match="^--lr must be in"):
        check_arguments(*parse_arguments(["--config", str(config), "--lr", "-2"]))
