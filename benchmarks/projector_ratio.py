"""Whole-step ratio torch/fast projector from separate processes; print one JSON line.

Runs ``train_step.py`` with ``--projector-impl fast`` and ``--projector-impl torch`` in alternating
separate processes (``--pairs`` times each), every other flag shared, so that each run measures the
command a user would run while slow phases of a shared machine fall on both implementations alike.

    .venv/bin/python -m benchmarks.projector_ratio --pairs 3
    .venv/bin/python -m benchmarks.projector_ratio --pairs 3 -- --amp bf16
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTATIONS = ("fast", "torch")


def run_train_step(flags):
    # As a module from the repository root, as the documentation runs it: it imports the repository's packages.
    output = subprocess.run([sys.executable, "-m", "benchmarks.train_step"] + flags, cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="runs of each implementation (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (default 1)")
    parser.add_argument("train_step_flags", nargs="*", help="after --: more train_step.py flags, for both")
    args = parser.parse_args(argv)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + args.train_step_flags
    runs = {impl: [] for impl in IMPLEMENTATIONS}
    for pair in range(args.pairs):
        for impl in IMPLEMENTATIONS:
            result = run_train_step(common + ["--projector-impl", impl])
            runs[impl].append(result)
            print(f"pair {pair + 1}/{args.pairs} {impl}: step {result['step_s_median']:.3f} s, "
                  f"projector {result['projector_ms']:.1f} ms", file=sys.stderr, flush=True)
    step = {impl: statistics.median(run["step_s_median"] for run in runs[impl]) for impl in IMPLEMENTATIONS}
    ratios = [torch_run["step_s_median"] / fast_run["step_s_median"]
              for fast_run, torch_run in zip(runs["fast"], runs["torch"])]
    print(json.dumps({
        "step_s_median": {impl: round(value, 4) for impl, value in step.items()},
        "step_s_by_run": {impl: [run["step_s_median"] for run in runs[impl]] for impl in IMPLEMENTATIONS},
        "projector_ms_by_run": {impl: [run["projector_ms"] for run in runs[impl]] for impl in IMPLEMENTATIONS},
        "projector_share_fast_max": max(run["projector_share"] for run in runs["fast"]),
        "ratio_of_medians": round(step["torch"] / step["fast"], 3),
        "ratio_by_pair": [round(ratio, 3) for ratio in ratios],
        "ratio_min": round(min(ratios), 3),
        **{key: runs["fast"][0][key] for key in ("device", "torch", "threads", "student", "teacher", "batch_size",
                                                 "input_size", "amp", "teacher_channels_last")},
        "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup,
    }))


if __name__ == "__main__":
    sys.exit(main())
