"""A trained student outside training: loaded from a checkpoint, from an exported file or through timm, for
inference.

Every exported file (``FILE.onnx``, ``FILE.pt2``, ``FILE.safetensors``) has its config beside it, under its
name with ``.json`` added (``FILE.onnx.json``...): the architecture, the input size and the evaluation
preprocessing, the classes and their names, and the SHA-256 of the checkpoint it came from, so that it can be
used without the checkpoint or this repository. A timm folder (``export.py --format timm``) holds the same in
timm's own layout, and timm loads it by name: ``local-dir:DIR``, or ``hf-hub:ORG/NAME`` once uploaded.
"""
import contextlib
import json
import logging
import os
import warnings
from numbers import Real
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

import datasets
import models
from models.loading import load_student_checkpoint, saved_run_args
from vkd.checkpoints import (
    classifier_weight_key,
    file_sha256,
    first_line,
    safe_torch_load,
    state_dict_in,
    strict_load,
    strip_ddp_prefix,
)
from vkd.data.folders import open_rgb_image
from vkd.downloads import hub_offline_unless_reachable
from vkd.errors import BadInput, CheckpointError
from vkd.models import EVAL_HEADS, DistilledVisionTransformer

DEFAULT_STUDENT_MODEL, DEFAULT_INPUT_SIZE = "deit_ti_distilled", 224
FORMAT_SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
CONFIG_KEYS = ("architecture", "input_size", "num_classes", "class_names", "mean", "std", "eval_crop_ratio")
# Formats whose loading reads numbers only: what may come from strangers. A torch.export program may not.
SAFE_FORMATS = "an ONNX or safetensors export, or a timm folder (model.safetensors with its config.json)"
# Names timm.create_model loads a model by, weights included: a folder (save_for_hf's layout) or a Hub repository.
TIMM_SOURCES = ("local-dir:", "hf-hub:")
MAX_VALUE_IN_MESSAGE = 40  # characters of a bad value quoted from a file
ONNX_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_CONFIG_KEY = "vkd_config"  # the ONNX file's metadata entry holding the JSON config

Logits = Callable[[torch.Tensor], torch.Tensor]


def class_names_for(stored: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """The checkpoint's own class names; without them (released files) ImageNet's for an ImageNet-sized head,
    as timm ships them, else ``class N``."""
    if stored is not None:
        if not isinstance(stored, (list, tuple)) or not all(isinstance(name, str) for name in stored):
            raise CheckpointError(f"the checkpoint's class_names is {_quoted(stored)}, not a list of names")
        if len(stored) != num_classes:
            raise CheckpointError(f"the checkpoint names {len(stored)} classes but its head has {num_classes}")
        return list(stored)
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


def _quoted(value: object) -> str:
    """A value read from a file, for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE_IN_MESSAGE else text[:MAX_VALUE_IN_MESSAGE] + "..."


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _crop_ratio(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 < value <= 1


def _run_arg(path: str, run_args: dict, key: str, default: object, valid: Callable[[object], bool],
             expected: str, flag: str = "") -> object:
    """``run_args[key]`` (else ``default``), checked: a crafted or damaged checkpoint is one line naming it."""
    value = run_args.get(key, default)
    if not valid(value):
        fix = f": pass {flag}" if flag else ""
        raise CheckpointError(f"{path}: its training run's {key} is {_quoted(value)}, not {expected}{fix}")
    return value


DEFAULT_CLASSES = 1000  # the class count a student is first built with, to find its classifier's key


def _class_count(path: str, student: nn.Module, weights: dict) -> int:
    """The class count of the checkpoint's classifier, found where ``student``'s architecture keeps it."""
    key = classifier_weight_key(student)
    if key is None or key not in weights:
        raise CheckpointError(f"{path} has no {key or 'classifier weight'}: not a checkpoint of a "
                              f"{type(student).__name__} student (pass --student-model with its architecture)")
    return int(weights[key].shape[0])


def load_checkpoint_student(path: str, student_model: Optional[str] = None, input_size: Optional[int] = None,
                            content: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """The student of a checkpoint (ours or the released layout), in eval mode without its projector, and its
    config. The class count is the head's; the architecture and input size are the arguments given, else the
    training run's (our checkpoints keep them), else deit_ti_distilled at 224 px. ``content``: the file, where
    the caller has already read it (``safe_torch_load``)."""
    content = safe_torch_load(path) if content is None else content
    weights = strip_ddp_prefix(state_dict_in(content, path))  # also checks that the file holds a mapping
    run_args = saved_run_args(content)
    if student_model is None:
        student_model = _run_arg(path, run_args, "student_model", DEFAULT_STUDENT_MODEL,
                                 lambda value: isinstance(value, str) and models.is_student_name(value),
                                 "a student architecture", "--student-model")
    if input_size is None:
        input_size = _run_arg(path, run_args, "input_size", DEFAULT_INPUT_SIZE, _positive_int,
                              "a positive integer", "--input-size")
    eval_head = _run_arg(path, run_args, "eval_head", "mean", lambda value: value in EVAL_HEADS,
                         f"one of {', '.join(EVAL_HEADS)}")
    eval_crop_ratio = _run_arg(path, run_args, "eval_crop_ratio", datasets.EVAL_CROP_RATIO, _crop_ratio,
                               "a number in (0, 1]")
    student = models.create_student(student_model, DEFAULT_CLASSES, input_size, eval_head=eval_head).eval()
    num_classes = _class_count(path, student, weights)
    class_names = class_names_for(content.get("class_names"), num_classes)
    if num_classes != DEFAULT_CLASSES:
        student = models.create_student(student_model, num_classes, input_size, eval_head=eval_head).eval()
    load_student_checkpoint(student, path, content)
    config = dict(architecture=student_model, input_size=input_size, num_classes=num_classes, eval_head=eval_head,
                  class_names=class_names, mean=list(datasets.IMAGENET_MEAN), std=list(datasets.IMAGENET_STD),
                  eval_crop_ratio=float(eval_crop_ratio),
                  output=_output_description(student), checkpoint=os.path.basename(path),
                  checkpoint_sha256=file_sha256(path))
    return student, config


# ----------------------------------------------------------------------------- exported files


def config_path(exported_path: str) -> str:
    # The whole name, suffix included: exports of one student to several formats may share a folder.
    return exported_path + ".json"


def config_text(config: dict) -> str:
    """The text of ``FILE.json``, as export.py writes it."""
    return json.dumps(config, indent=1) + "\n"


def _config_problem(config: dict) -> Optional[str]:
    """What makes an exported file's config unusable (an edit, a damaged file), or None."""
    if not isinstance(config, dict):
        return f"it holds {type(config).__name__}, not a JSON object"
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        return f"it lacks {', '.join(missing)}"
    architecture, input_size, num_classes = config["architecture"], config["input_size"], config["num_classes"]
    names = config["class_names"]
    if not isinstance(architecture, str) or not models.is_student_name(architecture):
        return f"architecture is {_quoted(architecture)}, not a timm architecture"
    for key, value in (("input_size", input_size), ("num_classes", num_classes)):
        if not _positive_int(value):
            return f"{key} is {_quoted(value)}, not a positive integer"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return f"class_names is {_quoted(names)}, not a list of names"
    if len(names) != num_classes:
        return f"class_names has {len(names)} names for {num_classes} classes"
    for key in ("mean", "std"):
        values = config[key]
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(value, Real) and not isinstance(value, bool) for value in values)):
            return f"{key} is {_quoted(values)}, not 3 numbers"
    if not all(value > 0 for value in config["std"]):
        return f"std is {_quoted(config['std'])}: every value must be positive"
    if not _crop_ratio(config["eval_crop_ratio"]):
        return f"eval_crop_ratio is {_quoted(config['eval_crop_ratio'])}, not a number in (0, 1]"
    if config.get("eval_head", "mean") not in EVAL_HEADS:
        return f"eval_head is {_quoted(config['eval_head'])}, not one of {', '.join(EVAL_HEADS)}"
    return None


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
    problem = _config_problem(config)
    if problem:
        raise BadInput(f"{path}: {problem}: write it again with export.py")
    return config


def _check_input_size(path: str, config: dict, height_and_width: Sequence[object]) -> None:
    """The config's input size is the one the exported file takes (an edited config would fail later, deep
    inside the runtime)."""
    size = config["input_size"]
    if list(height_and_width) != [size, size]:
        raise BadInput(f"{config_path(path)} says input_size {size}, but {path} takes "
                       f"{'x'.join(map(str, height_and_width))} images: write the config again with export.py")


def dynamic_batch():
    """The dynamic_shapes of a model taking one batch of images: any batch size."""
    return ({0: torch.export.Dim("batch", min=1)},)


def onnx_bytes(model: nn.Module, example: torch.Tensor, config: dict) -> bytes:
    """The ONNX file of ``model`` (export.py's, benchmarks/inference.py's), with ``config`` in its metadata
    (``config`` gains the opset and the input/output names)."""
    # The dynamo exporter (torch.export, then onnxscript's translation) handles these students on torch 2.14,
    # so the TorchScript exporter is not used.
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_batch(),
                                opset_version=ONNX_OPSET, verbose=False)
    config.update(onnx_opset=program.model.opset_imports[""], onnx_input=INPUT_NAME, onnx_output=OUTPUT_NAME)
    program.model.metadata_props[ONNX_CONFIG_KEY] = json.dumps(config)
    return program.model_proto.SerializeToString()  # one file: every student is far below ONNX's 2 GB limit


def safetensors_bytes(student: nn.Module) -> bytes:
    """The student's weights in the safetensors format (export.py writes them)."""
    from safetensors.torch import save
    return save({key: value.contiguous() for key, value in student.state_dict().items()}, metadata={"format": "pt"})


def load_exported_student(path: str) -> Tuple[nn.Module, dict]:
    """The student of a safetensors export, loaded strictly, in eval mode, and its config."""
    from safetensors.torch import load_file
    config = read_config(path)
    # Exports written before the eval head was recorded used the mean of both heads.
    student = models.create_student(config["architecture"], config["num_classes"], config["input_size"],
                                    eval_head=config.get("eval_head", "mean")).eval()
    try:
        weights = load_file(path)
    # safetensors raises its own SafetensorError, or OSError, on a missing or malformed file.
    except Exception as error:
        raise CheckpointError(f"could not read safetensors file {path}: {first_line(error)}") from None
    strict_load(student, weights, path,
                hint=lambda model, state: f"{config_path(path)} may not describe it: write it again with export.py")
    return student, config


def _onnx_logits(path: str, config: dict) -> Logits:
    import onnxruntime  # only ONNX files need it
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    # onnxruntime's errors on a malformed file are its own types (InvalidProtobuf, Fail...).
    except Exception as error:
        raise CheckpointError(f"could not load ONNX file {path}: {first_line(error)}") from None
    images = session.get_inputs()[0]
    _check_input_size(path, config, images.shape[2:])
    return lambda batch: torch.from_numpy(session.run(None, {images.name: batch.numpy()})[0])


@contextlib.contextmanager
def _torch_export_quiet() -> Iterator[None]:
    """torch.export.load logs the whole traceback of a failed load (and warns of its pickles) before raising;
    the caller's one line says what failed."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _program_logits(path: str, config: dict, trusted: bool) -> Logits:
    if not trusted:
        raise CheckpointError(f"{path}: loading a torch.export program can run code (torch unpickles parts of it), "
                              f"so a .pt2 file is read only with --trust-pt2, for files you made; from anyone else, "
                              f"use {SAFE_FORMATS}")
    try:
        with _torch_export_quiet():
            program = torch.export.load(path)
    # A malformed archive fails in zipfile, pickle or torch's deserialiser, each with its own types.
    except Exception as error:
        raise CheckpointError(f"could not load torch.export file {path}: {first_line(error)}") from None
    [images] = [node for node in program.graph.nodes
                if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    _check_input_size(path, config, images.meta["val"].shape[2:])
    return program.module()


def _file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a file, or None; never opens it (a FIFO would block)."""
    if os.path.isfile(path):
        return None
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a folder, not a file"
    return "not a regular file (a FIFO, a socket or a device)"


def load_classifier(path: str, student_model: Optional[str] = None, input_size: Optional[int] = None,
                    trust_program: bool = False) -> Tuple[Logits, dict]:
    """``(logits_of, config)`` for a checkpoint, an exported file (told apart by the suffix) or a name timm loads
    (``local-dir:DIR``, ``hf-hub:ORG/NAME``); ``logits_of`` maps a preprocessed batch [B, 3, S, S] to logits
    [B, classes].

    An exported file's architecture and input size are fixed by its config: other values given are an error.
    A torch.export program (``.pt2``) is refused unless ``trust_program``: loading one can run code.
    """
    if path.startswith(TIMM_SOURCES):
        for flag, given in (("--student-model", student_model), ("--input-size", input_size)):
            if given is not None:
                raise BadInput(f"{flag} is for checkpoints: the config.json of {path} gives it")
        return load_timm_student(path)
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
        return _onnx_logits(path, config), config
    if suffix == FORMAT_SUFFIXES["torch-export"]:
        return _program_logits(path, config, trust_program), config
    return load_exported_student(path)


# ----------------------------------------------------------------------------- through timm


def _timm_class_names(pretrained_cfg: dict, num_classes: int) -> List[str]:
    """A timm model's class names: its label_names (through label_descriptions where it has them, as timm's
    ImageNet models do), else ``class_names_for``'s."""
    names = pretrained_cfg.get("label_names")
    descriptions = pretrained_cfg.get("label_descriptions")
    if isinstance(names, (list, tuple)) and isinstance(descriptions, dict):
        names = [descriptions.get(name, name) for name in names]
    return class_names_for(names, num_classes)


def load_timm_student(name: str) -> Tuple[nn.Module, dict]:
    """A model timm loads by ``name`` (TIMM_SOURCES: config.json and its weights, a safetensors file preferred and
    any other read with ``weights_only``), in eval mode, and its config: class names from its label_names, and
    the preprocessing of its pretrained_cfg (``data_config``, which ``eval_transform`` uses)."""
    import timm
    from timm.data import resolve_data_config

    source, _, location = name.partition(":")
    if source == "local-dir" and not os.path.isfile(os.path.join(location, "config.json")):
        raise BadInput(f"{name}: {location} holds no config.json, so it is not a timm folder (export.py --format "
                       f"timm writes one)")
    offline_reason = contextlib.nullcontext(False) if source == "local-dir" else hub_offline_unless_reachable()
    with offline_reason as offline:
        try:
            model = timm.create_model(name, pretrained=True)
        # timm and the hub client raise many types (unknown architecture, missing file, HTTP errors...).
        except Exception as error:
            reason = "the model hub cannot be reached and the model is not cached" if offline else first_line(error)
            raise CheckpointError(f"could not load {name} through timm: {reason}") from None
    model.eval()
    data_config = resolve_data_config({}, model=model)
    config = dict(architecture=model.pretrained_cfg["architecture"], input_size=data_config["input_size"][-1],
                  num_classes=model.num_classes,
                  class_names=_timm_class_names(model.pretrained_cfg, model.num_classes),
                  data_config=data_config, source=name)
    return model, config


# ----------------------------------------------------------------------------- images


def timm_data_config(config: dict) -> dict:
    """The evaluation preprocessing (``eval_transform``) as timm's data config: what a timm folder's
    pretrained_cfg holds, so that ``timm.data.create_transform(**resolve_data_config({}, model=...))`` is the
    evaluation transform. Inputs of ``SMALL_INPUT_SIZE`` or less are resized to the input size (squashed, no
    crop), larger ones to input size / crop ratio and centre-cropped; both bicubic."""
    size = config["input_size"]
    small = size <= datasets.SMALL_INPUT_SIZE
    return dict(input_size=(3, size, size), interpolation="bicubic", crop_mode="squash" if small else "center",
                crop_pct=1.0 if small else float(config["eval_crop_ratio"]), mean=tuple(config["mean"]),
                std=tuple(config["std"]))


def eval_transform(config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform the student was evaluated with (datasets.build_transform); for a model loaded
    through timm, timm's transform of its data config."""
    if "data_config" in config:
        from timm.data import create_transform
        return create_transform(**config["data_config"])
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
