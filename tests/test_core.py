"""The VkD core: projector, normalisations, criterion, students and released-checkpoint loading."""
import os

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from distillers import method_args
from distillers.vkd import VkD
from models import create_student
from models.loading import load_student_checkpoint
from models.students import student_outputs
from vkd.errors import CheckpointError
from vkd.losses import feature_distillation_loss, logit_distillation_loss
from vkd.norms import batch_standardise, layernorm, whiten
from vkd.projector import OrthogonalLinear, OrthogonalProjector
from vkd.teachers import create_teacher

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "reference")


def reference_shapes(name):
    with open(os.path.join(REFERENCE, f"{name}_keys.tsv")) as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    return {key: [int(size) for size in shape.strip("[]").split(",") if size.strip()] for key, shape in rows}


def released_checkpoint(path, name, seed=0):
    """A file in the released layout: {'student': {'module.<key>': tensor}} with random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes(name).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(3)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    torch.save({"student": state, "epoch": 299, "optimizer": {}, "loss": 1.0}, path)
    return state


def torch_reference_projector(in_dim, out_dim, state_dict):
    reference = parametrizations.orthogonal(nn.Linear(in_dim, out_dim, bias=False))
    reference.load_state_dict(state_dict)
    return reference


def orthogonality_error(weight):
    return (weight.T @ weight - torch.eye(weight.shape[1])).abs().max().item()


# ------------------------------------------------------------------------------------------ projector

@pytest.mark.parametrize("in_dim,out_dim", [(192, 3024), (32, 48), (16, 16)])
def test_projector_is_orthogonal_before_and_after_training(in_dim, out_dim):
    torch.manual_seed(0)
    projector = OrthogonalProjector(in_dim, out_dim)
    assert orthogonality_error(projector.weight.detach()) < 1e-5
    # No weight decay on the parametrization: see the test below for what decay does.
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        loss = (projector(torch.randn(8, in_dim)) - torch.randn(8, out_dim)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert orthogonality_error(projector.weight.detach()) < 1e-5


def test_weight_decay_collapses_householder_projector_as_in_the_original():
    """torch's Householder map takes each column's sign from int(diagonal of `original`), and that
    diagonal gets no gradient: AdamW's decay moves it from -1 to -0.999975 and int() makes it 0, so
    the original recipe (wd 0.05 on every 2-D parameter) zeroes the projector after one step."""
    torch.manual_seed(0)
    projector = OrthogonalProjector(16, 24)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=5e-4, weight_decay=0.05)
    (projector(torch.randn(4, 16)) - torch.randn(4, 24)).abs().mean().backward()
    optimizer.step()
    assert projector.weight.detach().abs().max().item() == 0.0


@pytest.mark.parametrize("in_dim,out_dim", [(192, 3024), (24, 40), (16, 16)])
def test_projector_weight_equals_torch_parametrization(in_dim, out_dim):
    torch.manual_seed(1)
    projector = OrthogonalProjector(in_dim, out_dim)
    with torch.no_grad():  # move away from the -I initialisation, as training does
        projector.parametrizations.weight.original.add_(0.05 * torch.randn(out_dim, in_dim))
    reference = torch_reference_projector(in_dim, out_dim, projector.state_dict())
    torch.testing.assert_close(projector.weight, reference.weight, rtol=1e-5, atol=1e-5)
    inputs = torch.randn(4, in_dim)
    torch.testing.assert_close(projector(inputs), reference(inputs), rtol=1e-5, atol=1e-5)


def test_projector_state_dict_layout():
    projector = OrthogonalProjector(192, 3024)
    assert {key: list(value.shape) for key, value in projector.state_dict().items()} == {
        "parametrizations.weight.original": [3024, 192],
        "parametrizations.weight.0.base": [3024, 3024],
    }
    detection = OrthogonalLinear(256, 256)
    assert sorted(detection.state_dict()) == sorted([
        "weight", "bias", "projector.parametrizations.weight.original", "projector.parametrizations.weight.0.base"])
    inputs = torch.randn(5, 256)
    with torch.no_grad():
        detection.weight.fill_(2.0)
        detection.bias.fill_(1.0)
    torch.testing.assert_close(detection(inputs), detection.projector(inputs) * 2 + 1)


@pytest.mark.parametrize("impl", ["fast", "torch"])
def test_a_student_wider_than_the_teacher_gets_a_projector_with_orthonormal_rows(impl):
    torch.manual_seed(0)
    projector = OrthogonalProjector(64, 32, impl=impl)
    weight = projector.weight
    assert weight.shape == (32, 64)
    torch.testing.assert_close(weight @ weight.T, torch.eye(32), atol=1e-5, rtol=0)
    inputs = torch.randn(5, 64)
    torch.testing.assert_close(projector(inputs), inputs @ weight.T, atol=1e-5, rtol=1e-5)
    # A projection: it never lengthens a vector, and keeps those of the subspace its rows span.
    assert (projector(inputs).norm(dim=1) <= inputs.norm(dim=1) + 1e-5).all()
    inside = torch.randn(3, 32) @ weight
    torch.testing.assert_close(projector(inside).norm(dim=1), inside.norm(dim=1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- normalisations

def test_normalisations():
    torch.manual_seed(0)
    x = torch.randn(256, 8) * 3 + 2
    rows = layernorm(x)
    torch.testing.assert_close(rows.mean(1), torch.zeros(256), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(256), atol=1e-3, rtol=0)
    columns = batch_standardise(x)
    torch.testing.assert_close(columns.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(columns.std(0), torch.ones(8), atol=1e-5, rtol=0)
    mixed = x @ torch.randn(8, 8)
    white = whiten(mixed)
    torch.testing.assert_close(white.T @ white / white.shape[0], torch.eye(8), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------ losses

def test_loss_terms_on_known_tensors():
    student = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.5]])
    teacher = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]])
    # layer_norm of the teacher rows by hand, then smooth-L1 (beta 1) by hand.
    mean = teacher.mean(1, keepdim=True)
    normed = (teacher - mean) / torch.sqrt(teacher.var(1, unbiased=False, keepdim=True) + 1e-5)
    diff = (student - normed).abs()
    expected = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()
    torch.testing.assert_close(feature_distillation_loss(student, teacher), expected)
    torch.testing.assert_close(feature_distillation_loss(student, teacher, "none", "mse"),
                               (student - teacher).pow(2).mean())

    student_logits = torch.tensor([[2.0, 0.0, -1.0]])
    teacher_logits = torch.tensor([[0.0, 1.0, 0.0]])
    p_teacher = teacher_logits.softmax(-1)
    expected_kl = (p_teacher * (p_teacher.log() - student_logits.log_softmax(-1))).sum()
    torch.testing.assert_close(logit_distillation_loss(student_logits, teacher_logits), expected_kl)
    temperature = 4.0
    p_soft = (teacher_logits / temperature).softmax(-1)
    expected_soft = (p_soft * (p_soft.log() - (student_logits / temperature).log_softmax(-1))).sum() * temperature ** 2
    torch.testing.assert_close(logit_distillation_loss(student_logits, teacher_logits, temperature), expected_soft)


class TinyTeacher(nn.Module):
    """A timm-like teacher: forward_features -> [B, C, H, W]; forward_head(pre_logits) -> pooled."""

    def __init__(self, width=200, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)
        self.num_features = width
        self.calls = 0

    def forward_features(self, x):
        self.calls += 1
        return self.conv(x)

    def forward_head(self, features, pre_logits=False):
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)


def test_vkd_criterion_combines_weighted_terms():
    torch.manual_seed(0)
    teacher = TinyTeacher()
    student = create_student("deit_ti_distilled", num_classes=3, img_size=32, teacher_dim=teacher.num_features)
    criterion = VkD(method_args(alpha=2.0, gamma=0.5, temperature=1.0), teacher, nn.CrossEntropyLoss())
    samples, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    student.train()
    outputs = student_outputs(student, samples, with_features=True)
    terms = criterion(samples, outputs, targets)
    cls_logits, dist_logits, projected = outputs
    with torch.no_grad():
        features = teacher.forward_features(samples)
        pooled, logits = features.mean((2, 3)), teacher.fc(features.mean((2, 3)))
    torch.testing.assert_close(terms["ce"], nn.functional.cross_entropy(cls_logits, targets))
    torch.testing.assert_close(terms["kd"], 0.5 * logit_distillation_loss(dist_logits, logits))
    torch.testing.assert_close(terms["vkd"], 2.0 * feature_distillation_loss(projected, pooled))
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kd"] + terms["vkd"])
    terms["loss"].backward()
    assert student.projector.parametrizations.weight.original.grad is not None
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert not teacher.training


def test_criterion_without_distillation_never_runs_teacher():
    teacher = TinyTeacher()
    criterion = VkD(method_args(alpha=0.0, gamma=0.0), teacher, nn.CrossEntropyLoss())
    student = create_student("deit_ti_distilled", num_classes=3, img_size=32).train()
    samples = torch.randn(2, 3, 32, 32)
    terms = criterion(samples, student_outputs(student, samples, with_features=False), torch.tensor([0, 1]))
    assert teacher.calls == 0
    assert terms["kd"].item() == 0 and terms["vkd"].item() == 0
    torch.testing.assert_close(terms["loss"], terms["ce"])


def test_criterion_needs_projection_when_alpha_positive():
    criterion = VkD(method_args(alpha=1.0, gamma=0.0), TinyTeacher(), nn.CrossEntropyLoss())
    student = create_student("deit_ti_distilled", num_classes=3, img_size=32, teacher_dim=200).train()
    samples = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="projected features"):
        criterion(samples, student_outputs(student, samples, with_features=False), torch.tensor([0, 1]))


def test_channels_last_teacher_computes_the_same_features(tmp_path):
    import timm
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("resnet10t", num_classes=3).state_dict()}, tmp_path / "teacher.pth")
    plain, fast = (create_teacher("resnet10t", num_classes=3, teacher_path=str(tmp_path / "teacher.pth"),
                                         channels_last=channels_last) for channels_last in (False, True))
    assert fast.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    samples = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast.forward_features(samples), plain.forward_features(samples),
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ students

@pytest.mark.parametrize("img_size", [224, 64])
def test_student_output_shapes(img_size):
    student = create_student("deit_ti_distilled", num_classes=10, img_size=img_size, teacher_dim=320)
    samples = torch.randn(2, 3, img_size, img_size)
    student.eval()
    with torch.no_grad():
        cls, dist, patches = student.forward_features(samples)
        torch.testing.assert_close(student(samples), (student.head(cls) + student.head_dist(dist)) / 2)
    assert cls.shape == dist.shape == (2, 192)
    assert patches.shape == (2, (img_size // 16) ** 2, 192)
    student.train()
    cls_logits, dist_logits, projected = student(samples, with_projection=True)
    assert cls_logits.shape == dist_logits.shape == (2, 10) and projected.shape == (2, 320)


def test_dist_token_is_mean_of_stem_tokens():
    student = create_student("deit_ti_distilled", num_classes=4, img_size=32).eval()
    with torch.no_grad():
        student.blocks = nn.Sequential()  # expose the tokens as they enter the encoder
        student.norm = nn.Identity()
        samples = torch.randn(2, 3, 32, 32)
        cls, dist, patches = student.forward_features(samples)
        stem = student.conv_embed(samples)
        torch.testing.assert_close(dist, stem.mean(1) + student.pos_embed[0, 1])
        torch.testing.assert_close(patches, stem + student.pos_embed[:, 2:])
        torch.testing.assert_close(cls, (student.cls_token + student.pos_embed[:, :1])[0].expand(2, -1))


def test_students_registered_with_timm_and_unknown_name_rejected():
    import timm
    assert {"deit_ti_distilled", "deit_s", "deit_b_distilled"} <= set(timm.list_models("deit_*"))
    assert "deit_tiny_patch16_224" in timm.list_models("deit_tiny*")  # timm's own names untouched
    with pytest.raises(ValueError, match="deit_ti_distilled"):
        create_student("deit_xl_distilled")
    with pytest.raises(ValueError, match="multiple of 16"):
        create_student("deit_ti_distilled", img_size=40)


@pytest.mark.parametrize("name", ["deit_ti_distilled", "deit_s_distilled"])
def test_released_layout_loads_strictly(tmp_path, name):
    path = str(tmp_path / "latest.pth.tar")
    saved = released_checkpoint(path, name)
    student = create_student(name, teacher_dim=3024)
    load_student_checkpoint(student, path)
    for key, value in student.state_dict().items():
        assert torch.equal(value, saved["module." + key]), key
    bare = create_student(name)  # evaluation: no projector, the projector keys are the only ones skipped
    load_student_checkpoint(bare, path)


def test_wrong_architecture_names_keys(tmp_path):
    path = str(tmp_path / "deit_s.pth.tar")
    released_checkpoint(path, "deit_s_distilled")
    with pytest.raises(CheckpointError, match=r"cls_token file \[1, 1, 384\] vs model \[1, 1, 192\]"):
        load_student_checkpoint(create_student("deit_ti_distilled"), path)


def test_missing_and_unsafe_checkpoints_are_refused(tmp_path):
    student = create_student("deit_ti_distilled", num_classes=3, img_size=32)
    with pytest.raises(CheckpointError, match="not found"):
        load_student_checkpoint(student, str(tmp_path / "absent.pth"))
    truncated = tmp_path / "truncated.pth"
    torch.save({"student": student.state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_student_checkpoint(student, str(truncated))
    state = student.state_dict()
    state.pop("head.bias")
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"missing from file: head.bias \[3\]"):
        load_student_checkpoint(student, str(partial))
