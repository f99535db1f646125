"""The VkD feature term has one home (``vkd.losses.feature_distillation_loss``): the three trees call it, and each
gives, bit for bit, what its own formula gave before (the literal copies below)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from generation.distillation import GanVkDLoss
from generation.teachers import FrozenImageNetwork
from vidt.models.criterion import distillation_loss
from vkd.losses import feature_distillation_loss
from vkd.norms import batch_standardise, build_normalisation, layernorm


def detection_term_before(student_tokens, teacher_tokens):
    """vidt/models/criterion.py's distillation_loss before the feature term moved to the core."""
    student = student_tokens["patch_token"] + [student_tokens["body_det_token"], student_tokens["neck_det_token"]]
    teacher = teacher_tokens["patch_token"] + [teacher_tokens["body_det_token"], teacher_tokens["neck_det_token"]]
    return sum(F.smooth_l1_loss(batch_standardise(s.float()), batch_standardise(t.detach().float()))
               for s, t in zip(student, teacher))


def generation_terms_before(loss: GanVkDLoss, images, projected_student, num_fake):
    """generation/vkd.py's GanVkDLoss.forward before the feature term moved to the core."""
    fake_target, real_target = loss.targets(images, num_fake)
    fake_term = F.smooth_l1_loss(projected_student[:num_fake].float(), fake_target)
    real_term = F.smooth_l1_loss(projected_student[num_fake:].float(), real_target)
    return {"vkd_fake": fake_term.detach(), "vkd_real": real_term.detach(), "vkd": loss.weight * (fake_term + real_term)}


def tokens(generator, rows=(40, 10, 6, 3), width=16, requires_grad=False):
    def draw(count):
        return (torch.randn(count, width, generator=generator) * 3 + 1).requires_grad_(requires_grad)
    return {"patch_token": [draw(count) for count in rows], "body_det_token": draw(8), "neck_det_token": draw(24)}


def test_detection_term_and_its_gradients_are_the_old_formulas_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    student, teacher = tokens(generator, requires_grad=True), tokens(generator)
    new, old = distillation_loss(student, teacher), detection_term_before(student, teacher)
    assert torch.equal(new, old) and new.item() > 0
    leaves = student["patch_token"] + [student["body_det_token"], student["neck_det_token"]]
    new_grads = torch.autograd.grad(new, leaves)
    old_grads = torch.autograd.grad(old, leaves)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


class RandomTeacher(FrozenImageNetwork):
    """A frozen linear map of the flattened images, as the CLIP and timm teachers' (features, logits)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim, self.name, self.source = feature_dim, "random", "test"
        self.linear = nn.Linear(3 * 4 * 4, feature_dim)
        self.freeze()

    def forward(self, images):
        return self.linear(images.flatten(1)), None


@pytest.mark.parametrize("normalisation", ["whiten", "layernorm", "batchstd", "none"])
@pytest.mark.parametrize("pairing", ["separate", "joint"])
def test_generation_terms_are_the_old_formula_bit_for_bit(normalisation, pairing):
    torch.manual_seed(1)
    loss = GanVkDLoss(RandomTeacher(12), build_normalisation(normalisation, "cholesky", 1e-4), 0.7, pairing)
    images, projected = torch.randn(10, 3, 4, 4), torch.randn(10, 12, requires_grad=True)
    new, old = loss(images, projected, 4), generation_terms_before(loss, images, projected, 4)
    assert sorted(new) == sorted(old) and all(torch.equal(new[name], old[name]) for name in new)
    assert torch.equal(torch.autograd.grad(new["vkd"], projected)[0], torch.autograd.grad(old["vkd"], projected)[0])


def test_classification_term_is_unchanged():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 20, generator=generator), torch.randn(6, 20, generator=generator)
    assert torch.equal(feature_distillation_loss(student, teacher),
                       F.smooth_l1_loss(student.float(), layernorm(teacher.float())))


def test_a_normalisation_function_and_the_student_side_option():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    halve = lambda x: x / 2  # noqa: E731
    assert torch.equal(feature_distillation_loss(student, teacher, halve, "mse"), F.mse_loss(student, teacher / 2))
    assert torch.equal(feature_distillation_loss(student, teacher, halve, "mse", normalise_student=True),
                       F.mse_loss(student / 2, teacher / 2))
