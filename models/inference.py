"""A trained student outside training: loaded from a checkpoint or from an exported file, for inference.

Every exported file (``FILE.onnx``, ``FILE.pt2``, ``FILE.safetensors``) has its config beside it, under its
name with ``.json`` added (``FILE.onnx.json``...): the architecture, the input size and the evaluation
preprocessing, the classes and their names, and the SHA-256 of the checkpoint it came from, so that it can be
used without the checkpoint or this repository.
"""
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

import datasets
import models
from models.deit import DistilledVisionTransformer
from utils import load_student_checkpoint, saved_run_args
from vkd.checkpoints import first_line, safe_torch_load, state_dict_in, strict_load, strip_ddp_prefix
from vkd.data.folders import open_rgb_image
from vkd.errors import BadInput, CheckpointError

DEFAULT_STUDENT_MODEL, DEFAULT_INPUT_SIZE = "deit_ti_distilled", 224
HEAD_WEIGHT = "head.weight"
FORMAT_SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
CONFIG_KEYS = ("architecture", "input_size", "num_classes", "class_names", "mean", "std", "eval_crop_ratio")

Logits = Callable[[torch.Tensor], torch.Tensor]


def build_student(architecture: str, num_classes: int, input_size: int, eval_head: str = "mean") -> nn.Module:
    """An inference student (eval mode, no projector) whose logits come from ``eval_head`` (models.EVAL_HEADS)."""
    if input_size < 1:
        raise BadInput(f"the input size must be positive, got {input_size}")
    try:
        return models.create_student(architecture, num_classes=num_classes, img_size=input_size,
                                     eval_head=eval_head).eval()
    except ValueError as error:  # an unknown name, an input size the stem cannot take
        raise BadInput(str(error)) from None


def class_names_for(stored: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """The checkpoint's own class names; without them (released files) ImageNet's for an ImageNet-sized head,
    as timm ships them, else ``class N``."""
    if stored is not None:
        if len(stored) != num_classes:
            raise CheckpointError(f"the checkpoint names {len(stored)} classes but its head has {num_classes}")
        return [str(name) for name in stored]
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is not None:
        return list(ImageNetInfo(subset).label_descriptions())
    return [f"class {index}" for index in range(num_classes)]


def _output_description(student: nn.Module) -> str:
    if not isinstance(student, DistilledVisionTransformer):
        return "logits"
    if student.eval_head == "cls":
        return "logits: the class head's (the run trained without logit distillation), as evaluation uses them"
    return "logits: the mean of the class and distillation heads' logits, as evaluation uses them"


def load_checkpoint_student(path: str, student_model: Optional[str] = None,
                            input_size: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """The student of a checkpoint (ours or the released layout), in eval mode without its projector, and its
    config. The class count is the head's; the architecture and input size are the arguments given, else the
    training run's (our checkpoints keep them), else deit_ti_distilled at 224 px."""
    content = safe_torch_load(path)
    weights = strip_ddp_prefix(state_dict_in(content, path))  # also checks that the file holds a mapping
    if HEAD_WEIGHT not in weights:
        raise CheckpointError(f"{path} has no {HEAD_WEIGHT}: not a student checkpoint")
    num_classes = int(weights[HEAD_WEIGHT].shape[0])
    run_args = saved_run_args(content)
    if student_model is None:
        student_model = run_args.get("student_model", DEFAULT_STUDENT_MODEL)
    if input_size is None:
        input_size = int(run_args.get("input_size", DEFAULT_INPUT_SIZE))
    eval_head = run_args.get("eval_head", "mean")
    student = build_student(student_model, num_classes, input_size, eval_head)
    load_student_checkpoint(student, path, content)
    config = dict(architecture=student_model, input_size=input_size, num_classes=num_classes, eval_head=eval_head,
                  class_names=class_names_for(content.get("class_names"), num_classes),
                  mean=list(datasets.IMAGENET_MEAN), std=list(datasets.IMAGENET_STD),
                  eval_crop_ratio=float(run_args.get("eval_crop_ratio", datasets.EVAL_CROP_RATIO)),
                  output=_output_description(student), checkpoint=os.path.basename(path),
                  checkpoint_sha256=models.file_sha256(path))
    return student, config


# ----------------------------------------------------------------------------- exported files


def config_path(exported_path: str) -> str:
    # The whole name, suffix included: exports of one student to several formats may share a folder.
    return exported_path + ".json"


def write_config(exported_path: str, config: dict) -> str:
    path = config_path(exported_path)
    with open(path, "w") as handle:
        json.dump(config, handle, indent=1)
        handle.write("\n")
    return path


def read_config(exported_path: str) -> dict:
    path = config_path(exported_path)
    if not os.path.isfile(path):
        raise BadInput(f"{path} not found: export.py writes it beside every exported file, and it is needed to "
                       f"use {exported_path}")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read {path}: {first_line(error)}") from None
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise BadInput(f"{path} lacks {', '.join(missing)}: write it again with export.py")
    return config


def save_safetensors(student: nn.Module, path: str) -> None:
    from safetensors.torch import save_file
    save_file({key: value.contiguous() for key, value in student.state_dict().items()}, path,
              metadata={"format": "pt"})


def load_exported_student(path: str) -> Tuple[nn.Module, dict]:
    """The student of a safetensors export, loaded strictly, in eval mode, and its config."""
    from safetensors.torch import load_file
    config = read_config(path)
    # Exports written before the eval head was recorded used the mean of both heads.
    student = build_student(config["architecture"], config["num_classes"], config["input_size"],
                            config.get("eval_head", "mean"))
    try:
        weights = load_file(path)
    # safetensors raises its own SafetensorError, or OSError, on a missing or malformed file.
    except Exception as error:
        raise CheckpointError(f"could not read safetensors file {path}: {first_line(error)}") from None
    strict_load(student, weights, path)
    return student, config


def _onnx_logits(path: str) -> Logits:
    import onnxruntime  # only ONNX files need it
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    # onnxruntime's errors on a malformed file are its own types (InvalidProtobuf, Fail...).
    except Exception as error:
        raise CheckpointError(f"could not load ONNX file {path}: {first_line(error)}") from None
    input_name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])


def _program_logits(path: str) -> Logits:
    try:
        module = torch.export.load(path).module()
    # A malformed archive fails in zipfile, pickle or torch's deserialiser, each with its own types.
    except Exception as error:
        raise CheckpointError(f"could not load torch.export file {path}: {first_line(error)}") from None
    return module


def _file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a file, or None; never opens it (a FIFO would block)."""
    if os.path.isfile(path):
        return None
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a folder, not a file"
    return "not a regular file (a FIFO, a socket or a device)"


def load_classifier(path: str, student_model: Optional[str] = None,
                    input_size: Optional[int] = None) -> Tuple[Logits, dict]:
    """``(logits_of, config)`` for a checkpoint or an exported file (told apart by the suffix);
    ``logits_of`` maps a preprocessed batch [B, 3, S, S] to logits [B, classes].

    An exported file's architecture and input size are fixed by its config: other values given are an error.
    """
    problem = _file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    suffix = os.path.splitext(path)[1]
    if suffix not in FORMAT_SUFFIXES.values():
        return load_checkpoint_student(path, student_model, input_size)
    config = read_config(path)
    for flag, given, exported in (("--student-model", student_model, config["architecture"]),
                                  ("--input-size", input_size, config["input_size"])):
        if given is not None and given != exported:
            raise BadInput(f"{path} was exported with {flag} {exported}, not {given}")
    if suffix == FORMAT_SUFFIXES["onnx"]:
        return _onnx_logits(path), config
    if suffix == FORMAT_SUFFIXES["torch-export"]:
        return _program_logits(path), config
    return load_exported_student(path)


# ----------------------------------------------------------------------------- images


def eval_transform(config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform the student was evaluated with (datasets.build_transform)."""
    data_args = datasets.default_data_args(input_size=config["input_size"], eval_crop_ratio=config["eval_crop_ratio"])
    return datasets.build_transform(False, data_args)


def read_image(path: str) -> Image.Image:
    """An 8-bit RGB image (16-bit ones scaled, ``vkd.data.folders.open_rgb_image``), or a ``BadInput`` naming
    the file."""
    problem = _file_problem(path)
    if problem:
        raise BadInput(f"{path}: {problem}")
    try:
        return open_rgb_image(path)
    # PIL raises a wide, undocumented set of types on malformed files (OSError, SyntaxError, ValueError...).
    except Exception as error:
        raise BadInput(f"{path}: not a readable image ({first_line(error)})") from None


def image_files(folder: str) -> List[str]:
    """The image files under ``folder`` (any depth, through links), sorted. A folder reached twice (a link back
    up, two links to one folder) is read once, so a loop neither repeats images nor runs forever."""
    found, seen = [], {os.path.realpath(folder)}
    for root, subfolders, files in os.walk(folder, followlinks=True):
        first_visits = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(root, name))
            if real not in seen:
                seen.add(real)
                first_visits.append(name)
        subfolders[:] = first_visits  # os.walk descends only into these
        found.extend(os.path.join(root, name) for name in files if has_file_allowed_extension(name, IMG_EXTENSIONS))
    return sorted(found)
