"""main_distributed.py end to end on CPU: launchers, exact distributed evaluation, resume, released
checkpoints, teacher training, non-finite losses and bad input. Tiny data (conftest.py), 32 px images."""
import json
import os
import re
import shutil

import pytest
import torch

import datasets
import models
from vkd.checkpoints import add_ddp_prefix, safe_torch_load
from vkd.teachers import create_teacher

VAL_IMAGES = 7
SUMMARY_LINE = re.compile(r"^ \* Acc@1 ([\d.]+) Acc@5 ([\d.]+)$", re.M)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle]


def accuracy_lines(output: str):
    """The original's two result lines, as printed."""
    summary = SUMMARY_LINE.findall(output)
    accuracy = re.findall(r"^Accuracy of the .*network on the \d+ test images: [\d.]+%$", output, re.M)
    return summary, accuracy


@pytest.mark.multiprocess
@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["launch", "torchrun"])
def test_two_processes_train_an_epoch_and_evaluate_like_one(launcher, launch, run_main, train_flags, data_flags,
                                                            tmp_path):
    run_dir = tmp_path / "run"
    result = launch(launcher, train_flags + ["--epochs", 1, "--output_dir", run_dir])
    assert result.returncode == 0, result.stdout[-3000:]
    [record] = read_log(run_dir)
    assert record["epoch"] == 0
    assert record["train_images"] == 16  # 18 images: 9 per rank, 2 full batches of 4 each
    assert record["val_images"] == VAL_IMAGES  # unequal shards (4 + 3), each image counted once
    assert f"Accuracy of the network on the {VAL_IMAGES} test images" in result.stdout
    checkpoint = safe_torch_load(str(run_dir / "latest.pth.tar"))
    assert (checkpoint["epoch"], checkpoint["world_size"], type(checkpoint["args"])) == (0, 2, dict)
    assert all(key.startswith("module.") for key in checkpoint["student"])

    code, stdout, stderr = run_main(data_flags + ["--eval", "--resume", run_dir / "latest.pth.tar",
                                                  "--output_dir", tmp_path / "eval"])
    assert code == 0, stderr
    with open(tmp_path / "eval" / "eval_results.json") as handle:
        one_process = json.load(handle)
    assert one_process["images"] == VAL_IMAGES
    assert (one_process["acc1"], one_process["acc5"]) == (record["val_acc1"], record["val_acc5"])


@pytest.fixture
def released_checkpoint(tmp_path):
    """A file in the released layout ('student' with 'module.' keys, projector included), 3 classes."""
    torch.manual_seed(1)
    student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32, teacher_dim=512)
    path = str(tmp_path / "latest.pth.tar")
    torch.save({"student": add_ddp_prefix(student.state_dict()), "student_ema": None, "optimizer": {},
                "scaler": {}, "epoch": 299, "loss": 1.5, "batch_size": 512, "world_size": 1, "lr": 5e-6}, path)
    return path, student


def direct_accuracy(student, data_path) -> float:
    """Top-1 over the val images, one image at a time, without the entry point."""
    dataset, _ = datasets.build_dataset(False, datasets.default_data_args(data_set="FOLDER", data_path=data_path,
                                                                          input_size=32))
    student.eval()
    with torch.no_grad():
        correct = sum(int(student(image[None]).argmax()) == target for image, target in dataset)
    return 100 * correct / len(dataset)


@pytest.mark.multiprocess
def test_eval_student_on_a_released_layout_file_one_and_two_processes(released_checkpoint, run_main, launch,
                                                                      data_flags, tiny_image_folder):
    path, student = released_checkpoint
    flags = ["--teacher", "regnety_160", "--eval-student", "--student-ckpt", path] + data_flags
    code, stdout, stderr = run_main(flags)
    assert code == 0, stderr
    summary, accuracy = accuracy_lines(stdout)
    expected = direct_accuracy(student, tiny_image_folder)
    assert accuracy == [f"Accuracy of the student network on the {VAL_IMAGES} test images: {expected:.1f}%"]
    assert len(summary) == 1 and float(summary[0][0]) == pytest.approx(expected, abs=1e-3)

    result = launch("torchrun", flags)
    assert result.returncode == 0, result.stdout[-3000:]
    assert accuracy_lines(result.stdout) == (summary, accuracy)


def test_resume_continues_exactly_like_an_uninterrupted_run(run_main, train_flags, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 2\nstudent_ema: true\ncheckpoint_freq: 1\nunscale_lr: true\nlr: 5e-4\n")
    flags = train_flags + ["--config", config, "--lr", "1e-3"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    code, _, stderr = run_main(flags + ["--output_dir", uninterrupted])
    assert code == 0, stderr
    with open(uninterrupted / "args.json") as handle:
        run_info = json.load(handle)
    assert (run_info["args"]["epochs"], run_info["args"]["lr"], run_info["lr_effective"]) == (2, 1e-3, 1e-3)
    assert "git_commit" in run_info

    # A run killed after its first epoch: its latest checkpoint is the uninterrupted run's ep1.
    resumed.mkdir()
    shutil.copy(uninterrupted / "ep1.pth.tar", resumed / "latest.pth.tar")
    code, stdout, stderr = run_main(flags + ["--output_dir", resumed, "--resume", "auto"])
    assert code == 0, stderr
    assert "continuing at epoch 1" in stdout
    assert read_log(resumed) == [{**read_log(uninterrupted)[1], "train_seconds": read_log(resumed)[0]["train_seconds"]}]
    expected, actual = (safe_torch_load(str(folder / "latest.pth.tar")) for folder in (uninterrupted, resumed))
    assert actual["epoch"] == expected["epoch"] == 1
    assert actual["lr"] == expected["lr"]
    assert actual["optimizer"]["state"][0]["step"] == expected["optimizer"]["state"][0]["step"] == 8
    for key in ("student", "student_ema"):
        assert all(torch.equal(actual[key][name], value) for name, value in expected[key].items())


def test_train_teacher_writes_the_file_teacher_path_reads(run_main, data_flags, tmp_path):
    code, stdout, stderr = run_main(data_flags + ["--train-teacher", "--teacher", "resnet10t", "--epochs", 1,
                                                  "--output_dir", tmp_path])
    assert code == 0, stderr
    assert len(read_log(tmp_path)) == 1
    saved = safe_torch_load(str(tmp_path / "teacher.pth"))["model"]
    teacher = create_teacher("resnet10t", num_classes=3, teacher_path=str(tmp_path / "teacher.pth"))
    assert all(torch.equal(teacher.state_dict()[name], value) for name, value in saved.items())
    assert "--teacher-path" in stdout


def test_eval_freq_evaluates_every_nth_epoch_and_the_last(run_main, train_flags, tmp_path):
    code, stdout, stderr = run_main(train_flags + ["--epochs", 3, "--eval-freq", 2, "--student-ema", "--output_dir",
                                                   tmp_path])
    assert code == 0, stderr
    evaluated = ["val_acc1" in record for record in read_log(tmp_path)]
    assert evaluated == [False, True, True]
    summary, accuracy = accuracy_lines(stdout)
    assert len(summary) == len(accuracy) == 2 + 1  # epochs 2 and 3, then the EMA
    assert (tmp_path / "best.pth.tar").is_file()


def test_evaluating_a_checkpoint_uses_the_head_its_run_evaluated_on(run_main, data_flags, tmp_path):
    code, _, stderr = run_main(data_flags + ["--alpha", 0, "--gamma", 0, "--eval-head", "cls", "--epochs", 1,
                                             "--output_dir", tmp_path / "run"])
    assert code == 0, stderr
    trained = read_log(tmp_path / "run")[-1]
    checkpoint = tmp_path / "run" / "latest.pth.tar"
    losses = {}
    for flags, expected in (([], "cls"), (["--eval-head", "mean"], "mean")):
        output_dir = tmp_path / f"eval_{expected}"
        code, _, stderr = run_main(data_flags + ["--eval-student", "--student-ckpt", checkpoint, "--output_dir",
                                                 output_dir] + flags)
        assert code == 0, stderr
        with open(output_dir / "eval_results.json") as handle:
            results = json.load(handle)
        assert results["eval_head"] == expected
        losses[expected] = results["loss"]
    assert losses["cls"] == pytest.approx(trained["val_loss"]) and losses["mean"] != pytest.approx(losses["cls"])


@torch.no_grad()
def test_eval_head_cls_evaluates_on_the_cls_head_alone():
    torch.manual_seed(0)
    mean_student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32).eval()
    cls_student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32, eval_head="cls").eval()
    cls_student.load_state_dict(mean_student.state_dict())
    images = torch.randn(2, 3, 32, 32)
    cls, dist, _ = mean_student.forward_features(images)
    assert torch.equal(cls_student(images), mean_student.head(cls))
    assert torch.allclose(mean_student(images), (mean_student.head(cls) + mean_student.head_dist(dist)) / 2)
    with pytest.raises(ValueError, match="needs a student with a distillation head"):
        models.create_student("deit_ti", num_classes=3, img_size=32, eval_head="cls")


def test_non_finite_loss_stops_with_every_term_and_keeps_no_bad_checkpoint(run_main, data_flags, tmp_path):
    import timm
    teacher = timm.create_model("resnet10t", num_classes=3)
    torch.save({"model": {name: value.fill_(float("nan")) if value.is_floating_point() else value
                          for name, value in teacher.state_dict().items()}}, tmp_path / "nan_teacher.pth")
    code, _, stderr = run_main(data_flags + ["--teacher", "resnet10t", "--teacher-path", tmp_path / "nan_teacher.pth",
                                             "--epochs", 1, "--skip-nonfinite", 1, "--output_dir", tmp_path / "run"])
    assert code == 1
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss at epoch 0, iteration 1")
    assert all(f"{term}=" in line for term in ("loss", "ce", "kd", "vkd")) and "kd=nan" in line
    assert not os.path.exists(tmp_path / "run" / "latest.pth.tar")


def _empty_class_folder(folder, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    (copy / "train" / "zebra").mkdir()
    return copy


BAD_INPUTS = {
    "missing data path": (lambda flags, folder, tmp: flags + ["--data-path", tmp / "nowhere"], "data folder not found"),
    "empty class folder": (lambda flags, folder, tmp: flags + ["--data-path", _empty_class_folder(folder, tmp)],
                           "class folder has no images"),
    "unknown student": (lambda flags, folder, tmp: flags + ["--student-model", "deit_huge"],
                        "unknown student model 'deit_huge'; any name in timm.list_models() works"),
    "unknown teacher": (lambda flags, folder, tmp: flags + ["--teacher", "resnet_nope"],
                        "unknown teacher model 'resnet_nope'"),
    "missing teacher file": (lambda flags, folder, tmp: flags + ["--teacher-path", tmp / "missing.pth"],
                             "checkpoint file not found"),
    "eval-student without checkpoint": (lambda flags, folder, tmp: flags[:-4] + ["--eval-student"],
                                        "--eval-student needs --student-ckpt"),
    "missing student checkpoint": (lambda flags, folder, tmp: flags[:-4] + ["--eval-student", "--student-ckpt",
                                                                            tmp / "nope.pth.tar"],
                                   "checkpoint file not found"),
    "truncated checkpoint": (lambda flags, folder, tmp: flags + ["--resume", _truncated(tmp)],
                             "could not read checkpoint"),
    "batch size 0": (lambda flags, folder, tmp: flags + ["--batch-size", "0"], "--batch-size must be at least 1"),
    "epochs 0": (lambda flags, folder, tmp: flags + ["--epochs", "0"], "--epochs must be at least 1"),
    "flag without effect": (lambda flags, folder, tmp: flags + ["--alpha", "0", "--projector", "linear"],
                            "--projector has no effect here"),
    "eval-freq 0": (lambda flags, folder, tmp: flags + ["--eval-freq", "0"], "--eval-freq must be at least 1"),
    "cls head of a student without one": (lambda flags, folder, tmp: flags + ["--student-model", "deit_ti", "--alpha",
                                                                               "0", "--gamma", "0", "--eval-head",
                                                                               "cls"],
                                          "--eval-head cls needs a student with a distillation head"),
}


def _truncated(tmp_path):
    path = tmp_path / "truncated.pth.tar"
    torch.save({"student": {"weight": torch.zeros(1000)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[:2000])  # a kill in the middle of a (non-atomic) write
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, run_main, train_flags, tiny_image_folder, tmp_path):
    make_argv, message = BAD_INPUTS[case]
    code, _, stderr = run_main(make_argv(train_flags, tiny_image_folder, tmp_path))
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("error: ") and message in stderr, stderr
