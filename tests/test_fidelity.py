"""Where this code and the original differ in behaviour that a line-by-line reading found, what each does."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models
from datasets import build_transform, default_data_args
from vkd.checkpoints import safe_torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_drop_is_head_dropout_on_both_heads():
    torch.manual_seed(0)
    student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32, drop_rate=0.9).train()
    images = torch.randn(4, 3, 32, 32)
    cls, dist, patch_tokens = student.forward_features(images)
    torch.manual_seed(1)
    cls_logits, dist_logits = student(images)
    assert not torch.allclose(cls_logits, student.head(cls))
    assert not torch.allclose(dist_logits, student.head_dist(dist))
    student.eval()  # dropout is off in evaluation
    cls, dist, _ = student.forward_features(images)
    torch.testing.assert_close(student(images), (student.head(cls) + student.head_dist(dist)) / 2)


def test_small_inputs_are_evaluated_without_resize_or_crop():
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    small = build_transform(False, default_data_args(input_size=32))
    plain = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(small(image), (plain - mean[:, None, None]) / std[:, None, None])
    # Other sizes are brought to the input size (28 px Fashion-MNIST), larger inputs resized and cropped.
    assert small(image.resize((28, 28))).shape == (3, 32, 32)
    large = [type(step).__name__ for step in build_transform(False, default_data_args(input_size=64)).transforms]
    assert large[:2] == ["Resize", "CenterCrop"]


@pytest.mark.multiprocess
def test_the_originals_calls_through_module_leave_ddp_replicas_unsynchronised(tmp_path):
    """The original engine calls ``student.module.forward_features`` and the heads and projector directly,
    so DDP never all-reduces the gradients and each GPU trains its own replica."""
    replicas = {}
    for mode in ("original", "ddp"):
        prefix = str(tmp_path / f"{mode}_rank")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   os.path.join(REPO, "tests", "ddp_sync_worker.py"), mode, prefix]
        result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-3000:]
        replicas[mode] = [safe_torch_load(f"{prefix}{rank}.pth") for rank in (0, 1)]
    differs = lambda pair: any(not torch.equal(pair[0][key], pair[1][key]) for key in pair[0])  # noqa: E731
    assert differs(replicas["original"])
    assert not differs(replicas["ddp"])
