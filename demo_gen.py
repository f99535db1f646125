"""`make demo-gen`: data-limited GAN training with and without VkD, offline, in minutes on 2 CPU cores.

1. Export scikit-learn's handwritten digits (1,797 real images, 32x32) once.
2. Train, with ``main_distributed.py --train-teacher``, the distillation teacher (timm ``test_resnet``,
   seed 0) and, separately, the FID network (timm ``test_efficientnet``, seed 1): the FID network is
   never the teacher.
3. Train the small BigGAN of ``configs/generation/demo_digits.yaml`` on 10% of the training digits
   for each row with the same budget: DiffAugment only, and VkD with a whitened teacher (``--rows``
   adds the LayerNorm and no-normalisation rows). Jobs run side by side, one thread each.
4. Print FID / IS (local features: **not comparable with Inception FIDs**), write
   ``runs/demo_gen/summary.json`` and ``runs/demo_gen/samples_side_by_side.png``.

Finished runs are reused and interrupted ones resumed (``--resume auto``); ``FORCE=1`` redoes everything.
``--seeds 0 1 2 --rows baseline whiten layernorm none --write-results results/generation.md`` makes the
small-scale results table.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch

import datasets

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join("data", "digits")
OUT = os.path.join("runs", "demo_gen")
CONFIG = os.path.join("configs", "generation", "demo_digits.yaml")
TEACHER, FID_NETWORK = "test_resnet", "test_efficientnet"
NETWORK_EPOCHS = 10
NETWORK_COMMON = ["--data-set", "DIGITS", "--data-path", DATA, "--input-size", "32", "--batch-size", "64",
                  "--num_workers", "0", "--device", "cpu", "--unscale-lr", "--epochs", str(NETWORK_EPOCHS),
                  "--lr", "2e-3", "--mixup", "0", "--cutmix", "0", "--crop-scale-min", "0.35", "--print-freq", "50",
                  "--train-teacher"]
NETWORKS = {"teacher": [*NETWORK_COMMON, "--teacher", TEACHER, "--seed", "0"],
            "fid_network": [*NETWORK_COMMON, "--teacher", FID_NETWORK, "--seed", "1"]}
TEACHER_FILE = os.path.join(OUT, "teacher", "teacher.pth")
FID_FILE = os.path.join(OUT, "fid_network", "teacher.pth")
VKD = ["--teacher", "timm", "--teacher-model", TEACHER, "--teacher-path", TEACHER_FILE]
ROWS = {
    "baseline": ("DiffAugment only", []),
    "whiten": ("VkD, whitened teacher", VKD + ["--normalisation", "whiten"]),
    "layernorm": ("VkD, LayerNorm teacher", VKD + ["--normalisation", "layernorm"]),
    "none": ("VkD, teacher not normalised", VKD + ["--normalisation", "none"]),
}
NOT_COMPARABLE = (f"FIDs on {FID_NETWORK} features of 32x32 digits (1,000 samples vs 360 held-out images): "
                  f"not comparable with Inception FIDs on CIFAR")


def run_parallel(jobs: Dict[str, Tuple[List[str], str]], workers: int, threads: int) -> Dict[str, float]:
    """Run the named (command, output dir) jobs, ``workers`` at a time with ``threads`` threads each; stdout and
    stderr go to ``<output dir>.log``. Returns each job's wall seconds; a failed job stops the demo with its
    log's tail."""
    pending, running, seconds = list(jobs.items()), {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    while pending or running:
        while pending and len(running) < workers:
            name, (command, output_dir) = pending.pop(0)
            log_path = output_dir + ".log"
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            print(f"  start {name}: {shlex.join(command)}  (log: {log_path})", flush=True)
            handle = open(log_path, "w")
            running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT),
                             handle, log_path, time.time())
        time.sleep(1)
        for name, (process, handle, log_path, started) in list(running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del running[name]
            if process.returncode != 0:
                for other, rest in running.items():
                    rest[0].terminate()
                with open(log_path) as log:
                    tail = log.read().splitlines()[-5:]
                sys.exit(f"{name} failed (exit {process.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
            seconds[name] = round(time.time() - started, 1)
            print(f"  done  {name} in {seconds[name]:.0f} s", flush=True)
    return seconds


def network_accuracy(name: str) -> float:
    with open(os.path.join(OUT, name, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()][-1]["val_acc1"]


def train_networks(force: bool, workers: int, threads: int) -> dict:
    jobs = {}
    for name, flags in NETWORKS.items():
        output_dir = os.path.join(OUT, name)
        if force or not os.path.isfile(os.path.join(output_dir, "teacher.pth")):
            shutil.rmtree(output_dir, ignore_errors=True)
            jobs[name] = ([sys.executable, "main_distributed.py", *flags, "--output_dir", output_dir], output_dir)
    seconds = run_parallel(jobs, workers, threads) if jobs else {}
    for name in NETWORKS:
        if name not in jobs:
            print(f"  reusing {os.path.join(OUT, name)} (FORCE=1 retrains)")
    return {name: {"model": TEACHER if name == "teacher" else FID_NETWORK, "val_acc1": network_accuracy(name),
                   "seconds": seconds.get(name), "command": shlex.join([sys.executable, "main_distributed.py", *flags])}
            for name, flags in NETWORKS.items()}


def gan_command(row: str, seed: int) -> List[str]:
    return [sys.executable, "-m", "generation.main", "--config", CONFIG, "--data-path", DATA, "--device", "cpu",
            "--fid-model", FID_NETWORK, "--fid-weights", FID_FILE, *ROWS[row][1], "--seed", str(seed),
            "--output-dir", os.path.join(OUT, row, f"seed{seed}"), "--resume", "auto"]


def train_gans(rows: List[str], seeds: List[int], force: bool, workers: int, threads: int) -> dict:
    jobs = {}
    for row in rows:
        for seed in seeds:
            output_dir = os.path.join(OUT, row, f"seed{seed}")
            if force:
                shutil.rmtree(output_dir, ignore_errors=True)
            if not os.path.isfile(os.path.join(output_dir, "results.json")):
                jobs[f"{row}/seed{seed}"] = (gan_command(row, seed), output_dir)
    run_parallel(jobs, workers, threads)
    runs = {}
    for row in rows:
        for seed in seeds:
            output_dir = os.path.join(OUT, row, f"seed{seed}")
            with open(os.path.join(output_dir, "results.json")) as handle:
                result = json.load(handle)
            # Seconds of the training loop with its evaluations (of the last process, for a resumed run).
            runs[f"{row}/seed{seed}"] = {
                "row": row, "seed": seed, "fid": result["final"]["fid"], "best_fid": result["best"]["fid"],
                "best_iteration": result["best"]["iteration"], "is": result["final"].get("is_mean"),
                "seconds": result["seconds_this_process"], "iterations": result["iterations"],
                "command": shlex.join(gan_command(row, seed)), "output_dir": output_dir}
    return runs


def mean_std(values: List[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def side_by_side(rows: List[str], seed: int, runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    figure, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.6))
    for axis, row in zip(axes if len(rows) > 1 else [axes], rows):
        run = runs[f"{row}/seed{seed}"]
        grid = os.path.join(run["output_dir"], "samples", f"iter_{run['iterations']:06d}.png")
        axis.imshow(Image.open(grid))
        axis.set_title(f"{ROWS[row][0]}\nFID {run['fid']:.2f} (final), {run['best_fid']:.2f} (best)", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"G_ema samples after {run['iterations']} iterations, seed {seed}, one class per row "
                    f"(FID: local features, not comparable with Inception FIDs)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.95))  # room for the suptitle
    figure.savefig(path, dpi=110)


def table(rows: List[str], seeds: List[int], runs: dict) -> List[str]:
    lines = [f"{'row':<30}{'FID final':>18}{'FID best':>18}{'IS final':>16}{'train s':>9}"]
    for row in rows:
        picked = [runs[f"{row}/seed{seed}"] for seed in seeds]
        inception_scores = [run["is"] for run in picked if run["is"] is not None]
        lines.append(f"{ROWS[row][0]:<30}{mean_std([r['fid'] for r in picked]):>18}"
                     f"{mean_std([r['best_fid'] for r in picked]):>18}"
                     f"{mean_std(inception_scores) if inception_scores else '-':>16}"
                     f"{statistics.mean(r['seconds'] for r in picked):>9.0f}")
    return lines


PAPER_ROWS = """| FID, BigGAN + DiffAugment, 10% data | CIFAR-10 | CIFAR-100 |
|---|---|---|
| DiffAugment only | 23.34 | 35.39 |
| KD-DLGAN (CLIP teacher, its own losses; not implemented here) | 14.20 | 18.03 |
| VkD, LayerNorm teacher | 16.47 | 24.92 |
| VkD, whitened teacher | **13.16** | **16.87** |"""


def comparison(rows: List[str], seeds: List[int], runs: dict) -> List[str]:
    """Each VkD row's mean final FID against the augmentation-only row's, in units of the larger std."""
    if "baseline" not in rows or len(seeds) < 2:
        return []
    final = {row: [runs[f"{row}/seed{seed}"]["fid"] for seed in seeds] for row in rows}
    lines = ["Final FID against DiffAugment only (negative: VkD better):", ""]
    for row in rows:
        if row == "baseline":
            continue
        difference = statistics.mean(final[row]) - statistics.mean(final["baseline"])
        spread = max(statistics.stdev(final[row]), statistics.stdev(final["baseline"]))
        lines.append(f"- {ROWS[row][0]}: {difference:+.3f} ({difference / spread:+.2f} of the larger std, {spread:.3f})")
    return lines


def write_results(path: str, summary: dict, rows: List[str], seeds: List[int], command: str) -> None:
    """The small-scale results table, with each figure's command, and the paper's numbers beside it."""
    runs, networks = summary["runs"], summary["networks"]
    lines = [
        "# Data-limited image generation at digits scale: DiffAugment only vs VkD",
        "",
        f"Made by `{command}` (torch {torch.__version__}, CPU, {len(os.sched_getaffinity(0))} cores), which "
        f"runs what is missing and reuses finished runs; each run's own command is listed below. Every number "
        f"comes from `{OUT}/summary.json` and each run's `results.json`.",
        "",
        f"Setting: the BigGAN of [`{CONFIG}`](../{CONFIG}) (G_ch = D_ch = 4, batch 32, 2 D steps per G step, "
        f"{runs[f'{rows[0]}/seed{seeds[0]}']['iterations']} iterations, DiffAugment translation + cutout) on 10% of "
        f"scikit-learn's digits (144 of 1,437 training images, KD-DLGAN's uniform draw), identical for every row "
        f"and seed. Teacher: timm `{TEACHER}` trained here on all 1,437 training digits "
        f"({networks['teacher']['val_acc1']:.2f}% val top-1). FID and IS: 1,000 G_ema samples against the 360 "
        f"held-out digits, on the features of timm `{FID_NETWORK}` trained separately "
        f"({networks['fid_network']['val_acc1']:.2f}% val top-1, another architecture and seed). "
        f"**These FIDs are not comparable with Inception FIDs on CIFAR**: another feature space, another data "
        f"set, 1,000 samples. Lower is better.",
        "",
        "| row | FID at the end, mean ± std | per seed | best FID during training | IS at the end |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        picked = [runs[f"{row}/seed{seed}"] for seed in seeds]
        scores = [run["is"] for run in picked if run["is"] is not None]
        per_seed = ", ".join(f"{run['fid']:.3f}" for run in picked)
        lines.append(f"| {ROWS[row][0]} | {mean_std([r['fid'] for r in picked])} | {per_seed} | "
                     f"{mean_std([r['best_fid'] for r in picked])} | {mean_std(scores) if scores else '-'} |")
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; std is the sample standard deviation over seeds.", ""]
    lines += comparison(rows, seeds, runs)
    lines += ["",
              "Commands (each run's own; `python demo_gen.py` runs them and reuses finished ones):", ""]
    lines += [f"- `{name}`: `{run['command'].replace(sys.executable, 'python')}`" for name, run in runs.items()]
    lines += ["", "Networks:", ""]
    lines += [f"- {name}: `{network['command'].replace(sys.executable, 'python')} --output_dir {OUT}/{name}`"
              for name, network in networks.items()]
    lines += ["", "## The paper's numbers (CIFAR, Inception FID), for direction only", "",
              "Full-scale runs (BigGAN, 32x32, CLIP ViT-B/32 teacher, 125k iterations, FID of 10k samples "
              "against the test split); not re-run here.", "", PAPER_ROWS, ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser("offline GAN demo: DiffAugment only vs VkD")
    parser.add_argument("--rows", nargs="+", default=["baseline", "whiten"], choices=tuple(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))),
                        help="runs side by side (default: 2, or 1 on a single core)")
    parser.add_argument("--write-results", default=None, metavar="FILE.md", help="also write the results table here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    force = os.environ.get("FORCE", "") not in ("", "0")
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    started = time.time()
    datasets.export_digits(DATA, force=force)
    print("=== teacher and FID network (main_distributed.py --train-teacher)", flush=True)
    networks = train_networks(force, args.jobs, threads)
    print(f"=== BigGAN, 10% of the digits: rows {', '.join(args.rows)}, seeds {args.seeds}", flush=True)
    runs = train_gans(args.rows, args.seeds, force, args.jobs, threads)
    summary = {"note": NOT_COMPARABLE, "seconds": round(time.time() - started, 1), "config": CONFIG,
               "networks": networks, "runs": runs,
               "rows": {row: {"title": ROWS[row][0],
                              "fid": [runs[f"{row}/seed{s}"]["fid"] for s in args.seeds],
                              "best_fid": [runs[f"{row}/seed{s}"]["best_fid"] for s in args.seeds]}
                        for row in args.rows}}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    side_by_side(args.rows, args.seeds[0], runs, os.path.join(OUT, "samples_side_by_side.png"))
    print(f"\nteacher {TEACHER}: {networks['teacher']['val_acc1']:.2f}% val top-1; "
          f"FID network {FID_NETWORK}: {networks['fid_network']['val_acc1']:.2f}%")
    print("\n".join(table(args.rows, args.seeds, runs)))
    print(f"({NOT_COMPARABLE}; mean ± std over seeds {args.seeds})" if len(args.seeds) > 1 else f"({NOT_COMPARABLE})")
    print(f"\ntotal {summary['seconds']:.0f} s; wrote {OUT}/summary.json and {OUT}/samples_side_by_side.png")
    if args.write_results:
        write_results(args.write_results, summary, args.rows, args.seeds, shlex.join(["python", "demo_gen.py", *argv]))
        print(f"wrote {args.write_results}")


if __name__ == "__main__":
    main()
