"""`make demo-gen` (``python -m experiments.demo_gen``): data-limited GAN training with and without VkD,
offline, in minutes on 2 CPU cores.

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
``--seeds 0 1 2 --rows baseline whiten layernorm none --write-results`` makes the small-scale results page,
``results/generation/`` (``summary.json`` and ``README.md``, the page written from the JSON).
"""
import json
import os
import shlex
import statistics
import sys
import time
from typing import List

import torch

import datasets
from experiments import paper
from experiments.runner import (
    ROOT,
    Job,
    driver_parser,
    epoch_log,
    force_requested,
    require_writable_results,
    run_jobs,
    write_report,
)
from experiments.stats import mean_and_std
from vkd.cli import entry_point
from vkd.errors import BadInput

DATA = os.path.join("data", "digits")
OUT = os.path.join("runs", "demo_gen")
RESULTS = os.path.join("results", "generation")
CONFIG = os.path.join("configs", "generation", "demo_digits.yaml")
TEACHER, FID_NETWORK = "test_resnet", "test_efficientnet"
NETWORK_EPOCHS = 10
NETWORK_COMMON = ["--data-set", "DIGITS", "--data-path", DATA, "--input-size", "32", "--batch-size", "64",
                  "--num_workers", "0", "--device", "cpu", "--unscale-lr", "--epochs", str(NETWORK_EPOCHS),
                  "--lr", "2e-3", "--mixup", "0", "--cutmix", "0", "--crop-scale-min", "0.35", "--print-freq", "50",
                  "--train-teacher"]
NETWORKS = {"teacher": [*NETWORK_COMMON, "--teacher", TEACHER, "--seed", "0"],
            "fid_network": [*NETWORK_COMMON, "--teacher", FID_NETWORK, "--seed", "1"]}
NETWORK_MODELS = {"teacher": TEACHER, "fid_network": FID_NETWORK}
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


def network_jobs(threads: int) -> List[Job]:
    return [Job(name, os.path.join(OUT, name), overrides=flags, threads=threads) for name, flags in NETWORKS.items()]


def gan_job(row: str, seed: int, threads: int) -> Job:
    """One BigGAN run; an interrupted one continues where it stopped."""
    return Job(f"{row}/seed{seed}", os.path.join(OUT, row, f"seed{seed}"), config=CONFIG, entry_point="generation",
               overrides=["--data-path", DATA, "--device", "cpu", "--fid-model", FID_NETWORK, "--fid-weights", FID_FILE,
                          *ROWS[row][1], "--seed", str(seed)], resumable=True, threads=threads)


def gan_run(job: Job, row: str, seed: int) -> dict:
    """What a finished BigGAN run's results.json says, for the summary."""
    with open(os.path.join(job.output_dir, "results.json")) as handle:
        result = json.load(handle)
    # Seconds of the training loop with its evaluations (of the last process, for a resumed run).
    return {"row": row, "seed": seed, "fid": result["final"]["fid"], "best_fid": result["best"]["fid"],
            "best_iteration": result["best"]["iteration"], "is": result["final"].get("is_mean"),
            "seconds": result["seconds_this_process"], "iterations": result["iterations"],
            "command": job.shell_command(), "output_dir": job.output_dir}


def mean_std(values: List[float]) -> str:
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


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


def _picked(summary: dict, row: str) -> List[dict]:
    return [summary["runs"][f"{row}/seed{seed}"] for seed in summary["seeds"]]


def table(summary: dict) -> List[str]:
    lines = [f"{'row':<30}{'FID final':>18}{'FID best':>18}{'IS final':>16}{'train s':>9}"]
    for row in summary["rows"]:
        picked = _picked(summary, row)
        inception_scores = [run["is"] for run in picked if run["is"] is not None]
        lines.append(f"{ROWS[row][0]:<30}{mean_std([r['fid'] for r in picked]):>18}"
                     f"{mean_std([r['best_fid'] for r in picked]):>18}"
                     f"{mean_std(inception_scores) if inception_scores else '-':>16}"
                     f"{statistics.mean(r['seconds'] for r in picked):>9.0f}")
    return lines


def comparison(summary: dict) -> List[str]:
    """Each VkD row's mean final FID against the augmentation-only row's, in units of the larger std."""
    if "baseline" not in summary["rows"] or len(summary["seeds"]) < 2:
        return []
    final = {row: [run["fid"] for run in _picked(summary, row)] for row in summary["rows"]}
    lines = ["Final FID against DiffAugment only (negative: VkD better):", ""]
    for row in summary["rows"]:
        if row == "baseline":
            continue
        difference = statistics.mean(final[row]) - statistics.mean(final["baseline"])
        spread = max(statistics.stdev(final[row]), statistics.stdev(final["baseline"]))
        lines.append(f"- {ROWS[row][0]}: {difference:+.3f} ({difference / spread:+.2f} of the larger std, {spread:.3f})")
    return lines


def results_page(summary: dict) -> str:
    """results/generation/README.md, from summary.json alone: the small-scale table, each run's command,
    and the paper's numbers beside it."""
    runs, networks, seeds = summary["runs"], summary["networks"], summary["seeds"]
    first_run = runs[f"{next(iter(summary['rows']))}/seed{seeds[0]}"]
    lines = [
        "# Data-limited image generation at digits scale: DiffAugment only vs VkD",
        "",
        f"Made by `{summary['command']}` (torch {summary['torch']}, CPU, {summary['cores']} cores), which runs what "
        "is missing and reuses finished runs; each run's own command is listed below. Every number comes from "
        "[`summary.json`](summary.json), which collects each run's `results.json`.",
        "",
        f"Setting: the BigGAN of [`{CONFIG}`](../../{CONFIG}) (G_ch = D_ch = 4, batch 32, 2 D steps per G step, "
        f"{first_run['iterations']} iterations, DiffAugment translation + cutout) on 10% of scikit-learn's digits "
        "(144 of 1,437 training images, KD-DLGAN's uniform draw), identical for every row and seed. Teacher: timm "
        f"`{TEACHER}` trained here on all 1,437 training digits ({networks['teacher']['val_acc1']:.2f}% val top-1). "
        f"FID and IS: 1,000 G_ema samples against the 360 held-out digits, on the features of timm `{FID_NETWORK}` "
        f"trained separately ({networks['fid_network']['val_acc1']:.2f}% val top-1, another architecture and seed). "
        "**These FIDs are not comparable with Inception FIDs on CIFAR**: another feature space, another data "
        "set, 1,000 samples. Lower is better.",
        "",
        "| row | FID at the end, mean ± std | per seed | best FID during training | IS at the end |",
        "|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        picked = _picked(summary, row)
        scores = [run["is"] for run in picked if run["is"] is not None]
        per_seed = ", ".join(f"{run['fid']:.3f}" for run in picked)
        lines.append(f"| {ROWS[row][0]} | {mean_std([r['fid'] for r in picked])} | {per_seed} | "
                     f"{mean_std([r['best_fid'] for r in picked])} | {mean_std(scores) if scores else '-'} |")
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; std is the sample standard deviation over seeds.", ""]
    lines += comparison(summary)
    lines += ["", "Commands (each run's own; `python -m experiments.demo_gen` runs them and reuses finished ones):", ""]
    lines += [f"- `{name}`: `{run['command']}`" for name, run in runs.items()]
    lines += ["", "Networks:", ""]
    lines += [f"- {name}: `{network['command']}`" for name, network in networks.items()]
    lines += ["", "## The paper's numbers (CIFAR, Inception FID), for direction only", "",
              "Full-scale runs (BigGAN, 32x32, CLIP ViT-B/32 teacher, 125k iterations, FID of 10k samples "
              "against the test split); not re-run here.", "", *paper.generation_table(), ""]
    return "\n".join(lines)


@entry_point
def main(argv=None) -> None:
    parser = driver_parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=["baseline", "whiten"], choices=tuple(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))),
                        help="runs side by side (default: 2, or 1 on a single core)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also write {RESULTS}/ (summary.json and README.md) from this run")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise BadInput(f"--jobs must be at least 1, got {args.jobs}")
    os.chdir(ROOT)
    if args.write_results:
        require_writable_results(RESULTS)
    force = force_requested()
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    started = time.time()
    datasets.export_digits(DATA, force=force)
    print("=== teacher and FID network (main_distributed.py --train-teacher)", flush=True)
    networks = network_jobs(threads)
    records = run_jobs(networks, force, workers=args.jobs)
    print(f"=== BigGAN, 10% of the digits: rows {', '.join(args.rows)}, seeds {args.seeds}", flush=True)
    gan_jobs = {(row, seed): gan_job(row, seed, threads) for row in args.rows for seed in args.seeds}
    run_jobs(list(gan_jobs.values()), force, workers=args.jobs)
    runs = {job.name: gan_run(job, row, seed) for (row, seed), job in gan_jobs.items()}
    trained = {job.name: {"model": NETWORK_MODELS[job.name], "val_acc1": epoch_log(job.output_dir)[-1]["val_acc1"],
                          "seconds": records[job.name]["seconds"], "command": records[job.name]["command"]}
               for job in networks}
    summary = {"note": NOT_COMPARABLE, "seconds": round(time.time() - started, 1), "config": CONFIG,
               "command": shlex.join(["python", "-m", "experiments.demo_gen", *argv]),
               "torch": torch.__version__, "cores": len(os.sched_getaffinity(0)),
               "networks": trained, "seeds": args.seeds, "runs": runs,
               "rows": {row: {"title": ROWS[row][0],
                              "fid": [runs[f"{row}/seed{s}"]["fid"] for s in args.seeds],
                              "best_fid": [runs[f"{row}/seed{s}"]["best_fid"] for s in args.seeds]}
                        for row in args.rows}}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    side_by_side(args.rows, args.seeds[0], runs, os.path.join(OUT, "samples_side_by_side.png"))
    print(f"\nteacher {TEACHER}: {summary['networks']['teacher']['val_acc1']:.2f}% val top-1; "
          f"FID network {FID_NETWORK}: {summary['networks']['fid_network']['val_acc1']:.2f}%")
    print("\n".join(table(summary)))
    print(f"({NOT_COMPARABLE}; mean ± std over seeds {args.seeds})" if len(args.seeds) > 1 else f"({NOT_COMPARABLE})")
    print(f"\ntotal {summary['seconds']:.0f} s; wrote {OUT}/summary.json and {OUT}/samples_side_by_side.png")
    if args.write_results:
        write_report(RESULTS, "summary.json", summary, results_page)
        print(f"wrote {RESULTS}/summary.json and README.md")


if __name__ == "__main__":
    main()
