"""The model card (README.md) of a timm folder: the Hub's front matter, and what a user needs to trust the
weights, read from the checkpoint and from its training run's folder (the checkpoint's own folder: ``args.json``,
``log.txt``, ``eval_results.json``) where that is beside it. What neither records is said to be not known."""
import json
import os
import shlex
from typing import List, Optional, Tuple

import torch.nn as nn
from huggingface_hub import ModelCardData

import distillers
from vkd.models import STUDENT_MODELS

VKD_CITATION = """@inproceedings{miles2024vkd,
  title     = {{VkD}: Improving Knowledge Distillation using Orthogonal Projections},
  author    = {Miles, Roy and Elezi, Ismail and Deng, Jiankang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""
TAGS = ["image-classification", "timm", "knowledge-distillation", "vkd"]
LICENSE = "apache-2.0"
DATA_SETS = {  # --data-set -> (what the card calls it, the Hub's data set id or None)
    "IMNET": ("ImageNet-1k", "imagenet-1k"),
    "CIFAR": ("CIFAR-100", "cifar100"),
    "C100": ("CIFAR-100", "cifar100"),
    "FMNIST": ("Fashion-MNIST", "fashion_mnist"),
    "DIGITS": ("scikit-learn's 8x8 digits", None),
    "FOLDER": ("an image folder", None),
}
ARGS_FILE, LOG_FILE, EVAL_FILE = "args.json", "log.txt", "eval_results.json"  # vkd.runs' and main_distributed's
NO_RUN_ARGS = "not recorded: the checkpoint keeps no training arguments (released checkpoints keep only weights)"


def _read_json(path: str) -> Optional[dict]:
    """A JSON object from ``path``; None where it is missing or unreadable (the card then says not known)."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _log_records(path: str) -> List[dict]:
    records = []
    try:
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a kill
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def _same_file(first: object, second: str) -> bool:
    try:
        return isinstance(first, str) and os.path.samefile(first, second)
    except OSError:
        return False


def evaluation_accuracy(checkpoint: str, epoch: Optional[int]) -> Optional[Tuple[float, float, str]]:
    """(top-1, top-5, where they come from) of this checkpoint: an ``--eval-student`` run of it
    (``eval_results.json`` naming this file), else the validation of the epoch it was saved at (``log.txt``)."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    evaluated = _read_json(os.path.join(folder, EVAL_FILE))
    if evaluated and _same_file(evaluated.get("checkpoint"), checkpoint) and "acc1" in evaluated:
        images = f" on {evaluated['images']} validation images" if "images" in evaluated else ""
        return evaluated["acc1"], evaluated.get("acc5"), f"{EVAL_FILE}{images}"
    if epoch is None:
        return None
    for record in reversed(_log_records(os.path.join(folder, LOG_FILE))):
        if record.get("epoch") == epoch and "val_acc1" in record:
            images = f", {record['val_images']} validation images" if "val_images" in record else ""
            return record["val_acc1"], record.get("val_acc5"), f"{LOG_FILE}, epoch {epoch}{images}"
    return None


def _percent(value: object) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) else "not known"


def _teacher_line(run_args: dict, recorded: Optional[dict]) -> str:
    if not run_args:
        return NO_RUN_ARGS
    weights = (recorded or {}).get("teacher_weights")
    if isinstance(weights, dict) and weights.get("source"):
        checksum = f", sha256 `{weights['sha256']}`" if weights.get("sha256") else ""
        origin = f"weights `{weights['source']}`{checksum}"
    elif run_args.get("teacher_path"):
        origin = f"weights `{run_args['teacher_path']}` (its sha256 is not known: no {ARGS_FILE} beside the checkpoint)"
    else:
        origin = f"timm's pretrained weights (the exact tag is not known: no {ARGS_FILE} beside the checkpoint)"
    return f"`{run_args.get('teacher', 'not known')}`, {origin}"


def _method_line(run_args: dict) -> str:
    if not run_args:
        return NO_RUN_ARGS
    name = run_args.get("distiller", distillers.DEFAULT_DISTILLER)  # runs before --distiller existed used VkD
    method = distillers.DISTILLERS.get(name)
    if method is None:
        return f"`{name}`"
    settings = ", ".join(f"{dest}={run_args[dest]!r}" for dest in method.flag_dests() if dest in run_args)
    return f"`{name}` ({method.source}): {method.summary}; settings: {settings or 'none'}"


def _data_line(run_args: dict, epoch: Optional[int]) -> str:
    if not run_args:
        return NO_RUN_ARGS
    data_set = run_args.get("data_set", "not known")
    name = DATA_SETS.get(data_set, (data_set, None))[0]
    subset = run_args.get("subset")
    subset = f", subset {subset}" if subset and subset != "FULL" else ""
    path = f", `--data-path {run_args['data_path']}`" if run_args.get("data_path") else ""
    saved_at = f" (this checkpoint: after epoch {epoch + 1})" if epoch is not None else ""
    return (f"{name} (`--data-set {data_set}`{subset}{path}), {run_args.get('input_size', 'not known')} px; "
            f"epochs: {run_args.get('epochs', 'not known')}{saved_at}; batch size {run_args.get('batch_size')} per "
            f"process")


def _commands(recorded: Optional[dict]) -> str:
    invocations = (recorded or {}).get("invocations") or ([recorded] if recorded and "command" in recorded else [])
    lines = [f"python main_distributed.py {shlex.join(str(item) for item in entry['command'])}"
             for entry in invocations if isinstance(entry, dict) and isinstance(entry.get("command"), list)]
    if not lines:
        return f"Not known: no readable {ARGS_FILE} beside the checkpoint.\n"
    return "One line per invocation (a resume adds one):\n\n```bash\n" + "\n".join(lines) + "\n```\n"


def front_matter(run_args: dict) -> str:
    hub_data_set = DATA_SETS.get(run_args.get("data_set"), (None, None))[1]
    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", license=LICENSE, tags=TAGS,
                         datasets=[hub_data_set] if hub_data_set else None)
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(student: nn.Module, config: dict, content: dict, checkpoint: str, load_name: str) -> str:
    """The README.md of the timm folder of ``student`` (``config``: ``load_checkpoint_student``'s), exported from
    ``checkpoint`` (``content``: the file); ``load_name`` is what the card tells timm to load."""
    run_args = content.get("args") or {}
    epoch = content.get("epoch") if isinstance(content.get("epoch"), int) else None
    recorded = _read_json(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), ARGS_FILE))
    accuracy = evaluation_accuracy(checkpoint, epoch)
    if accuracy is None:
        evaluation = (f"not known: no {EVAL_FILE} of this checkpoint and no validation of its epoch in {LOG_FILE} "
                      f"beside it")
    else:
        evaluation = f"top-1 {_percent(accuracy[0])}, top-5 {_percent(accuracy[1])} ({accuracy[2]})"
    architecture, size = config["architecture"], config["input_size"]
    parameters = sum(parameter.numel() for parameter in student.parameters())
    registers = ("import vkd.models  # the VkD repository's DeiT students, registered with timm (pip install it)\n"
                 if architecture in STUDENT_MODELS else "")
    teacher = f" from {run_args['teacher']}" if run_args.get("teacher") else ""
    return (front_matter(run_args) + f"# {architecture} distilled{teacher}\n\n"
            f"A `{architecture}` student trained by knowledge distillation with the VkD repository's "
            f"`main_distributed.py`, exported with `export.py --format timm` (checked against the checkpoint: "
            f"same logits within 1e-4 of the largest).\n\n"
            f"## Model details\n\n"
            f"- **Student:** `{architecture}`, {parameters / 1e6:.2f} M parameters, {size} px input, "
            f"{config['num_classes']} classes; output: {config['output']}\n"
            f"- **Teacher:** {_teacher_line(run_args, recorded)}\n"
            f"- **Distillation method:** {_method_line(run_args)}\n"
            f"- **Data and schedule:** {_data_line(run_args, epoch)}\n"
            f"- **Evaluation:** {evaluation}\n"
            f"- **Checkpoint:** `{config['checkpoint']}`, sha256 `{config['checkpoint_sha256']}`\n\n"
            f"## Training command\n\n{_commands(recorded)}\n"
            f"## How to load\n\n"
            f"```python\nimport timm\n{registers}"
            f"model = timm.create_model(\"{load_name}\", pretrained=True).eval()\n"
            f"transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))\n"
            f"logits = model(transform(image).unsqueeze(0))  # image: a PIL RGB image\n"
            f"class_names = model.pretrained_cfg[\"label_names\"]\n```\n\n"
            f"The transform is the evaluation's (bicubic resize and centre crop at {config['eval_crop_ratio']} above "
            f"32 px, a plain resize at 32 px and below; ImageNet mean and std).\n\n"
            f"## Citation\n\n```bibtex\n{VKD_CITATION}\n```\n")
