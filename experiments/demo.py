"""`make demo` (``python -m experiments.demo``): the whole VkD story on real images that ship offline, in
minutes on a laptop CPU.

1. Export scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) to an ImageFolder.
2. Train a small CNN teacher on them with ``main_distributed.py --train-teacher``.
3. Train two DeiT-Ti students with identical budgets: no distillation (alpha = gamma = 0) and full
   VkD (orthogonal projector + LayerNorm teacher features + KL on the dist head); ``configs/demo/``.
4. Print a table (final top-1 with its 95% interval; for each student, top-1 after a few early
   epochs, the first epoch at 85% and 90% and the mean top-1 over all epochs) and a verdict line
   computed from it, and write ``results/demo/``: ``summary.json``, then ``curves.png`` and ``README.md``
   drawn from it.

On 360 validation images one seed's final top-1 cannot rank the two students: a few images decide it,
and so does the CPU (other kernels round differently). The learning curves can, which is why the verdict
reads them first. Every run uses a fixed thread count and deterministic kernels, so the same command on
the same machine gives the same numbers.

Every step goes through the same entry point, data pipeline and engine as an ImageNet run. A rerun
reuses the exported data and the teacher; ``FORCE=1 make demo`` redoes everything.
"""
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import datasets
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
from experiments.stats import (
    SIGNIFICANCE,
    correct_count,
    differ_beyond_the_noise,
    format_p,
    two_proportion_p_value,
    wilson_interval,
)
from vkd.cli import entry_point
from vkd.errors import BadInput
from vkd.runs import cpu_model

CONFIGS = os.path.join("configs", "demo")
OUT = os.path.join("runs", "demo")
RESULTS = os.path.join("results", "demo")
TEACHER = "resnet10t"
# Repeatable runs: `threads: 2` and deterministic kernels in configs/demo/common.yaml, and the same thread
# count in the environment of every run; the loader workers' seeds come from the seed.
THREADS = 2
# The students train on every run, which is what the demo shows; only the teacher is reused.
JOBS = [Job(name, os.path.join(OUT, name), config=os.path.join(CONFIGS, f"{name}.yaml"), threads=THREADS,
            reuse_finished=name == "teacher") for name in ("teacher", "baseline", "vkd")]
LABELS = {"teacher": f"teacher ({TEACHER})", "baseline": "DeiT-Ti, no distillation", "vkd": "DeiT-Ti, VkD"}
NAMES = {"baseline": "no distillation", "vkd": "VkD"}
THRESHOLDS = (85, 90)          # percent top-1; the table gives the first epoch reaching each
EARLY_EPOCHS = (3, 6, 9)       # top-1 after these many epochs is printed
LOSS_TERMS = ("ce", "kd", "vkd", "loss")


# ----------------------------------------------------------------------------- reading the curves
# What the table and the verdict are made of. Differences between the students are judged by the noise
# rule of experiments.stats: a two-sided two-proportion z-test on the n validation images, p < 0.05.


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
    low, high = wilson_interval(correct_count(curve[-1], n), n)
    return {
        "acc1_per_epoch": [round(acc1, 4) for acc1 in curve],
        "acc1_at_epoch": {str(e): round(curve[e - 1], 4) for e in EARLY_EPOCHS if e <= len(curve)},
        "first_epoch_at": {str(t): first_epoch_reaching(curve, t, n) for t in THRESHOLDS},
        "mean_acc1_over_epochs": round(sum(curve) / len(curve), 4),
        "acc1_interval95": [round(low, 2), round(high, 2)],
    }


def _learned_faster(name: str, other: str, students: dict, ahead: dict) -> bool:
    """``name`` learned faster than ``other``: a larger area under the curve, no threshold reached later
    (never counts as later than any epoch), and ahead beyond the noise at one epoch at least."""
    def later(epoch_a, epoch_b):
        return (epoch_a or math.inf) > (epoch_b or math.inf)
    first, first_other = students[name]["first_epoch_at"], students[other]["first_epoch_at"]
    return (students[name]["mean_acc1_over_epochs"] > students[other]["mean_acc1_over_epochs"]
            and not any(later(first[str(t)], first_other[str(t)]) for t in THRESHOLDS)
            and ahead[name] > 0)


def compare_students(baseline: Sequence[float], vkd: Sequence[float], n: int) -> dict:
    """The numbers the verdict is made of, from the two students' top-1 after each epoch (percent, both on
    the same ``n`` images): after how many epochs each was ahead beyond the noise, which learned faster
    (see _learned_faster; None when neither did), and the final image counts with their p-value."""
    if len(baseline) != len(vkd):
        raise ValueError("the two curves must cover the same epochs")
    students = {"baseline": describe_curve(baseline, n), "vkd": describe_curve(vkd, n)}
    ahead = {"baseline": 0, "vkd": 0}
    for acc_baseline, acc_vkd in zip(baseline, vkd):
        correct_baseline, correct_vkd = correct_count(acc_baseline, n), correct_count(acc_vkd, n)
        if differ_beyond_the_noise(correct_baseline, correct_vkd, n):
            ahead["baseline" if correct_baseline > correct_vkd else "vkd"] += 1
    faster = [name for name, other in (("vkd", "baseline"), ("baseline", "vkd"))
              if _learned_faster(name, other, students, ahead)]
    final = {"baseline": correct_count(baseline[-1], n), "vkd": correct_count(vkd[-1], n)}
    p_value = two_proportion_p_value(final["vkd"], final["baseline"], n)
    return {"epochs": len(vkd), "epochs_ahead_beyond_noise": ahead, "learned_faster": faster[0] if faster else None,
            "final_correct": final, "final_p_value": p_value, "final_beyond_noise": p_value < SIGNIFICANCE}


def _reached(first: dict) -> str:
    """'5/6' or '9/never': the first epochs at the thresholds, in the order of THRESHOLDS."""
    return "/".join("never" if first[str(t)] is None else str(first[str(t)]) for t in THRESHOLDS)


def verdict(students: dict, comparison: dict, n: int) -> str:
    """One line saying what ``comparison`` (compare_students) found, with the numbers it rests on from the
    students' curve descriptions (``students``: baseline and vkd, as describe_curve gives them)."""
    vkd, baseline = students["vkd"], students["baseline"]
    ahead, epochs = comparison["epochs_ahead_beyond_noise"], comparison["epochs"]
    thresholds = "/".join(f"{t}%" for t in THRESHOLDS)
    evidence = (f"{thresholds} reached at epoch {_reached(vkd['first_epoch_at'])} (VkD) vs "
                f"{_reached(baseline['first_epoch_at'])} (no distillation), mean top-1 over the {epochs} "
                f"epochs {vkd['mean_acc1_over_epochs']:.1f} vs {baseline['mean_acc1_over_epochs']:.1f}")
    faster = comparison["learned_faster"]
    if faster:
        winner = NAMES[faster]
        first = (f"{winner[0].upper()}{winner[1:]} learned faster: {evidence}, {winner} ahead beyond the noise "
                 f"after {ahead[faster]} of {epochs} epochs.")
    else:
        first = (f"Neither learned clearly faster: {evidence}, ahead beyond the noise after {ahead['vkd']} (VkD) "
                 f"and {ahead['baseline']} (no distillation) of {epochs} epochs.")
    final_vkd, final_baseline = comparison["final_correct"]["vkd"], comparison["final_correct"]["baseline"]
    values = (f"Final top-1 {vkd['acc1_per_epoch'][-1]:.1f} (VkD) vs {baseline['acc1_per_epoch'][-1]:.1f} "
              "(no distillation)")
    p_text = format_p(comparison["final_p_value"])
    if final_vkd == final_baseline:
        second = f"{values}: the same {final_vkd} of {n} images."
    elif not comparison["final_beyond_noise"]:
        second = (f"{values}: a difference of {abs(final_vkd - final_baseline)} of {n} images, inside the noise "
                  f"(two-proportion z-test, {p_text}), so the final numbers alone do not rank them.")
    else:
        leader = "VkD" if final_vkd > final_baseline else "no distillation"
        second = (f"{values}: {leader} ends {abs(final_vkd - final_baseline)} of {n} images ahead, beyond the "
                  f"noise (two-proportion z-test, {p_text}).")
    return f"{first} {second}"


# ----------------------------------------------------------------------------- the report, from summary.json


def build_summary(logs: Dict[str, List[dict]], records: Dict[str, dict], seconds: float, machine: dict) -> dict:
    """summary.json from each job's per-epoch log and run_jobs record (command, wall seconds)."""
    n = logs["vkd"][-1]["val_images"]
    runs = {}
    for name, epochs in logs.items():
        if not all("val_acc1" in epoch for epoch in epochs):
            raise BadInput(f"the {name} run skipped evaluations; the demo's report needs top-1 after every epoch "
                           f"(eval_freq: 1 in {CONFIGS}/common.yaml)")
        acc1 = epochs[-1]["val_acc1"]
        runs[name] = {"acc1": acc1, "acc5": epochs[-1]["val_acc5"], "seconds": records[name]["seconds"],
                      "acc1_interval95": [round(v, 2) for v in wilson_interval(correct_count(acc1, n), n)]}
        if name in NAMES:
            runs[name].update(describe_curve([e["val_acc1"] for e in epochs], n))
            runs[name]["train_loss_per_epoch"] = {term: [e[f"train_{term}"] for e in epochs] for term in LOSS_TERMS}
    students = {name: runs[name] for name in NAMES}
    comparison = compare_students(runs["baseline"]["acc1_per_epoch"], runs["vkd"]["acc1_per_epoch"], n)
    return {
        "teacher_acc1": runs["teacher"]["acc1"], "baseline_acc1": runs["baseline"]["acc1"],
        "vkd_acc1": runs["vkd"]["acc1"], "seconds": seconds,
        "commands": {name: record["command"] for name, record in records.items()},
        "runs": runs, "val_images": n, "thresholds": list(THRESHOLDS), "comparison": comparison,
        "verdict": verdict(students, comparison, n),
        "noise_rule": f"two-sided two-proportion z-test on {n} images, p < {SIGNIFICANCE}",
        "machine": machine,
    }


def format_table(runs: dict, n: int) -> str:
    """The printed table: final top-1 with its 95% Wilson interval, top-5 and wall seconds for every run;
    for the students also top-1 after EARLY_EPOCHS, the first epoch at THRESHOLDS and the mean top-1."""
    early = [f"ep{e}" for e in EARLY_EPOCHS]
    header = (f"{'model':<27}{'top-1':>7}  {'95% interval':<13}{'top-5':>7}" + "".join(f"{h:>7}" for h in early)
              + "".join(f"{f'{t}% at':>8}" for t in THRESHOLDS) + f"{'mean':>7}{'wall s':>8}")
    lines = [header]
    for name, run in runs.items():
        low, high = wilson_interval(correct_count(run["acc1"], n), n)
        row = f"{LABELS[name]:<27}{run['acc1']:>7.2f}  {f'{low:.1f}-{high:.1f}':<13}{run['acc5']:>7.2f}"
        if name not in NAMES:
            row += "".join(f"{'-':>7}" for _ in early) + "".join(f"{'-':>8}" for _ in THRESHOLDS) + f"{'-':>7}"
        else:
            row += "".join(f"{run['acc1_at_epoch'][str(e)]:>7.1f}" if str(e) in run["acc1_at_epoch"]
                           else f"{'-':>7}" for e in EARLY_EPOCHS)
            row += "".join(f"{'never' if run['first_epoch_at'][str(t)] is None else run['first_epoch_at'][str(t)]:>8}"
                           for t in THRESHOLDS)
            row += f"{run['mean_acc1_over_epochs']:>7.1f}"
        lines.append(row + f"{run['seconds']:>8.1f}")
    lines.append(f"(epN: top-1 after N epochs; {'/'.join(f'{t}%' for t in THRESHOLDS)} at: first epoch reaching it; "
                 f"mean: top-1 averaged over all epochs, the area under the learning curve; 95% Wilson "
                 f"intervals on n = {n} images)")
    return "\n".join(lines)


def machine_description() -> dict:
    """CPU model, threads, torch version and date: the numbers' last digits depend on the first three."""
    import torch
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": THREADS, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def plot_curves(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, machine = summary["runs"], summary["machine"]
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.4))
    for threshold in THRESHOLDS:
        accuracy_axes.axhline(threshold, color="lightgray", linestyle=":", linewidth=1)
    upper = max(("vkd", "baseline"), key=lambda name: runs[name]["mean_acc1_over_epochs"])
    for name, color in (("baseline", "tab:blue"), ("vkd", "tab:orange")):
        curve = runs[name]["acc1_per_epoch"]
        epochs = list(range(1, len(curve) + 1))
        accuracy_axes.plot(epochs, curve, marker="o", color=color, label=NAMES[name])
        final, (low, high) = curve[-1], runs[name]["acc1_interval95"]  # the final 95% interval
        accuracy_axes.errorbar([epochs[-1] + (0.25 if name == "vkd" else -0.25)], [final],
                               yerr=[[final - low], [high - final]], color=color, capsize=3, linewidth=1)
        for threshold in THRESHOLDS:
            epoch = runs[name]["first_epoch_at"][str(threshold)]
            if epoch is not None:  # the first epoch at each threshold: a ring, and the epoch beside it
                accuracy_axes.plot([epoch], [curve[epoch - 1]], marker="o", markersize=12,
                                   markerfacecolor="none", markeredgecolor=color)
                accuracy_axes.annotate(f"{threshold}% @ {epoch}", (epoch, curve[epoch - 1]),
                                       textcoords="offset points", fontsize=8, color=color,
                                       # labels up-left of the upper curve (larger area), down-right of the other
                                       **({"xytext": (-6, 7), "ha": "right"} if name == upper
                                          else {"xytext": (6, -14), "ha": "left"}))
    accuracy_axes.axhline(runs["teacher"]["acc1"], color="gray", linestyle="--", label=f"teacher ({TEACHER})")
    accuracy_axes.set(xlabel="epoch", ylabel="validation top-1 (%)", title="DeiT-Ti students on digits")
    accuracy_axes.legend(loc="lower right")
    losses = runs["vkd"]["train_loss_per_epoch"]
    for term in LOSS_TERMS:
        loss_axes.plot(range(1, len(losses[term]) + 1), losses[term], marker=".", label=term)
    loss_axes.set(xlabel="epoch", ylabel="mean train loss", title="VkD student: loss terms (weighted)")
    loss_axes.legend()
    figure.text(0.01, 0.01, f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
                            f"{machine['date']}; rings: first epoch at {'/'.join(f'{t}%' for t in THRESHOLDS)}; "
                            f"bars: 95% Wilson interval of the final top-1",
                fontsize=7, color="dimgray")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)


def results_page(summary: dict) -> str:
    """results/demo/README.md, from summary.json alone."""
    machine = summary["machine"]
    lines = [
        "# The demo: DeiT-Ti students on digits, without and with VkD", "",
        f"Made by `make demo` (`python -m experiments.demo`) on {machine['date']}: {machine['cores']} cores of "
        f"{machine['cpu']}, {machine['threads']} threads per run, torch {machine['torch']}, {summary['seconds']:.0f} s "
        "in all. Every number below comes from [`summary.json`](summary.json); the set-up is explained in the "
        "[documentation](../../docs/studies.md#the-demo).", "",
        "```", format_table(summary["runs"], summary["val_images"]), "```", "",
        f"**Verdict** (noise rule: {summary['noise_rule']}): {summary['verdict']}", "",
        "![learning curves](curves.png)", "",
        "Commands (from the repository root; `make demo` runs them, reusing a finished teacher):", "",
    ]
    lines += [f"- {name}: `{command}`" for name, command in summary["commands"].items()]
    return "\n".join(lines + [""])


@entry_point
def main(argv=None) -> None:
    driver_parser(__doc__).parse_args(argv)
    os.chdir(ROOT)
    require_writable_results(RESULTS)
    force = force_requested()
    started = time.time()
    datasets.export_digits(datasets.DEFAULT_DIGITS_ROOT, force=force)
    records = run_jobs(JOBS, force, show_output=True)
    logs = {job.name: epoch_log(job.output_dir) for job in JOBS}
    machine = machine_description()
    summary = build_summary(logs, records, round(time.time() - started, 1), machine)
    write_report(RESULTS, "summary.json", summary, results_page, plot_curves, "curves.png")
    print("\n" + format_table(summary["runs"], summary["val_images"]))
    print(f"\nverdict: {summary['verdict']}")
    print(f"\ntotal {summary['seconds']:.0f} s on {machine['cpu']} ({machine['threads']} threads); "
          f"wrote {RESULTS}/summary.json, curves.png and README.md")


if __name__ == "__main__":
    main()
