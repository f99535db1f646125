"""Teachers, for the three trees: any timm model, frozen, from a local file or timm's pretrained weights, and the
one way a module freezes a teacher and keeps it frozen."""
import difflib
import os
from typing import Optional

import timm
import torch
import torch.nn as nn

from vkd.checkpoints import classifier_weight_key, file_sha256, load_state_dict_file, strict_load
from vkd.downloads import hub_offline_unless_reachable
from vkd.errors import BadInput
from vkd.frozen import freeze

MAX_SUGGESTIONS = 5  # close matches listed for an unknown model name


def unknown_model_line(role: str, name: str) -> str:
    """One line for an architecture timm does not know, with the closest names it does."""
    closest = difflib.get_close_matches(name, timm.list_models(), n=MAX_SUGGESTIONS)
    suggestion = f"closest: {', '.join(closest)}" if closest else "e.g. regnety_160, resnet18"
    return f"unknown {role} model '{name}'; any name in timm.list_models() works ({suggestion})"



class TeacherError(BadInput):
    """A teacher that cannot be built as asked: weights out of reach, or a classifier that does not fit."""


# timm resolves a bare architecture name to its default pretrained tag. For regnety_160 (timm 1.0) that is
# regnety_160.sw_in12k_ft_in1k, not the weights DeiT distilled from and VkD used.
DEFAULT_PRETRAINED_TAGS = {"regnety_160": "regnety_160.deit_in1k"}


def pretrained_name(name: str) -> str:
    """``name`` with the pretrained tag timm will download (``arch.tag``)."""
    return name if "." in name else DEFAULT_PRETRAINED_TAGS.get(name, name)


def _download_pretrained(name: str, **kwargs) -> nn.Module:
    tagged = pretrained_name(name)
    # Offline when the hub cannot be reached: cached weights are still used, and nothing waits on the network.
    with hub_offline_unless_reachable() as offline:
        try:
            return timm.create_model(tagged, pretrained=True, **kwargs)
        except Exception as error:  # no network and no cache, gated repository, unknown tag ...
            reason = ("the model hub cannot be reached and the weights are not cached" if offline
                      else type(error).__name__)
            raise TeacherError(f"could not download pretrained weights '{tagged}' ({reason}); pass --teacher-path "
                               f"FILE with local weights") from None


def create_teacher(name: str, num_classes: Optional[int] = None, teacher_path: Optional[str] = None,
                   channels_last: bool = False, **kwargs) -> nn.Module:
    """A frozen timm teacher in eval mode, with ``teacher.weights`` saying where its weights came from.

    Weights from ``teacher_path`` (strict), else timm's pretrained weights (``pretrained_name``: DeiT's
    RegNetY-160 for ``regnety_160``). ``num_classes=None`` keeps the classifier of the weights (the
    file's or the pretrained one); a number builds that classifier, and a file with another class count
    is then a ``TeacherError``. ``channels_last`` stores the convolution weights channels-last: the same
    function, and convolutions then run in that (faster) layout; only the last bits of outputs differ.
    """
    if name.split(".")[0] not in timm.list_models():
        raise TeacherError(unknown_model_line("teacher", name))
    if teacher_path is None:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        teacher = _download_pretrained(name, **extra, **kwargs)
        teacher.weights = {"source": f"timm:{pretrained_name(name)}"}
    else:
        state_dict = load_state_dict_file(teacher_path, preferred_keys=("model", "state_dict"))
        # Built once with the class count asked for (a large teacher takes seconds to build); without one, again
        # with the file's if the default differs.
        extra = {} if num_classes is None else {"num_classes": num_classes}
        teacher = timm.create_model(name, pretrained=False, **extra, **kwargs)
        head_key = classifier_weight_key(teacher)
        file_classes = int(state_dict[head_key].shape[0]) if head_key in state_dict else None
        if num_classes is not None and file_classes is not None and file_classes != num_classes:
            raise TeacherError(f"teacher file {teacher_path} has {file_classes} classes, {num_classes} expected")
        if num_classes is None and file_classes is not None and file_classes != teacher.num_classes:
            teacher = timm.create_model(name, pretrained=False, num_classes=file_classes, **kwargs)
        strict_load(teacher, state_dict, teacher_path)
        teacher.weights = {"source": os.path.abspath(teacher_path), "sha256": file_sha256(teacher_path)}
    freeze(teacher)
    if channels_last:
        # Weights alone suffice: a convolution returns the memory format of its weight.
        teacher.to(memory_format=torch.channels_last)
    return teacher
