"""Export a trained student for use outside this repository: ONNX, a torch.export program, or safetensors.

    python export.py --checkpoint latest.pth.tar --student-model deit_ti_distilled --input-size 224 \\
        --format onnx --out student.onnx

The exported student is the evaluation form (the mean of its two heads' logits) without the projector, with
a dynamic batch axis, and its config ``FILE.json`` beside it (``student.onnx.json``; ``models/inference.py``).
Each export is written to a temporary beside ``--out``, loaded back and compared with the PyTorch student on a
random batch and on a batch of real images (``--check-images FOLDER``, else scikit-learn's digits); only a
file within ``CHECK_TOLERANCE`` of the largest |logit| is renamed to ``--out``, else exit code 1 and no file
changed. An existing ``--out`` is replaced only with ``--overwrite``, and never the checkpoint itself.
"""
import contextlib
import io
import json
import os
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from models.inference import (
    FORMAT_SUFFIXES,
    Logits,
    config_path,
    config_text,
    eval_transform,
    image_files,
    load_checkpoint_student,
    load_classifier,
    read_image,
    safetensors_bytes,
)
from vkd.cli import entry_point
from vkd.config import OneLineErrorParser
from vkd.data.digits import DIGITS_MAX_VALUE
from vkd.errors import OUT_OF_SPACE, BadInput, RunFailed

ONNX_OPSET = 20
# Largest |logits difference| accepted between the exported and the PyTorch student, relative to the largest
# |logit| (when above 1): float32 rounding grows with the logits' scale.
CHECK_TOLERANCE = 1e-4
EXAMPLE_BATCH = 2  # the traced batch: with 1, the exporters would fix the batch size at 1
RANDOM_CHECK_BATCH = 3  # not the traced batch, so that the check also exercises the dynamic batch axis
MAX_CHECK_IMAGES = 16
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_CONFIG_KEY = "vkd_config"  # the ONNX file's metadata entry holding the JSON config


def _dynamic_batch():
    return ({0: torch.export.Dim("batch", min=1)},)


def onnx_bytes(student: nn.Module, example: torch.Tensor, config: dict) -> bytes:
    """The ONNX file, with the config in its metadata (``config`` gains the opset and the input/output names)."""
    # The dynamo exporter (torch.export, then onnxscript's translation) handles these students on torch 2.14,
    # so the TorchScript exporter is not used.
    program = torch.onnx.export(student, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_batch(),
                                opset_version=ONNX_OPSET, verbose=False)
    config.update(onnx_opset=program.model.opset_imports[""], onnx_input=INPUT_NAME, onnx_output=OUTPUT_NAME)
    program.model.metadata_props[ONNX_CONFIG_KEY] = json.dumps(config)
    return program.model_proto.SerializeToString()  # one file: every student is far below ONNX's 2 GB limit


def program_bytes(student: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(student, (example,), dynamic_shapes=_dynamic_batch()), buffer)
    return buffer.getvalue()


def exported_bytes(student: nn.Module, config: dict, export_format: str) -> Tuple[bytes, str]:
    """The exported file's content, in memory (so that a full disk is one Python error, not a C++ abort in a
    native writer), and its description."""
    size = config["input_size"]
    example = torch.randn(EXAMPLE_BATCH, 3, size, size)
    if export_format == "onnx":
        content = onnx_bytes(student, example, config)
        return content, f"ONNX opset {config['onnx_opset']}, dynamo exporter, dynamic batch axis"
    if export_format == "torch-export":
        return program_bytes(student, example), "torch.export program, dynamic batch axis"
    return safetensors_bytes(student), "safetensors weights"


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
def compare(student: nn.Module, logits_of: Logits,
            batches: List[Tuple[str, torch.Tensor]]) -> Tuple[Dict[str, float], float]:
    """The max |logits difference| on each batch, and the largest |logit| of the PyTorch student."""
    differences, largest = {}, 0.0
    for name, images in batches:
        expected = student(images)
        differences[name] = (logits_of(images) - expected).abs().max().item()
        largest = max(largest, expected.abs().max().item())
    return differences, largest


def _refuse_unsafe_out(out: str, checkpoint: str, overwrite: bool) -> None:
    """``--out`` and its config must be files that may be replaced: never the checkpoint (through any link),
    an existing file only with ``--overwrite``; its folder may be created, not found a file."""
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BadInput(f"--out {out}: {ancestor} is not a folder")
    for path in (out, config_path(out)):
        if os.path.isdir(path):
            raise BadInput(f"--out {out}: {path} is a folder; give a file name")
        if os.path.exists(path) and os.path.exists(checkpoint) and os.path.samefile(path, checkpoint):
            raise BadInput(f"--out {out} would replace the checkpoint {checkpoint} itself: choose another --out")
        if os.path.lexists(path) and not overwrite:
            raise BadInput(f"{path} already exists: pass --overwrite to replace it (only by an export that passed "
                           f"its check), or choose another --out")


def _write_failure(out: str, error: OSError) -> Exception:
    """One line for a failed write beside ``out``: a full disk (exit 1) or a place that cannot be written."""
    folder, name = os.path.split(os.path.abspath(out))
    if error.errno in OUT_OF_SPACE:
        kept = f"the previous {name} is kept" if os.path.lexists(out) else "nothing was written"
        return RunFailed(f"no space left in {folder} to write {name}: free some space and export again ({kept})")
    return BadInput(f"cannot write {out} ({error.strerror or type(error).__name__}): choose another --out")


@contextlib.contextmanager
def _writing(out: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise _write_failure(out, error) from None


@contextlib.contextmanager
def staged_beside(out: str) -> Iterator[str]:
    """A new temporary path beside ``out``, with its suffix so that it loads as ``out`` will. It and its config
    are removed on leaving, whatever happened, unless ``publish`` renamed them."""
    folder, name = os.path.split(os.path.abspath(out))
    temporary = os.path.join(folder, f".{name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}{os.path.splitext(name)[1]}")
    try:
        yield temporary
    finally:
        for path in (temporary, config_path(temporary)):
            if os.path.lexists(path):
                os.remove(path)


def write_new_file(path: str, content: bytes) -> None:
    """``content`` in a file that must not exist yet, on disk (fsync) before the function returns. Its mode is
    what ``open`` gives (0666 less the umask), as for any file a person writes."""
    with open(path, "xb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def publish(temporary: str, out: str) -> None:
    """Rename a checked export and its config onto ``out``: each rename is atomic, so a kill leaves the
    previous file or the new one, never a part of one."""
    for source, target in ((temporary, out), (config_path(temporary), config_path(out))):
        os.replace(source, target)
    folder = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the renames themselves survive a power loss
    finally:
        os.close(folder)


def export_student(checkpoint: str, out: str, export_format: str, student_model: Optional[str] = None,
                   input_size: Optional[int] = None, check_images: Optional[str] = None, overwrite: bool = False,
                   log=print) -> Dict[str, float]:
    """Writes ``out`` and its config once they pass the check; returns the max |logits difference| of each
    check batch."""
    suffix = FORMAT_SUFFIXES[export_format]
    if not out.endswith(suffix):
        raise BadInput(f"--out must end in {suffix} for --format {export_format}, got {out}")
    if check_images is not None and not os.path.isdir(check_images):
        raise BadInput(f"--check-images {check_images}: not a folder")
    _refuse_unsafe_out(out, checkpoint, overwrite)
    with _writing(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with staged_beside(out) as temporary:
        with _writing(out):  # a folder that cannot be written fails now, not after the export
            write_new_file(temporary, b"")
            os.remove(temporary)
        student, config = load_checkpoint_student(checkpoint, student_model, input_size)
        config["format"] = export_format
        log(f"Student {config['architecture']}, input {config['input_size']} px, {config['num_classes']} classes, "
            f"from {checkpoint} (sha256 {config['checkpoint_sha256']})")
        batches = check_batches(config, check_images)  # before exporting: bad check images fail early
        content, written = exported_bytes(student, config, export_format)
        with _writing(out):
            write_new_file(temporary, content)
            write_new_file(config_path(temporary), config_text(config).encode())

        logits_of, _ = load_classifier(temporary, trust_program=True)  # the file just written: no stranger's
        differences, largest = compare(student, logits_of, batches)
        limit = CHECK_TOLERANCE * max(1.0, largest)
        log("Check against the PyTorch student, max |logits difference|: "
            + ", ".join(f"{difference:.2e} on {name}" for name, difference in differences.items())
            + f" (limit {limit:.2e}: {CHECK_TOLERANCE:.0e} x max(1, largest |logit| {largest:.3g}))")
        worst = max(differences.values())
        if not worst <= limit:  # also catches NaN
            kept = f"the previous {out} is kept" if os.path.lexists(out) else f"{out} was not written"
            raise RunFailed(f"the exported student's logits differ from the PyTorch student's by up to {worst:.2e}, "
                            f"more than {limit:.2e}; {kept}")
        with _writing(out):
            publish(temporary, out)
    log(f"Wrote {out} ({written}) and {config_path(out)}")
    return differences


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Export a trained student (ONNX, torch.export or safetensors) with "
                                            "its JSON config, checked against PyTorch")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="student checkpoint: ours (latest.pth.tar ...) or the released layout")
    parser.add_argument("--student-model", default=None, metavar="MODEL",
                        help="the student's timm architecture (default: the checkpoint's training run's, else "
                             "deit_ti_distilled)")
    parser.add_argument("--input-size", default=None, type=int,
                        help="input size in pixels (default: the checkpoint's training run's, else 224)")
    parser.add_argument("--format", required=True, choices=tuple(FORMAT_SUFFIXES), dest="export_format")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="exported file (.onnx, .pt2 or .safetensors, as --format); its config FILE.json is "
                             "written beside it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its FILE.json (once the new export passed its check)")
    parser.add_argument("--check-images", default=None, metavar="FOLDER",
                        help=f"check the export on the first {MAX_CHECK_IMAGES} images of FOLDER (default: "
                             f"scikit-learn's digits)")
    return parser


@entry_point(after_full_disk="then export again (an export is put in place only once checked: no file was changed)",
             after_interrupt="no file was changed (an export is put in place only once checked)")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    export_student(args.checkpoint, args.out, args.export_format, args.student_model, args.input_size,
                   args.check_images, args.overwrite)


if __name__ == "__main__":
    main()
