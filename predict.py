"""The top classes of images, by a trained student: from a checkpoint, from an exported file or through timm.

    python predict.py --checkpoint student.onnx photo.jpg more_photos/ --topk 5
    python predict.py --checkpoint local-dir:student photo.jpg      # or hf-hub:ORG/NAME

``--checkpoint`` takes a training checkpoint (ours or the released layout; ``--student-model`` and
``--input-size`` as export.py takes them) or a file written by export.py (``.onnx`` through onnxruntime,
``.safetensors``, and ``.pt2`` through torch.export only with ``--trust-pt2``: loading one can run code),
whose config ``FILE.json`` (``student.onnx.json``) gives the rest, or a name timm loads: ``local-dir:DIR`` (a
timm folder, ``export.py --format timm``) or ``hf-hub:ORG/NAME``, whose config.json gives the preprocessing
(its pretrained_cfg, through ``timm.data``) and the class names (its label_names). Images are read and predicted
``--batch-size`` at a time, preprocessed as evaluation does. An image that cannot be read gets one line on
stderr and the others are still predicted; the exit code is 0 if any image was predicted, else 2.
"""
import os
import sys
from typing import Callable, Iterable, Iterator, List, Sequence, Tuple

import torch

from models.inference import Logits, eval_transform, image_files, load_classifier, read_image
from vkd.cli import entry_point
from vkd.config import OneLineErrorParser
from vkd.errors import BadInput

DEFAULT_TOPK = 5
DEFAULT_BATCH_SIZE = 32


def expand_folders(paths: Sequence[str], warn) -> List[str]:
    """Files as given, folders replaced by their image files; an empty folder is reported with ``warn``."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = image_files(path)
        if not found:
            warn(f"{path}: no image files in this folder")
        files.extend(found)
    return files


def readable_batches(paths: Iterable[str], transform: Callable, batch_size: int,
                     warn) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """``(path, preprocessed image)`` lists of ``batch_size`` (the last may be shorter), read only as they are
    consumed, so memory holds one batch however many images there are; ``warn`` gets one line for each image
    that cannot be read."""
    batch = []
    for path in paths:
        try:
            batch.append((path, transform(read_image(path))))
        except BadInput as error:
            warn(str(error))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(logits_of: Logits, config: dict, paths: Sequence[str], topk: int, batch_size: int,
            warn) -> Iterator[Tuple[str, List[Tuple[str, float]]]]:
    """``(path, [(class name, probability)] * topk)`` for each readable image, in order; ``warn`` gets one
    line for each image that cannot be read."""
    names = config["class_names"]
    for batch in readable_batches(paths, eval_transform(config), batch_size, warn):
        with torch.no_grad():
            probabilities = logits_of(torch.stack([image for _, image in batch])).float().softmax(dim=-1)
        top = probabilities.topk(min(topk, probabilities.shape[-1]), dim=-1)
        for (path, _), values, indices in zip(batch, top.values.tolist(), top.indices.tolist()):
            yield path, [(names[index], value) for index, value in zip(indices, values)]


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Top classes of images by a trained student (checkpoint, export or "
                                            "timm folder)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a training checkpoint, a .onnx, .safetensors or (with --trust-pt2) .pt2 file "
                             "from export.py, or a model timm loads: local-dir:DIR (export.py --format timm) or "
                             "hf-hub:ORG/NAME")
    parser.add_argument("--trust-pt2", action="store_true",
                        help="also load .pt2 (torch.export) files: loading one can run any code it holds, so pass "
                             "it only for files you made (ONNX and safetensors files need no such trust)")
    parser.add_argument("--student-model", default=None, metavar="MODEL",
                        help="a checkpoint's architecture (default: its training run's, else deit_ti_distilled)")
    parser.add_argument("--input-size", default=None, type=int,
                        help="a checkpoint's input size (default: its training run's, else 224)")
    parser.add_argument("--topk", default=DEFAULT_TOPK, type=int, help=f"classes shown per image (default: "
                                                                         f"{DEFAULT_TOPK})")
    parser.add_argument("--batch-size", default=DEFAULT_BATCH_SIZE, type=int,
                        help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    return parser


def _warn(message: str) -> None:
    print(f"warning: skipped {message}", file=sys.stderr, flush=True)


@entry_point(after_full_disk="then run again (predict.py writes no file of its own)",
             after_interrupt="predict.py writes no file")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for flag, value in (("--topk", args.topk), ("--batch-size", args.batch_size)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    logits_of, config = load_classifier(args.checkpoint, args.student_model, args.input_size, args.trust_pt2)
    paths = expand_folders(args.images, _warn)
    predicted = 0
    for path, classes in predict(logits_of, config, paths, args.topk, args.batch_size, _warn):
        print(path)
        for name, probability in classes:
            print(f"  {probability:.4f}  {name}")
        predicted += 1
    if not predicted:
        raise BadInput(f"no image could be predicted ({len(paths)} file(s) tried)")


if __name__ == "__main__":
    main()
