"""Frozen teachers: the one way a teacher is frozen, and kept frozen by the module (a criterion) that owns it."""
import torch.nn as nn


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients: a teacher's BatchNorm statistics, dropout and drop-path fixed."""
    model.eval()
    model.requires_grad_(False)
    return model


class TeacherOwner(nn.Module):
    """A module (a criterion) holding a frozen teacher in ``self.teacher``: whatever its own mode, the teacher
    stays in eval mode."""

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self
