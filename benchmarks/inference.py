"""What distilling bought: each student beside its teacher on the machine it runs on, in one run.

For each pair, both with random weights (size and speed do not depend on the values, and nothing is
downloaded), in eval mode as evaluation runs them (a distilled DeiT student returns the mean of its heads):
parameters, FLOPs of one image (``torch.utils.flop_counter.FlopCounterMode``: a multiply-add counts 2),
the latency of one image (median over ``--latency-repeats``) and the throughput at batch ``--throughput-batch``
(images/s, from the median batch time over ``--throughput-repeats``), in PyTorch eager (no grad) and in
onnxruntime (CPUExecutionProvider, on export.py's dynamo ONNX export, as many threads as torch). Progress goes
to stderr; the last line on stdout is one JSON object.

    .venv/bin/python -m benchmarks.inference           # every pair: a few minutes on 2 cores
    .venv/bin/python -m benchmarks.inference --pairs fmnist --latency-repeats 3

Pairs: ``imagenet``, DeiT-Ti (deit_ti_distilled) vs RegNetY-160 at 224 px, 1000 classes (the paper's);
``fmnist``, DeiT-Ti vs resnet10t at 32 px, 10 classes (``make fmnist``'s DeiT rows: this student is the larger
model); ``fmnist-cnn``, regnetx_002 vs resnet10t at 32 px (``make fmnist``'s CNN rows).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict

import numpy as np
import onnxruntime
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models.inference import onnx_bytes
from vkd.runs import cpu_model

PAIRS = {
    "imagenet": dict(student="deit_ti_distilled", teacher="regnety_160", input_size=224, num_classes=1000),
    "fmnist": dict(student="deit_ti_distilled", teacher="resnet10t", input_size=32, num_classes=10),
    "fmnist-cnn": dict(student="regnetx_002", teacher="resnet10t", input_size=32, num_classes=10),
}
RUNTIMES = ("eager", "onnxruntime")
EXPORT_BATCH = 2  # the traced batch of the ONNX export (its batch axis is dynamic)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed batch-1 calls (default 20)")
    parser.add_argument("--throughput-repeats", type=int, default=5, help="timed full batches (default 5)")
    parser.add_argument("--throughput-batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing (default 2)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="every pair at this size instead of its own (for quick checks)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default torch's)")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_seconds(call: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(run: Callable[[torch.Tensor], object], input_size: int, args) -> Dict[str, float]:
    """Latency of one image (ms) and throughput of a full batch (images/s)."""
    one = torch.randn(1, 3, input_size, input_size)
    batch = torch.randn(args.throughput_batch, 3, input_size, input_size)
    latency = median_seconds(lambda: run(one), args.latency_repeats, args.warmup)
    batch_time = median_seconds(lambda: run(batch), args.throughput_repeats, min(args.warmup, 1))
    return {"latency_ms": round(1000 * latency, 3), "throughput_img_s": round(args.throughput_batch / batch_time, 2)}


def onnxruntime_run(model: nn.Module, input_size: int, threads: int) -> Callable[[torch.Tensor], object]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    content = onnx_bytes(model, torch.randn(EXPORT_BATCH, 3, input_size, input_size), {})
    session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.ascontiguousarray(images.numpy())})


def measure(role: str, model: nn.Module, input_size: int, args) -> dict:
    """Size, FLOPs and speed of ``model`` in each runtime."""
    model.eval()
    image = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(image)
    figures = {"parameters": sum(parameter.numel() for parameter in model.parameters()),
               "flops": counter.get_total_flops()}
    if "eager" in args.runtimes:
        progress(f"  {role}: eager")
        with torch.no_grad():
            figures["eager"] = speed(model, input_size, args)
    if "onnxruntime" in args.runtimes:
        progress(f"  {role}: ONNX export, then onnxruntime")
        started = time.perf_counter()
        run = onnxruntime_run(model, input_size, torch.get_num_threads())
        figures["onnx_export_s"] = round(time.perf_counter() - started, 1)
        figures["onnxruntime"] = speed(run, input_size, args)
    return figures


def ratios(student: dict, teacher: dict, runtimes) -> dict:
    """How much smaller and faster the student is: teacher / student (student / teacher for throughput)."""
    found = {"parameters": round(teacher["parameters"] / student["parameters"], 2),
             "flops": round(teacher["flops"] / student["flops"], 2)}
    for runtime in runtimes:
        found[f"{runtime}_latency"] = round(teacher[runtime]["latency_ms"] / student[runtime]["latency_ms"], 2)
        found[f"{runtime}_throughput"] = round(student[runtime]["throughput_img_s"]
                                               / teacher[runtime]["throughput_img_s"], 2)
    return found


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {}
    for name in args.pairs:
        pair = dict(PAIRS[name])
        if args.input_size:
            pair["input_size"] = args.input_size
        size, classes = pair["input_size"], pair["num_classes"]
        progress(f"{name}: {pair['student']} vs {pair['teacher']} at {size} px, {classes} classes")
        torch.manual_seed(0)
        student = models.create_student(pair["student"], num_classes=classes, img_size=size)
        teacher = timm.create_model(pair["teacher"], pretrained=False, num_classes=classes)
        measured = {role: measure(role, model, size, args) for role, model in (("student", student),
                                                                               ("teacher", teacher))}
        report[name] = dict(student_model=pair["student"], teacher_model=pair["teacher"], input_size=size,
                            num_classes=classes, **measured,
                            teacher_over_student=ratios(measured["student"], measured["teacher"], args.runtimes))
    print(json.dumps({
        "pairs": report, "seconds": round(time.perf_counter() - started, 1), "cpu": cpu_model(),
        "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **{key: value for key, value in vars(args).items() if key != "pairs"},
    }))


if __name__ == "__main__":
    sys.exit(main())
