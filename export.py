"""Export a trained student for use outside this repository: ONNX, a torch.export program, or safetensors.

    python export.py --checkpoint latest.pth.tar --student-model deit_ti_distilled --input-size 224 \\
        --format onnx --out student.onnx

The exported student is the evaluation form (the mean of its two heads' logits) without the projector, with
a dynamic batch axis, and its config ``FILE.json`` beside it (``student.onnx.json``; ``models/inference.py``).
Each export is loaded back at once and compared with the PyTorch student on a random batch and on a batch of
real images (``--check-images FOLDER``, else scikit-learn's digits); beyond ``CHECK_TOLERANCE`` it fails
with exit code 1.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import models
from models.inference import (
    FORMAT_SUFFIXES,
    Logits,
    config_path,
    eval_transform,
    image_files,
    load_checkpoint_student,
    load_classifier,
    read_image,
    save_safetensors,
    write_config,
)
from vkd.cli import entry_point
from vkd.config import OneLineErrorParser
from vkd.data.digits import DIGITS_MAX_VALUE
from vkd.errors import BadInput, RunFailed

ONNX_OPSET = 20
CHECK_TOLERANCE = 1e-4  # largest |logits difference| accepted between the exported and the PyTorch student
EXAMPLE_BATCH = 2  # the traced batch: with 1, the exporters would fix the batch size at 1
RANDOM_CHECK_BATCH = 3  # not the traced batch, so that the check also exercises the dynamic batch axis
MAX_CHECK_IMAGES = 16
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_CONFIG_KEY = "vkd_config"  # the ONNX file's metadata entry holding the JSON config


def _dynamic_batch():
    return ({0: torch.export.Dim("batch", min=1)},)


def export_onnx(student: nn.Module, example: torch.Tensor, config: dict, path: str) -> int:
    """Writes ``path`` with the config in its metadata; returns the opset written."""
    # The dynamo exporter (torch.export, then onnxscript's translation) handles these students on torch 2.14,
    # so the TorchScript exporter is not used.
    program = torch.onnx.export(student, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_batch(),
                                opset_version=ONNX_OPSET, verbose=False)
    config.update(onnx_opset=program.model.opset_imports[""], onnx_input=INPUT_NAME, onnx_output=OUTPUT_NAME)
    program.model.metadata_props[ONNX_CONFIG_KEY] = json.dumps(config)
    program.save(path, external_data=False)  # one file: every student is far below ONNX's 2 GB limit
    return config["onnx_opset"]


def export_program(student: nn.Module, example: torch.Tensor, path: str) -> None:
    torch.export.save(torch.export.export(student, (example,), dynamic_shapes=_dynamic_batch()), path)


def digits_images(count: int) -> List[Image.Image]:
    """The first ``count`` of scikit-learn's 8x8 digits (shipped with it, so offline) as RGB images with the
    DIGITS data set's pixel values; the evaluation transform resizes them to the input size."""
    from sklearn.datasets import load_digits
    pixels = np.round(load_digits().images[:count] * 255.0 / DIGITS_MAX_VALUE).astype(np.uint8)
    return [Image.fromarray(image).convert("RGB") for image in pixels]


def check_batches(config: dict, check_images: Optional[str]) -> List[Tuple[str, torch.Tensor]]:
    """(description, batch) pairs: random inputs, then real images through the evaluation transform."""
    size = config["input_size"]
    random_inputs = torch.randn(RANDOM_CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    if check_images is None:
        images, source = digits_images(MAX_CHECK_IMAGES), "scikit-learn digits images"
    else:
        files = image_files(check_images)[:MAX_CHECK_IMAGES]
        if not files:
            raise BadInput(f"--check-images {check_images}: no image files there")
        images, source = [read_image(path) for path in files], f"images of {check_images}"
    transform = eval_transform(config)
    real_images = torch.stack([transform(image) for image in images])
    return [(f"{RANDOM_CHECK_BATCH} random inputs", random_inputs), (f"{len(images)} {source}", real_images)]


@torch.no_grad()
def max_logit_difference(student: nn.Module, logits_of: Logits, images: torch.Tensor) -> float:
    return (logits_of(images) - student(images)).abs().max().item()


def export_student(checkpoint: str, out: str, export_format: str, student_model: Optional[str] = None,
                   input_size: Optional[int] = None, check_images: Optional[str] = None,
                   log=print) -> Dict[str, float]:
    """Writes ``out`` and its config, checks it; returns the max |logits difference| of each check batch."""
    suffix = FORMAT_SUFFIXES[export_format]
    if not out.endswith(suffix):
        raise BadInput(f"--out must end in {suffix} for --format {export_format}, got {out}")
    if check_images is not None and not os.path.isdir(check_images):
        raise BadInput(f"--check-images {check_images}: not a folder")
    student, config = load_checkpoint_student(checkpoint, student_model, input_size)
    config["format"] = export_format
    log(f"Student {config['architecture']}, input {config['input_size']} px, {config['num_classes']} classes, "
        f"from {checkpoint} (sha256 {config['checkpoint_sha256']})")
    batches = check_batches(config, check_images)  # before exporting: bad check images fail early

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    size = config["input_size"]
    example = torch.randn(EXAMPLE_BATCH, 3, size, size)
    if export_format == "onnx":
        written = f"ONNX opset {export_onnx(student, example, config, out)}, dynamo exporter, dynamic batch axis"
    elif export_format == "torch-export":
        export_program(student, example, out)
        written = "torch.export program, dynamic batch axis"
    else:
        save_safetensors(student, out)
        written = "safetensors weights"
    write_config(out, config)
    log(f"Wrote {out} ({written}) and {config_path(out)}")

    logits_of, _ = load_classifier(out, trust_program=True)  # the file just written: no stranger's
    differences = {name: max_logit_difference(student, logits_of, images) for name, images in batches}
    log("Check against the PyTorch student, max |logits difference|: "
        + ", ".join(f"{difference:.2e} on {name}" for name, difference in differences.items())
        + f" (limit {CHECK_TOLERANCE:.0e})")
    worst = max(differences.values())
    if not worst <= CHECK_TOLERANCE:  # also catches NaN
        for path in (out, config_path(out)):
            os.remove(path)
        raise RunFailed(f"the exported student's logits differ from the PyTorch student's by up to {worst:.2e}, "
                        f"more than {CHECK_TOLERANCE:.0e}; {out} was removed")
    return differences


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Export a trained student (ONNX, torch.export or safetensors) with "
                                            "its JSON config, checked against PyTorch")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="student checkpoint: ours (latest.pth.tar ...) or the released layout")
    parser.add_argument("--student-model", default=None, choices=models.STUDENT_MODELS, metavar="MODEL",
                        help="the student's architecture (default: the checkpoint's training run's, else "
                             "deit_ti_distilled)")
    parser.add_argument("--input-size", default=None, type=int,
                        help="input size in pixels (default: the checkpoint's training run's, else 224)")
    parser.add_argument("--format", required=True, choices=tuple(FORMAT_SUFFIXES), dest="export_format")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="exported file (.onnx, .pt2 or .safetensors, as --format); its config FILE.json is "
                             "written beside it")
    parser.add_argument("--check-images", default=None, metavar="FOLDER",
                        help=f"check the export on the first {MAX_CHECK_IMAGES} images of FOLDER (default: "
                             f"scikit-learn's digits)")
    return parser


@entry_point
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    export_student(args.checkpoint, args.out, args.export_format, args.student_model, args.input_size,
                   args.check_images)


if __name__ == "__main__":
    main()
