"""Export a trained student for use outside this repository: ONNX, a torch.export program, safetensors, or a
folder timm loads as its own (``--format timm``, optionally uploaded with ``--push-to-hub ORG/NAME``).

    python export.py --checkpoint latest.pth.tar --student-model deit_ti_distilled --input-size 224 \\
        --format onnx --out student.onnx
    python export.py --checkpoint latest.pth.tar --format timm --out student/   # then, with timm:
    # import vkd.models; timm.create_model("local-dir:student", pretrained=True)

The exported student is the evaluation form (the mean of its two heads' logits) without the projector, with
a dynamic batch axis, and its config ``FILE.json`` beside it (``student.onnx.json``; ``models/inference.py``).
Each export is written to a temporary beside ``--out``, loaded back and compared with the PyTorch student on a
random batch and on a batch of real images (``--check-images FOLDER``, else scikit-learn's digits); only a
file within ``CHECK_TOLERANCE`` of the largest |logit| is renamed to ``--out``, else exit code 1 and no file
changed. An existing ``--out`` is replaced only with ``--overwrite``, and never the checkpoint itself.

A timm folder holds ``config.json`` (timm's layout: architecture, classes and their names, the evaluation's
preprocessing in ``pretrained_cfg``, the constructor's ``model_args``), ``model.safetensors`` (no projector) and
``README.md``, a model card filled from the checkpoint and its run folder (``models/model_card.py``). It is
checked like the other formats, loaded back through ``timm.create_model("local-dir:...")``, and its
preprocessing through ``timm.data`` against the evaluation transform.
"""
import contextlib
import io
import os
import shutil
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import models
from models.inference import (
    FORMAT_SUFFIXES,
    Logits,
    config_path,
    config_text,
    dynamic_batch,
    eval_transform,
    image_files,
    load_checkpoint_student,
    load_classifier,
    load_timm_student,
    onnx_bytes,
    read_image,
    safetensors_bytes,
    timm_data_config,
)
from models.model_card import LICENSE, model_card
from vkd.checkpoints import first_line, safe_torch_load
from vkd.cli import entry_point
from vkd.config import OneLineErrorParser
from vkd.data.digits import DIGITS_MAX_VALUE
from vkd.downloads import reachable
from vkd.errors import OUT_OF_SPACE, BadInput, RunFailed

# Largest |logits difference| accepted between the exported and the PyTorch student, relative to the largest
# |logit| (when above 1): float32 rounding grows with the logits' scale.
CHECK_TOLERANCE = 1e-4
EXAMPLE_BATCH = 2  # the traced batch: with 1, the exporters would fix the batch size at 1
RANDOM_CHECK_BATCH = 3  # not the traced batch, so that the check also exercises the dynamic batch axis
MAX_CHECK_IMAGES = 16
TIMM_FORMAT = "timm"
FORMATS = tuple(FORMAT_SUFFIXES) + (TIMM_FORMAT,)
TIMM_FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
# timm's transform of the folder's data config against the evaluation transform, on the same images: the same
# torchvision operations, so equal but for float rounding.
PREPROCESSING_TOLERANCE = 1e-6


def program_bytes(student: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(student, (example,), dynamic_shapes=dynamic_batch()), buffer)
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


def check_images_and_source(check_images: Optional[str]) -> Tuple[List[Image.Image], str]:
    """The real images of the check (those of ``check_images``, else scikit-learn's digits) and their description."""
    if check_images is None:
        return digits_images(MAX_CHECK_IMAGES), "scikit-learn digits images"
    files = image_files(check_images)[:MAX_CHECK_IMAGES]
    if not files:
        raise BadInput(f"--check-images {check_images}: no image files there")
    return [read_image(path) for path in files], f"images of {check_images}"


def preprocessed(images: List[Image.Image], config: dict) -> torch.Tensor:
    transform = eval_transform(config)
    return torch.stack([transform(image) for image in images])


def check_batches(config: dict, check_images: Optional[str]) -> List[Tuple[str, torch.Tensor]]:
    """(description, batch) pairs: random inputs, then real images through the evaluation transform."""
    return batches_of(config, *check_images_and_source(check_images))


def batches_of(config: dict, images: List[Image.Image], source: str) -> List[Tuple[str, torch.Tensor]]:
    size = config["input_size"]
    random_inputs = torch.randn(RANDOM_CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    return [(f"{RANDOM_CHECK_BATCH} random inputs", random_inputs),
            (f"{len(images)} {source}", preprocessed(images, config))]


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


def check_logits(student: nn.Module, logits_of: Logits, batches: List[Tuple[str, torch.Tensor]], out: str,
                 log) -> Dict[str, float]:
    """The max |logits difference| on each batch, printed; a ``RunFailed`` where one is above the tolerance."""
    differences, largest = compare(student, logits_of, batches)
    limit = CHECK_TOLERANCE * max(1.0, largest)
    log("Check against the PyTorch student, max |logits difference|: "
        + ", ".join(f"{difference:.2e} on {name}" for name, difference in differences.items())
        + f" (limit {limit:.2e}: {CHECK_TOLERANCE:.0e} x max(1, largest |logit| {largest:.3g}))")
    worst = max(differences.values())
    if not worst <= limit:  # also catches NaN
        raise RunFailed(f"the exported student's logits differ from the PyTorch student's by up to {worst:.2e}, "
                        f"more than {limit:.2e}; {_kept(out)}")
    return differences


def _kept(out: str) -> str:
    return f"the previous {out} is kept" if os.path.lexists(out) else f"{out} was not written"


def _refuse_missing_parent(out: str) -> None:
    """``--out``'s folder may be created, not found a file."""
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BadInput(f"--out {out}: {ancestor} is not a folder")


def _refuse_unsafe_out(out: str, checkpoint: str, overwrite: bool) -> None:
    """``--out`` and its config must be files that may be replaced: never the checkpoint (through any link),
    an existing file only with ``--overwrite``; its folder may be created, not found a file."""
    _refuse_missing_parent(out)
    for path in (out, config_path(out)):
        if os.path.isdir(path):
            raise BadInput(f"--out {out}: {path} is a folder; give a file name")
        if os.path.exists(path) and os.path.exists(checkpoint) and os.path.samefile(path, checkpoint):
            raise BadInput(f"--out {out} would replace the checkpoint {checkpoint} itself: choose another --out")
        if os.path.lexists(path) and not overwrite:
            raise BadInput(f"{path} already exists: pass --overwrite to replace it (only by an export that passed "
                           f"its check), or choose another --out")


def _refuse_unsafe_folder(out: str, checkpoint: str, overwrite: bool) -> None:
    """A timm folder's ``--out`` may be replaced only with ``--overwrite``, only where it is a folder export.py
    wrote (or an empty one), and never where it holds the checkpoint: replacing it deletes what it holds."""
    _refuse_missing_parent(out)
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise BadInput(f"--out {out} is {'a link' if os.path.islink(out) else 'a file'}: give the path of a new "
                       f"folder (or of a timm folder to replace, with --overwrite)")
    inside = os.path.commonpath([os.path.realpath(out), os.path.realpath(checkpoint)]) == os.path.realpath(out)
    if inside:
        raise BadInput(f"--out {out} holds the checkpoint {checkpoint}: choose another --out")
    if not overwrite:
        raise BadInput(f"{out} already exists: pass --overwrite to replace it (only by an export that passed its "
                       f"check), or choose another --out")
    if os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise BadInput(f"--out {out} is not a timm folder (it has no config.json): --overwrite replaces only a "
                       f"folder export.py wrote; choose another --out")


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


def _beside(out: str, kind: str) -> str:
    """A new hidden path beside ``out`` (``.NAME.KIND.PID.RANDOM`` with ``out``'s suffix)."""
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{name}.{kind}.{os.getpid()}.{uuid.uuid4().hex[:8]}{os.path.splitext(name)[1]}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def staged_beside(out: str) -> Iterator[str]:
    """A new temporary path beside ``out``, with its suffix so that it loads as ``out`` will. It and its config
    (or the folder and all it holds) are removed on leaving, whatever happened, unless ``publish`` renamed them."""
    temporary = _beside(out, "tmp")
    try:
        yield temporary
    finally:
        for path in (temporary, config_path(temporary)):
            _remove(path)


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
    _fsync_folder(os.path.dirname(os.path.abspath(out)))  # the renames themselves survive a power loss


def _fsync_folder(path: str) -> None:
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def publish_folder(temporary: str, out: str) -> None:
    """Rename a checked timm folder onto ``out``. A previous folder is first renamed aside and removed after:
    a kill between the two renames leaves it whole, as ``.NAME.previous.*`` beside ``out``."""
    previous = None
    if os.path.lexists(out):
        previous = _beside(out, "previous")
        os.replace(out, previous)
    os.replace(temporary, out)
    _fsync_folder(os.path.dirname(os.path.abspath(out)))
    if previous is not None:
        shutil.rmtree(previous)


def export_student(checkpoint: str, out: str, export_format: str, student_model: Optional[str] = None,
                   input_size: Optional[int] = None, check_images: Optional[str] = None, overwrite: bool = False,
                   log=print) -> Dict[str, float]:
    """Writes ``out`` and its config once they pass the check; returns the max |logits difference| of each
    check batch. (A timm folder: ``export_timm_folder``.)"""
    if export_format == TIMM_FORMAT:
        return export_timm_folder(checkpoint, out, student_model, input_size, check_images, overwrite, log=log)
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
        _log_student(config, checkpoint, log)
        batches = check_batches(config, check_images)  # before exporting: bad check images fail early
        content, written = exported_bytes(student, config, export_format)
        with _writing(out):
            write_new_file(temporary, content)
            write_new_file(config_path(temporary), config_text(config).encode())

        logits_of, _ = load_classifier(temporary, trust_program=True)  # the file just written: no stranger's
        differences = check_logits(student, logits_of, batches, out, log)
        with _writing(out):
            publish(temporary, out)
    log(f"Wrote {out} ({written}) and {config_path(out)}")
    return differences


def _log_student(config: dict, checkpoint: str, log) -> None:
    log(f"Student {config['architecture']}, input {config['input_size']} px, {config['num_classes']} classes, "
        f"from {checkpoint} (sha256 {config['checkpoint_sha256']})")


# ----------------------------------------------------------------------------- a timm folder, and the Hub


def write_timm_folder(student: nn.Module, config: dict, folder: str, card: str) -> None:
    """``folder`` (new) in timm's layout, by timm's ``save_for_hf``, with ``card`` as its README.md; on disk
    (fsync) before the function returns."""
    from safetensors import SafetensorError
    from timm.models import save_for_hf

    # The student's default pretrained_cfg names the source of timm's pretrained weights for its architecture
    # (tag, URL, licence, paper); these weights are not those, so only what describes the architecture is kept,
    # with the evaluation's preprocessing. timm up to 1.0.2x writes the pretrained_cfg as it finds it, and the
    # constructor's arguments only as given (later versions also record them on creation).
    student.pretrained_cfg = {key: value for key, value in student.pretrained_cfg.items()
                              if key in ("architecture", "fixed_input_size", "min_input_size", "num_classes",
                                         "pool_size", "first_conv", "classifier")}
    student.pretrained_cfg.update(timm_data_config(config), license=LICENSE)
    try:
        save_for_hf(student, folder, model_config=dict(label_names=config["class_names"]),
                    model_args=_constructor_args(student, config), safe_serialization=True)
    except SafetensorError as error:  # the safetensors writer reports a failed write (a full disk) as its own type
        raise RunFailed(f"could not write the weights of {folder}: {first_line(error)}") from None
    write_new_file(os.path.join(folder, "README.md"), card.encode())
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_folder(folder)


def _constructor_args(student: nn.Module, config: dict) -> dict:
    """What timm must pass the architecture's constructor besides the class count: the input size where the
    architecture fixes it (ViTs, the DeiT students), and a distilled student's eval head."""
    args = {"img_size": config["input_size"]} if student.pretrained_cfg.get("fixed_input_size") else {}
    if models.has_distillation_head(student):
        args["eval_head"] = student.eval_head
    return args


def check_preprocessing(images: List[Image.Image], config: dict, loaded_config: dict, out: str, log) -> None:
    """timm's transform of the folder's data config is the evaluation transform, on the check's real images."""
    difference = (preprocessed(images, loaded_config) - preprocessed(images, config)).abs().max().item()
    log(f"Check of timm's preprocessing (timm.data.create_transform of the folder's pretrained_cfg) against the "
        f"evaluation transform: max |difference| {difference:.2e} on {len(images)} images")
    if not difference <= PREPROCESSING_TOLERANCE:
        raise RunFailed(f"timm's preprocessing of the folder differs from the evaluation transform by up to "
                        f"{difference:.2e}, more than {PREPROCESSING_TOLERANCE:.0e}; {_kept(out)}")


def export_timm_folder(checkpoint: str, out: str, student_model: Optional[str] = None,
                       input_size: Optional[int] = None, check_images: Optional[str] = None, overwrite: bool = False,
                       push_to_hub: Optional[str] = None, private: bool = True, log=print) -> Dict[str, float]:
    """Writes the timm folder ``out`` once it passes the check (and uploads it to ``push_to_hub``); returns the
    max |logits difference| of each check batch."""
    out = os.path.normpath(out)  # "student/" names the folder "student"
    if push_to_hub is not None:
        _refuse_bad_repo_id(push_to_hub)
    if check_images is not None and not os.path.isdir(check_images):
        raise BadInput(f"--check-images {check_images}: not a folder")
    _refuse_unsafe_folder(out, checkpoint, overwrite)
    with _writing(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with staged_beside(out) as temporary:
        with _writing(out):  # a folder that cannot be written fails now, not after the export
            os.mkdir(temporary)
        content = safe_torch_load(checkpoint)
        student, config = load_checkpoint_student(checkpoint, student_model, input_size, content=content)
        _log_student(config, checkpoint, log)
        images, source = check_images_and_source(check_images)
        batches = batches_of(config, images, source)
        load_name = f"hf-hub:{push_to_hub}" if push_to_hub else f"local-dir:{out}"
        with _writing(out):
            write_timm_folder(student, config, temporary, model_card(student, config, content, checkpoint, load_name))
        loaded, loaded_config = load_timm_student(f"local-dir:{temporary}")
        differences = check_logits(student, loaded, batches, out, log)
        check_preprocessing(images, config, loaded_config, out, log)
        with _writing(out):
            publish_folder(temporary, out)
    log(f"Wrote {out} ({', '.join(TIMM_FOLDER_FILES)}): timm.create_model(\"local-dir:{out}\", pretrained=True)"
        + (" after import vkd.models" if config["architecture"] in models.STUDENT_MODELS else ""))
    if push_to_hub is not None:
        push_folder(out, push_to_hub, private, log)
    return differences


def _refuse_bad_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
        well_formed = repo_id.count("/") == 1
    except HFValidationError:
        well_formed = False
    if not well_formed:
        raise BadInput(f"--push-to-hub {repo_id}: not a Hub repository name; give ORG/NAME (letters, digits, '-', "
                       f"'_', '.')")


def _without_token(text: str) -> str:
    """``text`` with the Hub token, should a server message ever echo it, masked: it is never printed."""
    from huggingface_hub import get_token
    token = get_token()
    return text.replace(token, "***") if token else text


def push_folder(folder: str, repo_id: str, private: bool, log) -> None:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing, private unless ``private`` is
    False) through huggingface_hub, which reads the token from where it keeps it (``HF_TOKEN``, ``hf auth
    login``). The folder stays whatever happens."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    later = f"{folder} is kept; upload it later with: hf upload {repo_id} {folder}"
    if not reachable(constants.ENDPOINT):
        raise BadInput(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached; {later}")
    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder,
                                      commit_message="A student distilled and exported by VkD's export.py")
    # The hub client raises HTTP, connection and token errors of many types.
    except Exception as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        message = _without_token(first_line(error))
        if status in (401, 403) or isinstance(error, LocalTokenNotFoundError):
            raise BadInput(f"the Hub refused the upload to {repo_id} ({message}): log in with `hf auth login` or "
                           f"set HF_TOKEN to a token that may write there; {later}") from None
        raise RunFailed(f"could not upload {folder} to {repo_id} ({message}); {later}") from None
    log(f"Uploaded {folder} to {constants.ENDPOINT}/{repo_id} ({'private' if private else 'public'} if new): "
        f"timm.create_model(\"hf-hub:{repo_id}\", pretrained=True)")


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Export a trained student (ONNX, torch.export or safetensors with its "
                                            "JSON config, or a timm folder), checked against PyTorch")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="student checkpoint: ours (latest.pth.tar ...) or the released layout")
    parser.add_argument("--student-model", default=None, metavar="MODEL",
                        help="the student's timm architecture (default: the checkpoint's training run's, else "
                             "deit_ti_distilled)")
    parser.add_argument("--input-size", default=None, type=int,
                        help="input size in pixels (default: the checkpoint's training run's, else 224)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="exported file (.onnx, .pt2 or .safetensors, as --format), its config FILE.json "
                             "written beside it; with --format timm, a new folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its FILE.json, or a timm folder export.py wrote (once "
                             "the new export passed its check)")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="with --format timm: then upload the folder to this Hugging Face Hub repository "
                             "(created private if missing; the token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--public", action="store_true",
                        help="with --push-to-hub: create a missing repository public")
    parser.add_argument("--check-images", default=None, metavar="FOLDER",
                        help=f"check the export on the first {MAX_CHECK_IMAGES} images of FOLDER (default: "
                             f"scikit-learn's digits)")
    return parser


@entry_point(after_full_disk="then export again (an export is put in place only once checked: no file was changed)",
             after_interrupt="no file was changed (an export is put in place only once checked)")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.export_format != TIMM_FORMAT and (args.push_to_hub or args.public):
        raise BadInput(f"{'--push-to-hub' if args.push_to_hub else '--public'} uploads a timm folder: "
                       f"add --format timm")
    if args.public and not args.push_to_hub:
        raise BadInput("--public applies to --push-to-hub ORG/NAME")
    if args.export_format == TIMM_FORMAT:
        export_timm_folder(args.checkpoint, args.out, args.student_model, args.input_size, args.check_images,
                           args.overwrite, args.push_to_hub, private=not args.public)
    else:
        export_student(args.checkpoint, args.out, args.export_format, args.student_model, args.input_size,
                       args.check_images, args.overwrite)


if __name__ == "__main__":
    main()
