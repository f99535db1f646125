"""A/B of the candidate speedups, interleaved in one process so that a shared, noisy machine
affects every variant alike; print one JSON line.

- Whole training step (``train_step.TrainStep``) for each variant in ``--variants``, run round-robin:
  ``baseline`` (the defaults of train_step.py, which are training's: teacher channels-last, fp32),
  ``contiguous`` (teacher weights in the default layout, as the original), ``fused`` (fused AdamW),
  ``bf16`` (bf16 autocast), ``all-cpu`` (fused and bf16 together), ``torch`` and ``torch-all-cpu``
  (torch's projector, for the fast/torch ratios).
- Teacher forward under ``torch.no_grad`` (what ``losses.VkDLoss`` uses) vs ``torch.inference_mode``.
- AdamW step alone on the student's parameters: torch's default, foreach, fused.

    .venv/bin/python -m benchmarks.speedups --rounds 5
"""
import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.train_step import LR, WEIGHT_DECAY, TrainStep, synchronize
from benchmarks.train_step import parse_args as parse_step_args
from optim import parameter_groups

VARIANTS = {
    "baseline": [],
    "contiguous": ["--no-teacher-channels-last"],
    "fused": ["--optimizer-impl", "fused"],
    "bf16": ["--amp", "bf16"],
    "all-cpu": ["--optimizer-impl", "fused", "--amp", "bf16"],
    "torch": ["--projector-impl", "torch"],
    "torch-all-cpu": ["--projector-impl", "torch", "--optimizer-impl", "fused", "--amp", "bf16"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="contiguous,baseline,fused,bf16,all-cpu",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the teacher and AdamW timings")
    parser.add_argument("--student", default="deit_ti_distilled")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return args


def whole_step_times(args):
    common = ["--student", args.student, "--teacher", args.teacher, "--batch-size", str(args.batch_size),
              "--input-size", str(args.input_size), "--device", args.device]
    benches = {name: TrainStep(parse_step_args(common + VARIANTS[name])) for name in args.variants.split(",")}
    for bench in benches.values():
        bench.step()  # warm-up
    times = {name: [] for name in benches}
    for _ in range(args.rounds):
        for name, bench in benches.items():
            times[name].append(bench.step())
    return times, next(iter(benches.values()))


def teacher_forward_ms(bench: TrainStep, repeats: int):
    def forward(mode):
        def run():
            with mode():
                bench.teacher.forward_head(bench.teacher.forward_features(bench.samples))
        return run

    runs = {"no_grad": forward(torch.no_grad), "inference_mode": forward(torch.inference_mode)}
    return interleaved_ms(runs, bench.device, repeats)


def adamw_step_ms(bench: TrainStep, repeats: int):
    for parameter in bench.student.parameters():
        parameter.grad = torch.randn_like(parameter)
    groups = lambda: parameter_groups(bench.student, WEIGHT_DECAY)  # noqa: E731
    optimizers = {"default": torch.optim.AdamW(groups(), lr=LR),
                  "foreach": torch.optim.AdamW(groups(), lr=LR, foreach=True),
                  "fused": torch.optim.AdamW(groups(), lr=LR, fused=True)}
    times = interleaved_ms({name: optimizer.step for name, optimizer in optimizers.items()}, bench.device, repeats)
    bench.optimizer.zero_grad(set_to_none=True)
    return times


def interleaved_ms(runs, device, repeats):
    """Median ms of each callable, called round-robin after one untimed call each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(values), 1) for name, values in times.items()}


def speedups(seconds):
    if "baseline" not in seconds:
        return None
    return {name: round(seconds["baseline"] / value, 3) for name, value in seconds.items()}


def main(argv=None):
    args = parse_args(argv)
    step_times, bench = whole_step_times(args)
    medians = {name: statistics.median(values) for name, values in step_times.items()}
    minima = {name: min(values) for name, values in step_times.items()}
    print(json.dumps({
        "step_s_median": {name: round(value, 4) for name, value in medians.items()},
        "step_s_min": {name: round(value, 4) for name, value in minima.items()},
        "step_s_max": {name: round(max(values), 4) for name, values in step_times.items()},
        # On a shared machine other jobs only ever add time, so the minimum is the steadier figure.
        "speedup_vs_baseline_median": speedups(medians),
        "speedup_vs_baseline_min": speedups(minima),
        "teacher_forward_ms": teacher_forward_ms(bench, args.repeats),
        "adamw_step_ms": adamw_step_ms(bench, args.repeats),
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **vars(args),
    }))


if __name__ == "__main__":
    sys.exit(main())
