"""The public API (``import vkd``): the README's own-loop example runs, the loss falls, the projector stays an
isometry, and importing it loads none of the repository's command-line, data or logging code."""
import os
import subprocess
import sys

import timm
import torch

from examples.own_loop import distil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_documentation_shows_the_example_that_is_tested():
    with open(os.path.join(REPO, "examples", "own_loop.py")) as handle:
        body = handle.read().split('"""', 2)[2].strip()
    with open(os.path.join(REPO, "docs", "own-loop.md")) as handle:
        assert body in handle.read()


def test_the_example_distils_a_timm_student_and_keeps_the_projector_orthogonal():
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=4, img_size=32)
    teacher = timm.create_model("test_resnet", num_classes=4)
    assert student.num_features < teacher.num_features
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    loader = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    projector, losses = distil(student, teacher, loader, epochs=15, lr=3e-3)
    assert len(losses) == 30
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    weight = projector.weight.detach()
    assert weight.shape == (teacher.num_features, student.num_features)
    assert torch.allclose(weight.T @ weight, torch.eye(student.num_features), atol=1e-5)


def test_importing_the_api_loads_no_command_line_data_or_logging_code():
    probe = ("import sys, vkd; loaded = [m for m in ('vkd.cli', 'vkd.config', 'vkd.data', 'datasets', 'config', "
             "'torch.utils.tensorboard', 'tensorboard', 'torchvision') if m in sys.modules]; print(loaded)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert set(__import__("vkd").__all__) <= set(dir(__import__("vkd")))
