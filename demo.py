"""`make demo`: the whole VkD story on real images that ship offline, in minutes on a laptop CPU.

1. Export scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) to an ImageFolder.
2. Train a small CNN teacher on them with ``main_distributed.py --train-teacher``.
3. Train two DeiT-Ti students with identical budgets: no distillation (alpha = gamma = 0) and full
   VkD (orthogonal projector + LayerNorm teacher features + KL on the dist head).
4. Print a table (final top-1 with its 95% interval; for each student, top-1 after a few early
   epochs, the first epoch at 85% and 90% and the mean top-1 over all epochs) and a verdict line
   computed from it, and write ``runs/demo/summary.json`` and ``runs/demo/curves.png``.

On 360 validation images one seed's final top-1 cannot rank the two students: a few images decide it,
and so does the CPU (other kernels round differently). The learning curves can, which is why the verdict
reads them first. Every run uses a fixed thread count and deterministic kernels, so the same command on
the same machine gives the same numbers.

Every step goes through the same entry point, data pipeline and engine as an ImageNet run. A rerun
reuses the exported data and the teacher; ``FORCE=1 make demo`` redoes everything.
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence, Tuple

import datasets
from vkd.runs import cpu_model

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join("data", "digits")
OUT = os.path.join("runs", "demo")

# Sizes (README, "The demo"): the whole demo takes 5-6 minutes on 2 idle CPU cores. 32 px is the
# exported digit size (4x the 8x8 originals), giving a 2x2 token grid to DeiT-Ti's stride-16 stem.
INPUT_SIZE = 32
# Repeatable runs: a fixed number of intra-op threads (the result of a parallel sum depends on how it is
# split), set by --threads and, for the libraries below torch, by the environment of every process;
# deterministic kernels (--deterministic); the loader workers' seeds come from --seed.
THREADS = 2
THREAD_ENV = {name: str(THREADS) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
# Threads waiting at the end of a parallel region sleep instead of spinning. Same numbers; on cores shared
# with other jobs a spinning thread steals the time its partner needs, and a step took 6-9x longer.
THREAD_ENV["OMP_WAIT_POLICY"] = "PASSIVE"
BATCH_SIZE = 64
TEACHER = "resnet10t"
TEACHER_EPOCHS = 12
STUDENT_EPOCHS = 15
COMMON = [
    "--data-set", "DIGITS", "--data-path", DATA, "--input-size", str(INPUT_SIZE),
    "--batch-size", str(BATCH_SIZE), "--num_workers", "2", "--seed", "0", "--device", "cpu",
    # No linear lr scaling with this small batch (the original never scaled either).
    "--unscale-lr",
    # A short schedule on 32 px digits: mixup/cutmix and 8% crops would erase most digits.
    "--mixup", "0", "--cutmix", "0", "--crop-scale-min", "0.35", "--print-freq", "50",
    # Repeatable: deterministic kernels and a fixed thread count (see THREADS).
    "--deterministic", "--threads", str(THREADS),
]
# Students at the original's effective lr 5e-4; the CNN teacher from scratch at 2e-3.
STUDENT = ["--student-model", "deit_ti_distilled", "--epochs", str(STUDENT_EPOCHS), "--lr", "5e-4"]
RUNS = {
    "teacher": ["--train-teacher", "--teacher", TEACHER, "--epochs", str(TEACHER_EPOCHS), "--lr", "2e-3"],
    "baseline": STUDENT + ["--alpha", "0", "--gamma", "0"],
    "vkd": STUDENT + ["--alpha", "1", "--gamma", "1", "--teacher", TEACHER,
                      "--teacher-path", os.path.join(OUT, "teacher", "teacher.pth"),
                      "--no-projector-weight-decay"],
}
LABELS = {"teacher": f"teacher ({TEACHER})", "baseline": "DeiT-Ti, no distillation", "vkd": "DeiT-Ti, VkD"}


def timed_run(command, output_dir: str, reuse: bool, quiet: bool = False):
    """Run ``command`` (a main_distributed.py job writing to ``output_dir``) unless ``reuse``; return its
    per-epoch log and the wall seconds it took (stored beside the log, so reused runs keep theirs)."""
    seconds_path = os.path.join(output_dir, "wall_seconds.txt")
    if not reuse:
        shutil.rmtree(output_dir, ignore_errors=True)
        started = time.time()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if quiet else None,
                       env={**os.environ, **THREAD_ENV})
        with open(seconds_path, "w") as handle:
            handle.write(f"{time.time() - started:.1f}\n")
    with open(os.path.join(output_dir, "log.txt")) as handle:
        epochs = [json.loads(line) for line in handle if line.strip()]
    with open(seconds_path) as handle:
        return epochs, float(handle.read())


def run(name: str, force: bool) -> dict:
    """Run one job of the demo (or reuse the finished teacher) and return its per-epoch log."""
    output_dir = os.path.join(OUT, name)
    command = [sys.executable, "main_distributed.py", *COMMON, *RUNS[name], "--output_dir", output_dir]
    reuse = name == "teacher" and not force and os.path.isfile(os.path.join(output_dir, "teacher.pth"))
    print(f"\n=== {name}: " + (f"reusing {output_dir} (FORCE=1 retrains)" if reuse else shlex.join(command)),
          flush=True)
    epochs, seconds = timed_run(command, output_dir, reuse)
    return {"command": shlex.join(command), "epochs": epochs, "seconds": seconds,
            "acc1": epochs[-1]["val_acc1"], "acc5": epochs[-1]["val_acc5"]}


# ----------------------------------------------------------------------------- reading the curves
# What the printed table and the verdict are made of. The noise rule, used everywhere below:
#
#   Two top-1 values measured on the same n validation images differ *beyond the noise* when a
#   two-sided two-proportion z-test (pooled variance, each value a proportion of n independent
#   images) gives p < 0.05; otherwise the difference is *inside the noise*.
#
# This counts only the sampling noise of the n images; the spread between training seeds comes on top
# of it (the ablation measures that), so "beyond the noise" here is necessary for a ranking, not enough.
THRESHOLDS = (85, 90)          # percent top-1; the table gives the first epoch reaching each
EARLY_EPOCHS = (3, 6, 9)       # top-1 after these many epochs is printed
SIGNIFICANCE = 0.05
Z95 = 1.959963984540054        # two-sided 95% normal quantile
NAMES = {"baseline": "no distillation", "vkd": "VkD"}


def correct_count(acc1: float, n: int) -> int:
    """Number of correctly classified images behind a top-1 percentage measured on ``n`` images."""
    return int(round(acc1 * n / 100.0))


def wilson_interval(correct: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval (95% by default) of ``correct`` out of ``n``, in percent."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def two_proportion_p_value(correct_a: int, correct_b: int, n: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of ``correct_a`` vs ``correct_b`` out of ``n`` each."""
    pooled = (correct_a + correct_b) / (2 * n)
    if pooled <= 0 or pooled >= 1:
        return 1.0  # both all wrong or both all right: no difference at all
    z = (correct_a - correct_b) / n / math.sqrt(pooled * (1 - pooled) * 2 / n)
    return math.erfc(abs(z) / math.sqrt(2))


def format_p(p_value: float) -> str:
    """'p = 0.128', or 'p < 0.001'; three decimals, so a value just under 0.05 never prints as 0.05."""
    return "p < 0.001" if p_value < 0.001 else f"p = {math.floor(p_value * 1000) / 1000:.3f}"


def first_epoch_reaching(curve: Sequence[float], threshold: float, n: int) -> Optional[int]:
    """First epoch (1-based) whose top-1 is at least ``threshold`` percent, or None (never).
    Compared in image counts, so 306 of 360 reaches 85% exactly."""
    for epoch, acc1 in enumerate(curve, 1):
        if correct_count(acc1, n) * 100 >= threshold * n:
            return epoch
    return None


def describe_curve(curve: Sequence[float], n: int) -> dict:
    """What the table prints for one student, from its validation top-1 after each epoch (percent)."""
    if not curve:
        raise ValueError("empty learning curve")
    final = correct_count(curve[-1], n)
    low, high = wilson_interval(final, n)
    return {
        "acc1_per_epoch": [round(acc1, 4) for acc1 in curve],
        "acc1_at_epoch": {str(e): round(curve[e - 1], 4) for e in EARLY_EPOCHS if e <= len(curve)},
        "first_epoch_at": {str(t): first_epoch_reaching(curve, t, n) for t in THRESHOLDS},
        "mean_acc1_over_epochs": round(sum(curve) / len(curve), 4),
        "acc1_interval95": [round(low, 2), round(high, 2)],
    }


def _reached(first: dict) -> str:
    """'5/6' or '9/never': the first epochs at the thresholds, in the order of THRESHOLDS."""
    return "/".join("never" if first[str(t)] is None else str(first[str(t)]) for t in THRESHOLDS)


def _learned_faster(name: str, other: str, stats: dict, ahead: dict) -> bool:
    """``name`` learned faster than ``other``: a larger area under the curve, no threshold reached later
    (never counts as later than any epoch), and ahead beyond the noise at one epoch at least."""
    def later(epoch_a, epoch_b):
        return (epoch_a or math.inf) > (epoch_b or math.inf)
    first, first_other = stats[name]["first_epoch_at"], stats[other]["first_epoch_at"]
    return (stats[name]["mean_acc1_over_epochs"] > stats[other]["mean_acc1_over_epochs"]
            and not any(later(first[str(t)], first_other[str(t)]) for t in THRESHOLDS)
            and ahead[name] > 0)


def verdict(baseline: Sequence[float], vkd: Sequence[float], n: int) -> str:
    """One line comparing the two students' validation top-1 curves (percent after each epoch, both on
    the same ``n`` images), computed from the numbers alone.

    First sentence: which student learned faster. A student learned faster when its mean top-1 over
    the epochs (the area under the learning curve) is larger, it reached no threshold of THRESHOLDS
    later than the other, and it was ahead beyond the noise after at least one epoch; when neither
    did, the line says so. Second sentence: the final top-1 of both and whether their difference is
    inside or beyond the noise. The noise rule: a two-sided two-proportion z-test at p < 0.05, each
    top-1 a proportion of ``n`` independent images (see the comment above THRESHOLDS).
    """
    if len(baseline) != len(vkd):
        raise ValueError("the two curves must cover the same epochs")
    curves = {"baseline": baseline, "vkd": vkd}
    stats = {name: describe_curve(curve, n) for name, curve in curves.items()}
    ahead = {"baseline": 0, "vkd": 0}
    for acc_baseline, acc_vkd in zip(baseline, vkd):
        correct_baseline, correct_vkd = correct_count(acc_baseline, n), correct_count(acc_vkd, n)
        if two_proportion_p_value(correct_baseline, correct_vkd, n) < SIGNIFICANCE:
            ahead["baseline" if correct_baseline > correct_vkd else "vkd"] += 1
    epochs = len(vkd)
    thresholds = "/".join(f"{t}%" for t in THRESHOLDS)
    evidence = (f"{thresholds} reached at epoch {_reached(stats['vkd']['first_epoch_at'])} (VkD) vs "
                f"{_reached(stats['baseline']['first_epoch_at'])} (no distillation), mean top-1 over the {epochs} "
                f"epochs {stats['vkd']['mean_acc1_over_epochs']:.1f} vs {stats['baseline']['mean_acc1_over_epochs']:.1f}")
    faster = [name for name, other in (("vkd", "baseline"), ("baseline", "vkd"))
              if _learned_faster(name, other, stats, ahead)]
    if faster:
        winner = NAMES[faster[0]]
        first = (f"{winner[0].upper()}{winner[1:]} learned faster: {evidence}, {winner} ahead beyond the noise "
                 f"after {ahead[faster[0]]} of {epochs} epochs.")
    else:
        first = (f"Neither learned clearly faster: {evidence}, ahead beyond the noise after {ahead['vkd']} (VkD) "
                 f"and {ahead['baseline']} (no distillation) of {epochs} epochs.")
    final_vkd, final_baseline = correct_count(vkd[-1], n), correct_count(baseline[-1], n)
    p_value = two_proportion_p_value(final_vkd, final_baseline, n)
    values = f"Final top-1 {vkd[-1]:.1f} (VkD) vs {baseline[-1]:.1f} (no distillation)"
    if final_vkd == final_baseline:
        second = f"{values}: the same {final_vkd} of {n} images."
    elif p_value >= SIGNIFICANCE:
        second = (f"{values}: a difference of {abs(final_vkd - final_baseline)} of {n} images, inside the noise "
                  f"(two-proportion z-test, {format_p(p_value)}), so the final numbers alone do not rank them.")
    else:
        leader = "VkD" if final_vkd > final_baseline else "no distillation"
        second = (f"{values}: {leader} ends {abs(final_vkd - final_baseline)} of {n} images ahead, beyond the "
                  f"noise (two-proportion z-test, {format_p(p_value)}).")
    return f"{first} {second}"


def format_table(results: dict, n: int) -> str:
    """The printed table: final top-1 with its 95% Wilson interval, top-5 and wall seconds for every run;
    for the students also top-1 after EARLY_EPOCHS, the first epoch at THRESHOLDS and the mean top-1."""
    early = [f"ep{e}" for e in EARLY_EPOCHS]
    header = (f"{'model':<27}{'top-1':>7}  {'95% interval':<13}{'top-5':>7}" + "".join(f"{h:>7}" for h in early)
              + "".join(f"{f'{t}% at':>8}" for t in THRESHOLDS) + f"{'mean':>7}{'wall s':>8}")
    lines = [header]
    for name, result in results.items():
        low, high = wilson_interval(correct_count(result["acc1"], n), n)
        row = f"{LABELS[name]:<27}{result['acc1']:>7.2f}  {f'{low:.1f}-{high:.1f}':<13}{result['acc5']:>7.2f}"
        stats = result.get("curve")
        if stats is None:
            row += "".join(f"{'-':>7}" for _ in early) + "".join(f"{'-':>8}" for _ in THRESHOLDS) + f"{'-':>7}"
        else:
            row += "".join(f"{stats['acc1_at_epoch'][str(e)]:>7.1f}" if str(e) in stats["acc1_at_epoch"]
                           else f"{'-':>7}" for e in EARLY_EPOCHS)
            row += "".join(f"{'never' if stats['first_epoch_at'][str(t)] is None else stats['first_epoch_at'][str(t)]:>8}"
                           for t in THRESHOLDS)
            row += f"{stats['mean_acc1_over_epochs']:>7.1f}"
        lines.append(row + f"{result['seconds']:>8.1f}")
    lines.append(f"(epN: top-1 after N epochs; {'/'.join(f'{t}%' for t in THRESHOLDS)} at: first epoch reaching it; "
                 f"mean: top-1 averaged over all epochs, the area under the learning curve; 95% Wilson "
                 f"intervals on n = {n} images)")
    return "\n".join(lines)


def machine_description() -> dict:
    """CPU model, threads, torch version and date: the numbers' last digits depend on the first three."""
    import torch
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": THREADS, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def plot_curves(results: dict, machine: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.4))
    for threshold in THRESHOLDS:
        accuracy_axes.axhline(threshold, color="lightgray", linestyle=":", linewidth=1)
    upper = max(("vkd", "baseline"), key=lambda name: results[name]["curve"]["mean_acc1_over_epochs"])
    for name, color in (("baseline", "tab:blue"), ("vkd", "tab:orange")):
        curve = results[name]["curve"]
        epochs = list(range(1, len(curve["acc1_per_epoch"]) + 1))
        accuracy_axes.plot(epochs, curve["acc1_per_epoch"], marker="o", color=color, label=NAMES[name])
        final, (low, high) = curve["acc1_per_epoch"][-1], curve["acc1_interval95"]  # the final 95% interval
        accuracy_axes.errorbar([epochs[-1] + (0.25 if name == "vkd" else -0.25)], [final],
                               yerr=[[final - low], [high - final]], color=color, capsize=3, linewidth=1)
        for threshold in THRESHOLDS:
            epoch = curve["first_epoch_at"][str(threshold)]
            if epoch is not None:  # the first epoch at each threshold: a ring, and the epoch beside it
                accuracy_axes.plot([epoch], [curve["acc1_per_epoch"][epoch - 1]], marker="o", markersize=12,
                                   markerfacecolor="none", markeredgecolor=color)
                accuracy_axes.annotate(f"{threshold}% @ {epoch}", (epoch, curve["acc1_per_epoch"][epoch - 1]),
                                       textcoords="offset points", fontsize=8, color=color,
                                       # labels up-left of the upper curve (larger area), down-right of the other
                                       **({"xytext": (-6, 7), "ha": "right"} if name == upper
                                          else {"xytext": (6, -14), "ha": "left"}))
    accuracy_axes.axhline(results["teacher"]["acc1"], color="gray", linestyle="--", label=f"teacher ({TEACHER})")
    accuracy_axes.set(xlabel="epoch", ylabel="validation top-1 (%)", title="DeiT-Ti students on digits")
    accuracy_axes.legend(loc="lower right")
    vkd_epochs = results["vkd"]["epochs"]
    for term in ("ce", "kd", "vkd", "loss"):
        loss_axes.plot([e["epoch"] + 1 for e in vkd_epochs], [e[f"train_{term}"] for e in vkd_epochs],
                       marker=".", label=term)
    loss_axes.set(xlabel="epoch", ylabel="mean train loss", title="VkD student: loss terms (weighted)")
    loss_axes.legend()
    figure.text(0.01, 0.01, f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
                            f"{machine['date']}; rings: first epoch at {'/'.join(f'{t}%' for t in THRESHOLDS)}; "
                            f"bars: 95% Wilson interval of the final top-1",
                fontsize=7, color="dimgray")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)


def main() -> None:
    os.chdir(ROOT)
    force = os.environ.get("FORCE", "") not in ("", "0")
    started = time.time()
    datasets.export_digits(DATA, force=force)
    results = {name: run(name, force) for name in RUNS}
    n = results["vkd"]["epochs"][-1]["val_images"]
    for name in ("baseline", "vkd"):
        results[name]["curve"] = describe_curve([e["val_acc1"] for e in results[name]["epochs"]], n)
    line = verdict(results["baseline"]["curve"]["acc1_per_epoch"], results["vkd"]["curve"]["acc1_per_epoch"], n)
    machine = machine_description()
    os.makedirs(OUT, exist_ok=True)
    runs = {}
    for name, result in results.items():
        runs[name] = {"acc1": result["acc1"], "acc5": result["acc5"], "seconds": result["seconds"]}
        runs[name]["acc1_interval95"] = [round(v, 2) for v in wilson_interval(correct_count(result["acc1"], n), n)]
        if "curve" in result:
            runs[name].update(result["curve"])
    summary = {
        "teacher_acc1": results["teacher"]["acc1"], "baseline_acc1": results["baseline"]["acc1"],
        "vkd_acc1": results["vkd"]["acc1"], "seconds": round(time.time() - started, 1),
        "commands": {name: result["command"] for name, result in results.items()},
        "runs": runs, "val_images": n, "thresholds": list(THRESHOLDS), "verdict": line,
        "noise_rule": f"two-sided two-proportion z-test on {n} images, p < {SIGNIFICANCE}",
        "machine": machine,
    }
    with open(os.path.join(OUT, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plot_curves(results, machine, os.path.join(OUT, "curves.png"))
    print("\n" + format_table(results, n))
    print(f"\nverdict: {line}")
    print(f"\ntotal {summary['seconds']:.0f} s on {machine['cpu']} ({machine['threads']} threads); "
          f"wrote {OUT}/summary.json and {OUT}/curves.png")


if __name__ == "__main__":
    main()
