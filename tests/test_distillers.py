"""The student/method seam: any timm student, each distiller's terms as its source defines them, the registry's
flags and refusals, a toy distiller added from outside the loops, and every distiller end to end on the digits."""
import argparse
import json
import os
from typing import Dict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import distillers
import models
from distillers import Distiller, Flag, StudentOutputs, method_args
from distillers.deit import DeiTHard, DeiTSoft
from distillers.fitnet import FitNet
from distillers.kd import KD
from distillers.none import NoDistillation
from models.students import TrainingView, student_outputs
from vkd.checkpoints import safe_torch_load
from vkd.losses import feature_width


class TinyTeacher(nn.Module):
    """A timm-like teacher whose outputs the tests can compute by hand; counts its forwards."""

    def __init__(self, width=24, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)
        self.num_features, self.num_classes, self.calls = width, num_classes, 0

    def forward_features(self, x):
        self.calls += 1
        return self.conv(x)

    def forward_head(self, features, pre_logits=False):
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def outputs(self, samples):
        with torch.no_grad():
            pooled = self.conv(samples).mean((2, 3))
        return pooled, self.fc(pooled).detach()


SAMPLES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TARGETS = torch.tensor([0, 1, 2, 0])


def random_outputs(features_width=None) -> StudentOutputs:
    generator = torch.Generator().manual_seed(1)
    logits, dist_logits = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    features = torch.randn(4, features_width, generator=generator) if features_width else None
    return StudentOutputs(logits, dist_logits, features)


# ----------------------------------------------------------------------------- each method's terms


def test_kd_is_hinton_kd_on_the_distillation_head():
    teacher = TinyTeacher()
    criterion = KD(method_args(gamma=0.5, temperature=4.0), teacher, nn.CrossEntropyLoss())
    outputs = random_outputs()
    terms = criterion(SAMPLES, outputs, TARGETS)
    _, teacher_logits = teacher.outputs(SAMPLES)
    p_teacher = (teacher_logits / 4).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (outputs.dist_logits / 4).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(terms["ce"], F.cross_entropy(outputs.logits, TARGETS))
    torch.testing.assert_close(terms["kd"], 0.5 * 16 * kl)
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kd"])
    assert set(terms) == {"ce", "kd", "loss"} == set(criterion.terms_logged)


def test_deit_hard_is_deit_hard_label_distillation():
    teacher = TinyTeacher()
    criterion = DeiTHard(method_args(distillation_alpha=0.25), teacher, nn.CrossEntropyLoss())
    outputs = random_outputs()
    terms = criterion(SAMPLES, outputs, TARGETS)
    _, teacher_logits = teacher.outputs(SAMPLES)
    torch.testing.assert_close(terms["ce"], 0.75 * F.cross_entropy(outputs.logits, TARGETS))
    torch.testing.assert_close(terms["deit"], 0.25 * F.cross_entropy(outputs.dist_logits, teacher_logits.argmax(1)))
    assert DeiTHard.needs_distillation_head and "distillation_tau" not in DeiTHard.flag_dests()


def test_deit_soft_divides_by_batch_times_classes_as_deit():
    teacher = TinyTeacher()
    criterion = DeiTSoft(method_args(distillation_alpha=0.5, distillation_tau=2.0), teacher, nn.CrossEntropyLoss())
    outputs = random_outputs()
    terms = criterion(SAMPLES, outputs, TARGETS)
    _, teacher_logits = teacher.outputs(SAMPLES)
    p_teacher = (teacher_logits / 2).softmax(-1)
    summed = (p_teacher * (p_teacher.log() - (outputs.dist_logits / 2).log_softmax(-1))).sum()
    torch.testing.assert_close(terms["deit"], 0.5 * summed * 4 / (4 * 3))
    torch.testing.assert_close(terms["ce"], 0.5 * F.cross_entropy(outputs.logits, TARGETS))


def test_fitnet_is_mse_to_the_raw_teacher_feature():
    teacher = TinyTeacher()
    criterion = FitNet(method_args(alpha=3.0), teacher, nn.CrossEntropyLoss())
    outputs = random_outputs(features_width=teacher.num_features)
    terms = criterion(SAMPLES, outputs, TARGETS)
    teacher_features, _ = teacher.outputs(SAMPLES)
    torch.testing.assert_close(terms["fitnet"], 3.0 * ((outputs.features - teacher_features) ** 2).mean())
    assert FitNet.projector(method_args()) == "linear" and not FitNet.needs_teacher_logits(method_args())


def test_none_never_runs_a_teacher():
    criterion = NoDistillation(method_args(), None, nn.CrossEntropyLoss())
    outputs = random_outputs()
    terms = criterion(SAMPLES, outputs, TARGETS)
    assert set(terms) == {"ce", "loss"}
    torch.testing.assert_close(terms["loss"], F.cross_entropy(outputs.logits, TARGETS))


def test_every_method_reads_the_teacher_cache(tmp_path):
    from distillers.teacher_cache import TeacherCache
    for name, cls in distillers.DISTILLERS.items():
        if not cls.needs_teacher(method_args()):
            continue
        teacher = TinyTeacher()
        cache = TeacherCache(str(tmp_path / name), teacher, identity={"architecture": "tiny"})
        criterion = cls(method_args(), teacher, nn.CrossEntropyLoss(), teacher_cache=cache)
        outputs = random_outputs(features_width=teacher.num_features)
        first, second = criterion(SAMPLES, outputs, TARGETS), criterion(SAMPLES, outputs, TARGETS)
        assert cache.take_counts()[:2] == (1, 1), name
        assert all(torch.equal(first[term], second[term]) for term in first), name


# ----------------------------------------------------------------------------- any timm student


@pytest.mark.parametrize("name", ["resnet18", "regnetx_002", "mobilenetv3_small_050", "deit_ti_distilled"])
def test_any_timm_student_gives_logits_and_its_projected_classifier_input(name):
    torch.manual_seed(0)
    teacher_width = 512
    student = models.create_student(name, num_classes=3, img_size=32, teacher_dim=teacher_width).train()
    images = torch.randn(2, 3, 32, 32)
    outputs = student_outputs(student, images, with_features=True)
    assert outputs.logits.shape == outputs.dist_logits.shape == (2, 3)
    assert outputs.features.shape == (2, teacher_width)
    projector = student.projector.weight
    if feature_width(student) <= teacher_width:
        torch.testing.assert_close(projector.T @ projector, torch.eye(feature_width(student)), atol=1e-4, rtol=0)
    else:  # mobilenetv3_small_050 reads 1024 features: a projection with orthonormal rows
        torch.testing.assert_close(projector @ projector.T, torch.eye(teacher_width), atol=1e-4, rtol=0)
    if not models.has_distillation_head(student):
        student.eval()  # what the classifier reads, projected, is what the training view gives
        with torch.no_grad():
            pre_logits = student.forward_head(student.forward_features(images), pre_logits=True)
            torch.testing.assert_close(student_outputs(student, images, True).features, student.projector(pre_logits))
            torch.testing.assert_close(student_outputs(student, images, True).logits, student(images))


def test_the_training_view_holds_only_the_students_weights():
    student = models.create_student("resnet18", num_classes=3, teacher_dim=512)
    view = TrainingView(student, with_features=True)
    assert [name for name, _ in view.named_parameters()] == [f"student.{name}" for name, _ in student.named_parameters()]
    assert any(name.startswith("projector.") for name, _ in student.named_parameters())


def test_an_unknown_student_is_one_line_with_close_names():
    with pytest.raises(models.StudentError, match="unknown student model 'resnet_18'.*closest: .*resnet18"):
        models.create_student("resnet_18")


# ----------------------------------------------------------------------------- the command line


def test_help_lists_every_distiller_with_its_flags(run_main):
    code, out, _ = run_main(["--help"])
    assert code == 0
    for name, cls in distillers.DISTILLERS.items():
        assert f"--distiller {name}" in out and cls.summary.split(" ")[0] in out
    for flag in ("--alpha", "--gamma", "--distillation-alpha", "--distillation-tau", "--projector"):
        assert flag in out


@pytest.mark.parametrize("flags, message", [
    (["--distiller", "kd", "--alpha", "1"], "--alpha is a flag of --distiller vkd / fitnet; --distiller kd does not "
                                           "read it"),
    (["--distiller", "deit-hard", "--distillation-tau", "2"], "--distillation-tau is a flag of --distiller deit-soft"),
    (["--distiller", "vkd", "--distillation-alpha", "0.3"], "--distillation-alpha is a flag of --distiller deit-hard"),
    (["--distiller", "none", "--teacher-cache", "somewhere"], "--teacher-cache has no effect here"),
    (["--distiller", "deit-hard", "--student-model", "resnet18"], "'resnet18' lacks: choose a student with one"),
    (["--distiller", "deit-soft", "--distillation-alpha", "1.5"], "--distillation-alpha must be in [0, 1]"),
    (["--distiller", "kd", "--no-train-mode"], "--no-train-mode runs the student in eval mode"),
    (["--distiller", "magic"], "argument --distiller: invalid choice: 'magic'"),
    (["--student-model", "resnet_18"], "unknown student model 'resnet_18'"),
    (["--train-teacher", "--distiller", "kd"], "--distiller has no effect here"),
])
def test_a_method_flag_out_of_place_is_one_line(flags, message, run_main, train_flags, tmp_path):
    code, _, err = run_main(train_flags + ["--epochs", 1, "--output_dir", tmp_path / "run", *flags])
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_config_selects_the_distiller_like_a_flag(tmp_path):
    from config import check_arguments, parse_arguments
    config = tmp_path / "kd.yaml"
    config.write_text("distiller: kd\ntemperature: 4.0\n")
    args, explicit = parse_arguments(["--config", str(config)])
    check_arguments(args, explicit)
    assert (args.distiller, args.temperature) == ("kd", 4.0)
    config.write_text("distiller: kd\nalpha: 2.0\n")
    with pytest.raises(ValueError, match=f"config {config}: alpha is a flag of --distiller vkd"):
        check_arguments(*parse_arguments(["--config", str(config)]))


# ----------------------------------------------------------------------------- a new method, from outside


TOY_WEIGHT = Flag("--toy-weight", default=0.5, range=(0.0, 1.0, True, True), help="the toy's weight")


class ToyDistiller(Distiller):
    """Pulls the student's logits towards the teacher's by L1: one class, one registry entry."""
    name = "toy"
    summary = "CE + w x L1(student logits, teacher logits)"
    source = "this test"
    loss_terms = ("ce", "toy")
    flags = (TOY_WEIGHT,)

    def __init__(self, args, teacher, base_criterion, **kwargs):
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.weight = args.toy_weight

    def terms(self, samples, outputs, targets) -> Dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_outputs(samples)
        return {"ce": self.base_criterion(outputs.logits, targets),
                "toy": self.weight * (outputs.logits - teacher_logits).abs().mean()}


def test_a_toy_distiller_trains_resumes_and_evaluates_without_touching_the_loops(monkeypatch, run_main, train_flags,
                                                                                  tmp_path):
    monkeypatch.setitem(distillers.DISTILLERS, "toy", ToyDistiller)
    run = tmp_path / "run"
    flags = train_flags + ["--student-model", "resnet18", "--distiller", "toy", "--toy-weight", "0.25",
                           "--output_dir", run]
    code, _, err = run_main(flags + ["--epochs", 1])
    assert code == 0, err[-3000:]
    code, _, err = run_main(flags + ["--epochs", 2, "--resume", "auto"])
    assert code == 0, err[-3000:]
    with open(run / "log.txt") as handle:
        records = [json.loads(line) for line in handle]
    assert [record["epoch"] for record in records] == [0, 1]
    assert all(record["train_toy"] > 0 and record["train_loss"] > record["train_ce"] for record in records)
    checkpoint = safe_torch_load(str(run / "latest.pth.tar"))
    assert checkpoint["args"]["distiller"] == "toy" and checkpoint["args"]["toy_weight"] == 0.25
    code, _, err = run_main(flags + ["--epochs", 2, "--resume", "auto", "--toy-weight", "0.5"])
    assert code == 2 and "--toy-weight 0.5 but" in err, err
    code, out, err = run_main(train_flags[:-4] + ["--student-model", "resnet18", "--eval", "--resume",
                                                  run / "latest.pth.tar"])
    assert code == 0 and "on the 7 test images" in out, err[-3000:]


# ----------------------------------------------------------------------------- every method end to end, on the digits


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("digits_teacher") / "teacher.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=10).state_dict()}, path)
    return str(path)


def digits_flags(digits_root, teacher_path, student, distiller, output_dir):
    return ["--data-set", "DIGITS", "--data-path", digits_root, "--subset", "10PERCENT", "--input-size", 32,
            "--batch-size", 16, "--num_workers", 0, "--print-freq", 100, "--mixup", 0, "--cutmix", 0,
            "--student-model", student, "--teacher", "resnet10t", "--teacher-path", teacher_path,
            "--distiller", distiller, "--output_dir", output_dir]


def distil_resume_evaluate_export_predict(run_main, run_entry_point, digits_root, teacher_path, student, distiller,
                                          tmp_path):
    run = tmp_path / distiller
    flags = digits_flags(digits_root, teacher_path, student, distiller, run)
    code, _, err = run_main(flags + ["--epochs", 1])
    assert code == 0, err[-3000:]
    code, _, err = run_main(flags + ["--epochs", 2, "--resume", "auto"])
    assert code == 0, err[-3000:]
    with open(run / "log.txt") as handle:
        last = [json.loads(line) for line in handle][-1]
    assert last["epoch"] == 1 and last["val_images"] == 360
    terms = distillers.DISTILLERS[distiller].loss_terms
    assert all(f"train_{term}" in last for term in terms)
    code, out, err = run_main(["--data-set", "DIGITS", "--data-path", digits_root, "--input-size", 32,
                               "--num_workers", 0, "--student-model", student, "--eval", "--resume",
                               run / "latest.pth.tar"])
    assert code == 0, err[-3000:]
    assert f"{last['val_acc1']:.1f}%" in out  # evaluating the checkpoint gives the run's own number
    import export
    import predict
    exported = tmp_path / f"{distiller}.onnx"
    code, _, err = run_entry_point(export, ["--checkpoint", run / "latest.pth.tar", "--format", "onnx",
                                            "--out", exported])
    assert code == 0, err[-3000:]
    image = os.path.join(digits_root, "val", "3", sorted(os.listdir(os.path.join(digits_root, "val", "3")))[0])
    code, out, err = run_entry_point(predict, ["--checkpoint", exported, image, "--topk", 2])
    assert code == 0 and out.startswith(image), err[-3000:]


@pytest.mark.slow
def test_a_cnn_student_distilled_with_vkd_trains_resumes_evaluates_exports_and_predicts(
        run_main, run_entry_point, digits_root, digits_teacher, tmp_path):
    distil_resume_evaluate_export_predict(run_main, run_entry_point, digits_root, digits_teacher, "resnet18", "vkd",
                                          tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("student, distiller", [("resnet18", "kd"), ("resnet18", "fitnet"), ("resnet18", "none"),
                                                ("deit_ti_distilled", "deit-hard"),
                                                ("deit_ti_distilled", "deit-soft")])
def test_every_distiller_trains_resumes_evaluates_exports_and_predicts(
        student, distiller, run_main, run_entry_point, digits_root, digits_teacher, tmp_path):
    distil_resume_evaluate_export_predict(run_main, run_entry_point, digits_root, digits_teacher, student, distiller,
                                          tmp_path)


def test_method_args_refuses_a_name_that_is_no_flag():
    with pytest.raises(TypeError, match="not a distiller flag: alhpa"):
        method_args(alhpa=1.0)
    defaults = method_args(gamma=2.0)
    assert isinstance(defaults, argparse.Namespace) and (defaults.gamma, defaults.alpha) == (2.0, 1.0)


def test_the_registry_refuses_a_flag_declared_twice(monkeypatch):
    class Twice(ToyDistiller):
        name = "twice"
        flags = (Flag("--toy-weight", default=0.5, help="a second --toy-weight"),)

    monkeypatch.setitem(distillers.DISTILLERS, "toy", ToyDistiller)
    monkeypatch.setitem(distillers.DISTILLERS, "twice", Twice)
    with pytest.raises(TypeError, match="declares its own --toy-weight"):
        distillers.all_flags()


@pytest.mark.slow
def test_a_timm_student_keeps_an_ema_starts_from_its_checkpoint_and_exports_to_every_format(
        run_main, run_entry_point, digits_root, digits_teacher, tmp_path):
    import export
    import predict
    flags = digits_flags(digits_root, digits_teacher, "resnet18", "kd", tmp_path / "first")
    code, _, err = run_main(flags + ["--epochs", 1, "--student-ema"])
    assert code == 0, err[-3000:]
    assert safe_torch_load(str(tmp_path / "first" / "latest.pth.tar"))["student_ema"] is not None
    code, out, err = run_main(digits_flags(digits_root, digits_teacher, "resnet18", "kd", tmp_path / "second")
                              + ["--epochs", 1, "--student-ckpt", tmp_path / "first" / "latest.pth.tar"])
    assert code == 0 and "Student initialised from" in out, err[-3000:]
    image = os.path.join(digits_root, "val", "7", sorted(os.listdir(os.path.join(digits_root, "val", "7")))[0])
    for fmt, suffix, trust in (("safetensors", "safetensors", []), ("torch-export", "pt2", ["--trust-pt2"])):
        exported = tmp_path / f"student.{suffix}"
        code, _, err = run_entry_point(export, ["--checkpoint", tmp_path / "second" / "latest.pth.tar", "--format", fmt,
                                                "--out", exported])
        assert code == 0, err[-3000:]
        code, out, err = run_entry_point(predict, ["--checkpoint", exported, image, "--topk", 1, *trust])
        assert code == 0 and out.startswith(image), err[-3000:]
