"""A K-row mini-ablation of real training runs with and without the teacher-output cache and with
``--compile``, side by side in one run; print a table, then one JSON line.

Every row is a ``main_distributed.py`` run in its own process (the real training loop) on the embedded
digits (exported into a temporary folder) with a randomly initialised timm teacher saved to a temporary
``teacher.pth`` (nothing is downloaded). The rows share teacher, data, seed and schedule and differ only
on the student side (``--projector`` orthogonal/linear x ``--normalisation`` layernorm/none, then
batchstd/whiten and ``--feature-loss mse`` beyond 4 rows), so their teacher inputs are the same batches.
Four passes over the rows, each row timed around its process:

- independent: no cache, every row runs the teacher;
- shared, cold: one fresh ``--teacher-cache`` folder for all rows (the first row fills it, the others read it);
- shared, warm: the same rows again on the now-filled folder (every batch a hit);
- compiled: no cache, ``--compile`` (torch.compile of the frozen teacher; inductor's cache lives in the
  temporary folder, so the first row compiles from scratch and later rows may reuse its cached kernels).

The independent, cold and compiled runs of a row follow each other (then the warm pass), so a slow phase
of a shared host falls on the variants alike. Each cached row's final student weights must equal its
independent twin's bit for bit (``identical``). The teacher forward T alone and a whole synthetic training
step (``train_step.TrainStep``) at the same shapes give the student step S = step - T (forward, loss,
backward, optimizer: what a perfect cache leaves) and the ideal ratio of a perfect cache, K(T+S)/(T+K*S),
against which ``ratio`` (independent / cold wall time, with each process's start-up, building and evaluation
included) and ``train_ratio`` (the same for the training loops alone, from each run's log.txt) compare. The
rows evaluate once, after their last epoch.

The default (4 rows of 4 epochs x 17 steps of 16 images at 64 px, RegNetY-160 teacher) is sized for
under 15 minutes on 2 cores; the compiled pass is the longest, as its first row compiles the teacher.

    .venv/bin/python -m benchmarks.ablation_cache
    .venv/bin/python -m benchmarks.ablation_cache --rows 2 --teacher resnet10t --input-size 32 \\
        --batch-size 4 --subset 1PERCENT --epochs 1 --threads 1 --compile-backend aot_eager --repeats 1
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch

import datasets
from benchmarks.train_step import TrainStep
from benchmarks.train_step import parse_args as parse_step_args
from vkd.checkpoints import safe_torch_load
from vkd.data.digits import DIGITS_CLASSES, export_digits
from vkd.runs import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main_distributed.py")
PASSES = ("independent", "cold", "warm", "compiled")
PROJECTORS = ("orthogonal", "linear")
NORMALISATIONS = ("layernorm", "none", "batchstd", "whiten")
FEATURE_LOSSES = ("smooth_l1", "mse")
MAX_ROWS = len(PROJECTORS) * len(NORMALISATIONS) * len(FEATURE_LOSSES)
OUTPUT_LINES = 40  # of a failed run, in the error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4, help=f"rows of the ablation, 1 to {MAX_ROWS} (default 4)")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--student", default="deit_ti_distilled")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every row (default 4)")
    parser.add_argument("--subset", default="20PERCENT", choices=("FULL",) + tuple(datasets.SUBSET_FRACTIONS),
                        help="training subset of the digits (default 20PERCENT: 287 of the 1437 images, "
                             "17 steps of 16 an epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of every process (default: the usable CPUs)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled pass")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the T and S timings (default 3)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR (data, teacher, cache, runs) and keep it; default: a temporary folder")
    args = parser.parse_args(argv)
    if not 1 <= args.rows <= MAX_ROWS:
        parser.error(f"--rows must be in [1, {MAX_ROWS}]")
    return args


def row_flags(index: int):
    """The student-side flags of row ``index``: projector fastest, then normalisation, then feature loss."""
    return ["--projector", PROJECTORS[index % 2],
            "--normalisation", NORMALISATIONS[index // 2 % len(NORMALISATIONS)],
            "--feature-loss", FEATURE_LOSSES[index // (2 * len(NORMALISATIONS))]]


def write_teacher(args, path: str) -> None:
    """Random weights, in the format --teacher-path reads."""
    torch.manual_seed(args.seed)
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=DIGITS_CLASSES)
    torch.save({"model": teacher.state_dict()}, path)


def component_ms(args):
    """Median ms of the teacher forward (T), the student forward+backward and the whole synthetic step
    (``TrainStep.step``, after one untimed step) at the rows' shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        bench = TrainStep(parse_step_args(["--student", args.student, "--teacher", args.teacher, "--batch-size",
                                           str(args.batch_size), "--input-size", str(args.input_size),
                                           "--device", "cpu"]))
        step_s = [bench.step() for _ in range(1 + args.repeats)][1:]
        times = bench.component_ms(repeats=args.repeats)
    finally:
        torch.set_num_threads(threads)
    return times["teacher_ms"], times["student_ms"], 1000 * statistics.median(step_s)


def ideal_ratio(rows: int, teacher_ms: float, student_ms: float) -> float:
    """Independent over shared wall time of ``rows`` rows when a shared teacher forward costs nothing more."""
    return rows * (teacher_ms + student_ms) / (teacher_ms + rows * student_ms)


def run_row(flags, output_dir: str, environment: dict):
    """Runs one training process; returns (wall seconds, its output). A failure raises with its last lines."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, MAIN] + flags + ["--output_dir", output_dir], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-OUTPUT_LINES:])
        raise RuntimeError(f"{' '.join(flags)} --output_dir {output_dir} exited with {result.returncode}:\n{tail}")
    return seconds, result.stdout


def epoch_records(output_dir: str):
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def cache_counts(output_dir: str):
    """(hits, misses, bytes written) over the run's epochs, from log.txt."""
    records = epoch_records(output_dir)
    return tuple(sum(record[f"train_teacher_cache_{name}"] for record in records)
                 for name in ("hits", "misses", "bytes_written"))


def same_student(first: str, second: str) -> bool:
    """Whether the two runs' final students (latest.pth.tar) are equal bit for bit."""
    weights = [safe_torch_load(os.path.join(folder, "latest.pth.tar"))["student"] for folder in (first, second)]
    return weights[0].keys() == weights[1].keys() and all(
        torch.equal(value, weights[1][key]) for key, value in weights[0].items())


def hit_rate(counts) -> float:
    hits, misses = sum(count[0] for count in counts), sum(count[1] for count in counts)
    return hits / max(hits + misses, 1)


def table(seconds) -> str:
    lines = ["row  " + "".join(f"{name:>13}" for name in PASSES)]
    for index, row in enumerate(zip(*(seconds[name] for name in PASSES))):
        lines.append(f"{index + 1:<5}" + "".join(f"{value:>12.1f}s" for value in row))
    lines.append("sum  " + "".join(f"{sum(seconds[name]):>12.1f}s" for name in PASSES))
    return "\n".join(lines)


def measure(args, work: str):
    data = export_digits(os.path.join(work, "digits"))
    teacher_path = os.path.join(work, "teacher.pth")
    write_teacher(args, teacher_path)
    teacher_ms, student_fwd_bwd_ms, step_ms = component_ms(args)
    student_ms = step_ms - teacher_ms
    if student_ms <= 0:
        raise RuntimeError(f"the whole step ({step_ms:.1f} ms) measured no longer than the teacher forward alone "
                           f"({teacher_ms:.1f} ms): the host was busy; run again on idle cores or with more --repeats")
    print(f"teacher forward {teacher_ms:.1f} ms, whole step {step_ms:.1f} ms, so the student step {student_ms:.1f} ms "
          f"(its forward+backward alone {student_fwd_bwd_ms:.1f} ms)", file=sys.stderr, flush=True)
    cache = os.path.join(work, "cache")
    common = ["--data-set", "DIGITS", "--data-path", data, "--subset", args.subset, "--input-size",
              str(args.input_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
              "--student-model", args.student, "--teacher", args.teacher, "--teacher-path", teacher_path,
              "--alpha", "1", "--gamma", "1", "--seed", str(args.seed), "--threads", str(args.threads),
              "--deterministic", "--device", "cpu", "--num_workers", "0", "--no-student-ema", "--mixup", "0",
              "--cutmix", "0", "--unscale-lr", "--print-freq", "1000000", "--eval-freq", str(args.epochs)]
    pass_flags = {"independent": [], "cold": ["--teacher-cache", cache], "warm": ["--teacher-cache", cache],
                  "compiled": ["--compile", args.compile_backend]}
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor"),
                   "TORCHINDUCTOR_COMPILE_THREADS": str(args.threads)}
    seconds = {name: [None] * args.rows for name in PASSES}
    outputs = {name: [None] * args.rows for name in PASSES}

    def run(name, index):
        folder = os.path.join(work, "runs", name, f"row{index + 1}")
        seconds[name][index], outputs[name][index] = run_row(
            common + row_flags(index) + pass_flags[name], folder, environment)
        print(f"row {index + 1}/{args.rows} {name}: {seconds[name][index]:.1f} s", file=sys.stderr, flush=True)
        return folder

    order = [(name, index) for index in range(args.rows) for name in ("independent", "cold", "compiled")]
    folders = {(name, index): run(name, index) for name, index in order + [("warm", i) for i in range(args.rows)]}
    counts = {name: [cache_counts(folders[name, index]) for index in range(args.rows)] for name in ("cold", "warm")}
    identical = {name: [same_student(folders["independent", index], folders[name, index])
                        for index in range(args.rows)] for name in ("cold", "warm")}
    compile_seconds = [float(match.group(1)) for output in outputs["compiled"]
                       for match in re.finditer(r"Teacher compiled with torch\.compile .* in ([0-9.]+) s", output)]
    steps = re.search(r"\((\d+) iterations each", outputs["independent"][0])
    rows = args.rows
    ideal = ideal_ratio(rows, teacher_ms, student_ms)
    total = {name: sum(seconds[name]) for name in PASSES}
    # The training loops alone (log.txt's train_seconds), without each process's start-up and evaluation.
    training = {name: sum(record["train_seconds"] for index in range(rows)
                          for record in epoch_records(folders[name, index])) for name in PASSES}
    return {
        "rows": rows,
        "ratio": round(total["independent"] / total["cold"], 3),
        "warm_ratio": round(total["independent"] / total["warm"], 3),
        "compile_ratio": round(total["independent"] / total["compiled"], 3),
        "train_ratio": round(training["independent"] / training["cold"], 3),
        "train_warm_ratio": round(training["independent"] / training["warm"], 3),
        "ideal_ratio": round(ideal, 3),
        "ratio_of_ideal": round(total["independent"] / total["cold"] / ideal, 3),
        "train_ratio_of_ideal": round(training["independent"] / training["cold"] / ideal, 3),
        "teacher_share": round(teacher_ms / step_ms, 4),
        "teacher_ms": round(teacher_ms, 1),
        "student_ms": round(student_ms, 1),
        "student_fwd_bwd_ms": round(student_fwd_bwd_ms, 1),
        "step_ms": round(step_ms, 1),
        "hit_rate": round(hit_rate(counts["cold"]), 4),
        "warm_hit_rate": round(hit_rate(counts["warm"]), 4),
        "identical": all(identical["cold"]) and all(identical["warm"]),
        "identical_rows": identical,
        "row_seconds": {name: [round(value, 2) for value in seconds[name]] for name in PASSES},
        "total_seconds": {name: round(value, 2) for name, value in total.items()},
        "train_seconds": {name: round(value, 2) for name, value in training.items()},
        "cache_counts": {name: [list(count[:2]) for count in counts[name]] for name in counts},
        "bytes_written": sum(count[2] for count in counts["cold"]),
        "warm_bytes_written": sum(count[2] for count in counts["warm"]),
        "compile_seconds": [round(value, 2) for value in compile_seconds],
        "steps_per_epoch": int(steps.group(1)) if steps else None,
        "row_flags": [row_flags(index) for index in range(rows)],
        "teacher": args.teacher, "student": args.student, "input_size": args.input_size,
        "batch_size": args.batch_size, "epochs": args.epochs, "subset": args.subset, "seed": args.seed,
        "threads": args.threads, "compile_backend": args.compile_backend, "repeats": args.repeats,
        "torch": torch.__version__, "timm": timm.__version__, "cpu": cpu_model(),
    }, seconds


def main(argv=None):
    args = parse_args(argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        if os.listdir(args.keep):
            sys.exit(f"--keep {args.keep}: the folder must be new or empty")
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="ablation-cache-")
    start = time.perf_counter()
    try:
        report, seconds = measure(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(table(seconds))
    print(f"ratio {report['ratio']} (ideal {report['ideal_ratio']}, {100 * report['ratio_of_ideal']:.0f}% of it; "
          f"training loops alone {report['train_ratio']}, {100 * report['train_ratio_of_ideal']:.0f}%), "
          f"warm {report['warm_ratio']}, "
          f"compiled {report['compile_ratio']}; hit rate {report['hit_rate']} cold, {report['warm_hit_rate']} warm; "
          f"identical {report['identical']}")
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
