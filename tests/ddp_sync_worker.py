"""One training step of a VkD student on 2 gloo processes with different data per rank (run by
tests/test_fidelity.py under torchrun). ``original``: the student's parts are called through
the wrapped module as the original engine does; ``ddp``: through DDP's forward, as training calls it. Each rank saves its weights."""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import models
from models.students import TrainingView


def main(mode: str, output_prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP's broadcast would make them
    student = models.create_student("deit_ti_distilled", num_classes=3, img_size=32, teacher_dim=256)
    ddp = nn.parallel.DistributedDataParallel(TrainingView(student, with_features=True))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own batch
    images, targets, teacher_features = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2,)), torch.randn(2, 256)
    if mode == "original":
        cls, dist_token, patch_tokens = student.forward_features(images)
        cls_logits, dist_logits = student.head(cls), student.head_dist(dist_token)
        projected = student.projector(patch_tokens.mean(1))
    else:  # as training calls it
        cls_logits, dist_logits, projected = ddp(images)
    loss = (nn.functional.cross_entropy(cls_logits, targets) + nn.functional.cross_entropy(dist_logits, targets)
            + nn.functional.smooth_l1_loss(projected, teacher_features))
    loss.backward()
    optimizer.step()
    # Parameters only: BatchNorm statistics are per rank under DDP too (it broadcasts them before a forward).
    torch.save({name: value.detach() for name, value in student.named_parameters()}, f"{output_prefix}{rank}.pth")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
