"""Evaluation throughput of a student (img/s) on synthetic in-memory batches; print one JSON line.

Eval mode (the student returns the mean of its two heads; the projector is not used), no grad,
optional autocast, as ``engine.evaluate`` runs it.

    .venv/bin/python -m benchmarks.eval --student deit_ti_distilled --batch-size 12
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

from models import create_student

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="deit_ti_distilled")
    parser.add_argument("--batch-size", type=int, default=12, help="default 12 (1.5 x the training default)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed batches (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = AMP_DTYPES[args.amp]
    torch.manual_seed(0)
    student = create_student(args.student, num_classes=1000, img_size=args.input_size).to(device).eval()
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size).to(device)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for index in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            student(images).float().argmax(-1).tolist()  # .tolist() waits for the result, as evaluate does
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
    batch_s = statistics.median(times)
    peak_mem_mb = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({
        "img_per_s": round(args.batch_size / batch_s, 2),
        "batch_s_median": round(batch_s, 4),
        "batch_s_min": round(min(times), 4),
        "batch_s_max": round(max(times), 4),
        "peak_mem_mb": round(peak_mem_mb, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **vars(args),
    }))


if __name__ == "__main__":
    sys.exit(main())
