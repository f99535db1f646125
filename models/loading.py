"""Loading a student's weights: a released VkD checkpoint (``'student'`` with DDP's ``module.`` keys), one of
ours, or a bare state dict, strictly, with hints for a file that differs only in class count, input size or
DeiT family; and the training run's arguments a checkpoint of ours keeps."""
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from vkd.checkpoints import safe_torch_load, state_dict_in, strict_load, strip_ddp_prefix
from vkd.models import DEIT_SIZES

PROJECTOR_PREFIX = "projector."
DISTILLED_HEAD = "head_dist.weight"  # what only a distilled DeiT's weights hold


def load_student_checkpoint(student: nn.Module, path: str, content: object = None) -> Dict[str, torch.Tensor]:
    """Load a released VkD checkpoint (``'student'`` with ``module.`` keys), one of ours, or a bare state dict.

    Strict: the only keys skipped are ``projector.*`` when the student has no projector (evaluation
    does not need it). ``content``: the file as ``safe_torch_load(path)`` returned it, when the caller has
    read it already. Returns the state dict that was loaded.
    """
    if content is None:
        content = safe_torch_load(path)
    state_dict = strip_ddp_prefix(state_dict_in(content, path, preferred_keys=("student", "model", "state_dict")))
    if getattr(student, "projector", None) is None:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(PROJECTOR_PREFIX)}
    strict_load(student, state_dict, path, hint=_shape_hint)
    return state_dict


def saved_run_args(content: object) -> dict:
    """The arguments of the training run that wrote a checkpoint of ours (``content``, the loaded file); {} for
    other files (the released checkpoints keep none)."""
    run_args = content.get("args") if isinstance(content, Mapping) else None
    return run_args if isinstance(run_args, dict) else {}


def _shape_hint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """What a person should change when a file differs from the model in class count, in DeiT family (distilled
    or not) or in input size."""
    expected = model.state_dict()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if module is classifier and key in state_dict and key in expected:
            found, wanted = state_dict[key].shape, expected[key].shape
            if found[0] != wanted[0] and found[1:] == wanted[1:]:
                return f"file has {found[0]} classes, data set has {wanted[0]}"
    positions = state_dict.get("pos_embed")
    if (positions is None or "pos_embed" not in expected or positions.ndim != 3
            or positions.shape[1:] == expected["pos_embed"].shape[1:]):
        return None
    # DeiT students: 1 prefix token (cls) and a 16x16 patch embedding, or, distilled, 2 (cls, dist) and a
    # convolutional stem; then a grid of stride-16 patches.
    file_prefix, model_prefix = (2 if DISTILLED_HEAD in weights else 1 for weights in (state_dict, expected))
    if file_prefix != model_prefix:
        widths = {embed_dim: size for size, (embed_dim, _) in DEIT_SIZES.items()}
        suggestion = widths.get(positions.shape[2])
        fix = (f": pass --student-model deit_{suggestion}{'_distilled' if file_prefix == 2 else ''}"
               if suggestion else "")
        return (f"the file is a {'distilled ' if file_prefix == 2 else ''}DeiT with {file_prefix} prefix "
                f"token{'s' if file_prefix > 1 else ''}, the model has {model_prefix}{fix}")
    if positions.shape[2] != expected["pos_embed"].shape[2]:
        return None  # another width: the key list says it
    num_patches = getattr(model, "num_patches", None) or model.patch_embed.num_patches
    model_size = getattr(model, "img_size", None) or model.patch_embed.img_size[0]
    stride = model_size // round(num_patches ** 0.5)
    file_side = round((positions.shape[1] - file_prefix) ** 0.5)
    if file_side ** 2 != positions.shape[1] - file_prefix:
        return None  # not a square grid: no input size explains it
    file_size = file_side * stride
    return (f"file was trained at input size {file_size}, the model is built for {model_size}: "
            f"pass --input-size {file_size}")
