"""`make fmnist` (``python -m experiments.fmnist``): does VkD's projector beat the alternatives, with and
without logit KD beside it; does the original's collapse matter; does VkD beat DeiT's own distillation (the
paper's DeiT⚗ baseline); and for a CNN student, does it beat logit KD and FitNets?

Trains the resnet10t teacher of ``configs/fmnist/teacher.yaml`` on a class-balanced training subset of
Fashion-MNIST, then every row of ``configs/fmnist/`` (DeiT-Ti students in rows 1-9, a regnetx_002 CNN in rows
10-14) for five seeds with identical budgets, seed by seed
(all rows of seed 0 first), two runs side by side, so that an interrupted study still holds complete pairs.
The rows of a seed share one teacher-output cache. Finished runs are reused (``FORCE=1`` reruns them) and an
interrupted one continues where it stopped (``--resume auto``); each finished run prints an ETA. Writes
``results/fmnist/``: ``fmnist.json``, ``fmnist.png`` and ``README.md``, the page written from the JSON: the
table, paired per-seed comparisons, and a conclusion that follows from those numbers. ``--report-only``
writes them from the runs finished so far, without training.
"""
import json
import math
import os
import statistics
import time
from typing import Optional

import torch

import datasets
import models
from experiments.rows import finished_runs, row_arguments, row_configs, row_job, summarise, trained_student
from experiments.runner import (
    ROOT,
    Job,
    driver_parser,
    epoch_log,
    force_requested,
    hardware_description,
    require_writable_results,
    run_jobs,
    write_report,
)
from experiments.stats import binomial_standard_error, paired_comparison
from vkd.cli import entry_point
from vkd.errors import BadInput
from vkd.losses import feature_width
from vkd.runs import write_json

CONFIGS = os.path.join("configs", "fmnist")
OUT = os.path.join("runs", "fmnist")
RESULTS = os.path.join("results", "fmnist")
SEEDS = (0, 1, 2, 3, 4)
# Two runs side by side, one thread each: the two cores of the machine the study was sized for.
WORKERS = 2
TEST_IMAGES = 10000
TRAINING_IMAGES = 6000  # the 10PERCENT subset: 600 per class
WALL_RECORD = os.path.join(OUT, "students_wall.json")
# Every run computes with one thread (and the driver runs under `nice -n 19` when started by make). On
# cores shared with other jobs, two OpenMP threads spent ten times the CPU per image of one (measured:
# 76 vs 7.8 CPU-ms per DeiT-Ti training image at load average 19), waiting for each other.
THREADS = 1
TEACHER = Job("teacher", os.path.join(OUT, "teacher"), config=os.path.join(CONFIGS, "teacher.yaml"), threads=THREADS,
              resumable=True)
VKD = "row3_vkd"
# (row compared with VKD, what the comparison asks).
PAIRS = (("row1_no_distillation", "does VkD beat training without distillation?"),
         ("row2_logit_kd", "does the feature term add to logit KD?"),
         ("row4_linear_layernorm", "with logit KD, does the orthogonal constraint beat a linear projector?"),
         ("row5_original_recipe", "does keeping the projector an isometry (no weight decay) change the result?"))
# The projector question without logit KD to mask it (gamma 0), and whether features alone teach.
FEATURES_ONLY, LINEAR_FEATURES_ONLY = "row6_features_orthogonal", "row7_features_linear"
FEATURE_PAIRS = ((FEATURES_ONLY, LINEAR_FEATURES_ONLY,
                  "without logit KD, does the orthogonal projector beat a linear one?"),
                 (FEATURES_ONLY, "row1_no_distillation", "do the orthogonal projector's features alone teach?"))
COLLAPSE_PAIR = ("row5_original_recipe", "row2_logit_kd")
COLLAPSE_QUESTION = "did the collapsed projector's feature term teach anything beyond logit KD?"
# The paper's Table 1 baseline, DeiT's own distillation through the distillation token, against VkD.
DEIT_HARD, DEIT_SOFT = "row8_deit_hard", "row9_deit_soft"
DEIT_PAIRS = ((VKD, DEIT_HARD, "does VkD beat DeiT's hard distillation (DeiT⚗)?"),
              (VKD, DEIT_SOFT, "does VkD beat DeiT's soft distillation?"))
# A CNN student (rows 10-14): VkD against logit KD and FitNets.
CNN_STUDENT = "regnetx_002"
CNN_NONE, CNN_KD, CNN_FITNET, CNN_VKD, CNN_VKD_FEATURES = (
    "row10_cnn_none", "row11_cnn_kd", "row12_cnn_fitnet", "row13_cnn_vkd", "row14_cnn_vkd_features")
CNN_PAIRS = ((CNN_VKD, CNN_NONE, "for a CNN student, does VkD beat no distillation?"),
             (CNN_VKD, CNN_KD, "for a CNN student, does VkD beat logit KD?"),
             (CNN_VKD, CNN_FITNET, "for a CNN student, does VkD beat FitNets?"),
             (CNN_VKD_FEATURES, CNN_FITNET,
              "without logit KD, does the orthogonal projector with LayerNorm beat FitNets' linear one?"),
             (CNN_FITNET, CNN_NONE, "do FitNets' hints teach the CNN?"))
# ||W||_F / sqrt(width) below this is a projector that weight decay shrank to zero.
COLLAPSED_BELOW = 1e-6


@torch.no_grad()
def projector_scale(row: dict, run: dict) -> Optional[float]:
    """||W||_F / sqrt(student width) of the trained projector: 1 for an isometry, 0 after the collapse."""
    student = trained_student(row, run["output_dir"], len(datasets.FMNIST_CLASSES))
    if getattr(student, "projector", None) is None:
        return None
    return (student.projector.weight.norm() / math.sqrt(feature_width(student))).item()


def paired(rows_by_name: dict, first: str, second: str) -> dict:
    """The paired comparison (experiments.stats) of two rows' top-1 by seed, first - second."""
    def by_seed(row):
        return dict(zip(row["seeds"], row["acc1_per_seed"]))
    return {"first": first, "second": second,
            **paired_comparison(by_seed(rows_by_name[first]), by_seed(rows_by_name[second]))}


def comparisons(rows_by_name: dict) -> list:
    """VkD against each row of PAIRS, the FEATURE_PAIRS, then the collapse pair, each with its question."""
    found = [dict(paired(rows_by_name, VKD, other), question=question) for other, question in PAIRS]
    found += [dict(paired(rows_by_name, first, second), question=question) for first, second, question in FEATURE_PAIRS]
    found.append(dict(paired(rows_by_name, *COLLAPSE_PAIR), question=COLLAPSE_QUESTION))
    return found + [dict(paired(rows_by_name, first, second), question=question)
                    for first, second, question in DEIT_PAIRS + CNN_PAIRS]


def outcome(comparison: dict) -> str:
    """'too few seeds', 'within the noise', or, beyond it, whether the first row is 'better' or 'worse'."""
    if comparison["exceeds_noise"] is None:
        return "too few seeds"
    if not comparison["exceeds_noise"]:
        return "within the noise"
    return "better" if comparison["mean"] > 0 else "worse"


def projector_collapsed(row: dict) -> Optional[bool]:
    """Whether every finished run of ``row`` ended with a zero projector; None for rows without one."""
    scales = [scale for scale in row["projector_scale"] if scale is not None]
    return max(scales) < COLLAPSED_BELOW if scales else None


def teacher_cache_counts(runs: list) -> dict:
    """Teacher-cache hits and misses summed over the epochs of ``runs`` (rows that run the teacher)."""
    records = [record for run in runs for record in epoch_log(run["output_dir"])]
    return {kind: sum(record.get(f"train_teacher_cache_{kind}", 0) for record in records)
            for kind in ("hits", "misses", "bytes_written")}


def study_wall_seconds() -> float:
    """The students' wall time, summed over the driver's invocations (a study may span several)."""
    if not os.path.isfile(WALL_RECORD):
        return 0.0
    with open(WALL_RECORD) as handle:
        return json.load(handle)["seconds"]


def add_study_wall_seconds(seconds: float) -> None:
    write_json(WALL_RECORD, {"seconds": round(study_wall_seconds() + seconds, 1)})


def study_jobs(rows: list) -> list:
    """Every row's run for every seed, seed by seed, the rows of the newer questions (DeiT's distillation, the CNN
    student, and VkD beside them) first: an interrupted study holds complete pairs for them soonest."""
    newer = {name for first, second, _ in DEIT_PAIRS + CNN_PAIRS for name in (first, second)}
    ordered = [row for row in rows if row["name"] in newer] + [row for row in rows if row["name"] not in newer]
    first = [row_job(row, seed, OUT, threads=THREADS, resumable=True) for seed in SEEDS for row in ordered
             if row["name"] in newer]
    rest = [row_job(row, seed, OUT, threads=THREADS, resumable=True) for seed in SEEDS for row in ordered
            if row["name"] not in newer]
    return first + rest


def build_report(rows: list, teacher: dict) -> dict:
    summaries, all_runs = [], []
    for row in rows:
        runs = finished_runs(row, SEEDS, OUT)
        all_runs += runs
        args = row_arguments(row)
        summaries.append(summarise(row, runs, projector_scale=[projector_scale(row, run) for run in runs],
                                   eval_head=args.eval_head, student_model=args.student_model,
                                   distiller=args.distiller))
    missing = [f"{row['name']} seed {seed}" for row, summary in zip(rows, summaries) for seed in SEEDS
               if seed not in summary["seeds"]]
    settings = rows[0]["settings"]
    cache = teacher_cache_counts(all_runs)
    return {"teacher_acc1": teacher["acc1"], "teacher_curve": teacher["curve"], "teacher_seconds": teacher["seconds"],
            "teacher_command": teacher["command"], "teacher_epochs": len(teacher["curve"]),
            "seeds": list(SEEDS), "rows": summaries,
            "comparisons": comparisons({summary["row"]: summary for summary in summaries}), "missing": missing,
            "budget": {key: settings[key] for key in ("subset", "input_size", "epochs", "batch_size", "lr",
                                                     "student_model", "teacher", "crop_scale_min", "eval_freq")},
            "cnn_student": cnn_student_description(settings["teacher"]),
            "training_images": TRAINING_IMAGES, "test_images": TEST_IMAGES,
            "threads": settings["threads"], "deterministic": settings["deterministic"], "workers": WORKERS,
            "teacher_cache": dict(cache, hit_rate=cache["hits"] / max(cache["hits"] + cache["misses"], 1)),
            "seconds": round(teacher["seconds"] + sum(summary["seconds"] for summary in summaries), 1),
            "students_wall_seconds": study_wall_seconds(),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "hardware": hardware_description()}


def parameter_count(architecture: str) -> int:
    model = models.create_student(architecture, num_classes=len(datasets.FMNIST_CLASSES), img_size=32)
    return sum(parameter.numel() for parameter in model.parameters())


def cnn_student_description(teacher: str) -> dict:
    """The CNN student of rows 10-14 beside the teacher: both parameter counts (10 classes) and why it was chosen."""
    return {"student": CNN_STUDENT, "student_params": parameter_count(CNN_STUDENT), "teacher": teacher,
            "teacher_params": parameter_count(teacher),
            "why": "timm's smallest RegNet: a CNN of another family than the ResNet teacher, with under half its "
                   "parameters, whose 368-wide feature is narrower than the teacher's 512 (VkD's orthonormal-columns "
                   "case), and which learns at 32 px (its stride-32 body ends on a 1x1 map, as the teacher's does)"}


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (rows_axes, pairs_axes) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    rows = [row for row in report["rows"] if row["acc1_per_seed"]]
    positions = range(len(rows))
    rows_axes.bar(positions, [r["acc1_mean"] for r in rows], yerr=[r["acc1_std"] or 0 for r in rows], capsize=4,
                  color=[{VKD: "tab:orange", CNN_VKD: "tab:red"}.get(
                      r["row"], "tab:green" if r["student_model"] == CNN_STUDENT else "tab:blue") for r in rows])
    for position, row in zip(positions, rows):
        rows_axes.scatter([position] * len(row["acc1_per_seed"]), row["acc1_per_seed"], color="black", s=8, zorder=3)
    rows_axes.axhline(report["teacher_acc1"], color="tab:red", linestyle="--", label="teacher")
    rows_axes.set_xticks(list(positions), [r["row"].replace("_", "\n", 1).replace("_", " ") for r in rows], fontsize=6,
                         rotation=90)
    values = [a for r in rows for a in r["acc1_per_seed"]] + [report["teacher_acc1"]]
    rows_axes.set_ylim(min(values) - 2, max(values) + 1)
    rows_axes.set(ylabel="test top-1 (%)", title=f"Fashion-MNIST: DeiT-Ti (blue, VkD orange), {CNN_STUDENT} "
                                                 "(green, VkD red); mean ± std, dots: seeds")
    rows_axes.legend(loc="lower right")
    shown = [c for c in report["comparisons"] if c["differences"]]
    for index, comparison in enumerate(shown):
        pairs_axes.scatter(comparison["differences"], [index] * len(comparison["differences"]), color="black", s=10)
        if comparison["ci95"]:
            pairs_axes.plot(comparison["ci95"], [index, index], color="tab:orange", linewidth=3, alpha=0.6)
    pairs_axes.axvline(0, color="gray", linewidth=1)
    pairs_axes.set_yticks(range(len(shown)),
                          [f"{c['first'].split('_')[0]} - {c['second'].split('_')[0]}" for c in shown])
    pairs_axes.invert_yaxis()
    pairs_axes.set(xlabel="top-1 difference, same seed (points)", title="Paired differences (bar: 95% interval)")
    figure.text(0.01, 0.01, f"{report['date']}, {report['hardware']}, torch {report['torch']}", fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=120)


def _mean_std(row) -> str:
    if row["acc1_mean"] is None:
        return "not run"
    return f"{row['acc1_mean']:.2f}" + (f" ± {row['acc1_std']:.2f}" if row["acc1_std"] is not None else "")


def _signed(value) -> str:
    return "—" if value is None else f"{value:+.2f}"


TABLE_VERDICTS = {"too few seeds": "too few seeds to tell", "within the noise": "within the noise",
                  "better": "exceeds the noise", "worse": "exceeds the noise"}


def conclusion(report: dict) -> list:
    """Plain-language answers to the five questions, each sentence chosen by the numbers."""
    by_pair = {(c["first"], c["second"]): c for c in report["comparisons"]}
    rows = {row["row"]: row for row in report["rows"]}

    def said(comparison, better: str, worse: str, tie: str) -> str:
        if comparison["mean"] is None:
            return "could not be compared"
        return {"too few seeds": "cannot be told from the finished runs", "within the noise": tie,
                "better": better, "worse": worse}[outcome(comparison)]

    def numbers(comparison) -> str:
        if comparison["mean"] is None:
            return "(no seed where both rows finished)"
        if comparison["ci95"] is None:
            return f"({_signed(comparison['mean'])} points)"
        low, high = comparison["ci95"]
        return f"({comparison['mean']:+.2f} points, 95% interval {low:+.2f} to {high:+.2f})"

    def against_vkd(other: str, better: str, worse: str, tie: str) -> str:
        comparison = by_pair[(VKD, other)]
        return f"{said(comparison, better, worse, tie)} {numbers(comparison)}"

    answers = ["**1. VkD (orthogonal projector + LayerNorm, with logit KD) against the alternatives.** Against no "
               "distillation VkD " + against_vkd("row1_no_distillation", "is better", "is worse", "is within the noise")
               + "; against logit KD alone it " + against_vkd(
                   "row2_logit_kd", "is better, so the feature term adds to the KL term",
                   "is worse, so the feature term costs accuracy here",
                   "is within the noise, so at this budget the feature term adds nothing measurable to the KL term")
               + "; against an unconstrained linear projector it " + against_vkd(
                   "row4_linear_layernorm", "is better, as the paper reports", "is worse, the opposite of the paper",
                   "is within the noise, so with logit KD beside it this budget does not separate the projectors")
               + "."]
    projectors = by_pair[(FEATURES_ONLY, LINEAR_FEATURES_ONLY)]
    alone = by_pair[(FEATURES_ONLY, "row1_no_distillation")]
    answers.append(
        "**2. The projector question without logit KD** (gamma 0; these students are evaluated on their cls head, "
        "since their dist head never learns). The orthogonal projector against the linear one "
        + said(projectors, "is better", "is worse", "is within the noise") + f" {numbers(projectors)}; the "
        "orthogonal projector's features alone, against no distillation, "
        + said(alone, "teach: the student is better", "hurt: the student is worse", "make no measurable difference")
        + f" {numbers(alone)}.")
    collapsed_row = rows[COLLAPSE_PAIR[0]]
    scales = [s for s in collapsed_row["projector_scale"] if s is not None]
    scale_text = (f"Row 5's projectors ended with ‖W‖_F/√192 = {', '.join(f'{s:.3g}' for s in scales)} "
                  f"({'collapsed to zero' if projector_collapsed(collapsed_row) else 'not all collapsed'}; "
                  "VkD's stay at 1). " if scales else "")
    collapse = by_pair[COLLAPSE_PAIR]
    collapse_text = (f"Row 5 against logit KD alone could not be compared {numbers(collapse)}. "
                     if collapse["mean"] is None else f"Row 5 against logit KD alone {numbers(collapse)}: "
                     f"{said(collapse, 'they differ beyond the noise, which the collapse claim does not predict', 'they differ beyond the noise, which the collapse claim does not predict', 'equal within the noise, as the collapse claim predicts')}. ")
    answers.append("**3. The collapse.** " + scale_text + collapse_text +
                   "Keeping the projector an isometry (VkD against row 5) " + against_vkd(
                       "row5_original_recipe", "improves the result", "lowers the result",
                       "does not change the result measurably") + ".")
    deit_hard, deit_soft = by_pair[(VKD, DEIT_HARD)], by_pair[(VKD, DEIT_SOFT)]
    answers.append(
        "**4. VkD against DeiT's own distillation** (the paper's Table 1 compares VkD with DeiT⚗, DeiT's hard-label "
        "distillation through the distillation token; here both train the same conv-stem DeiT-Ti at this budget). "
        "VkD " + said(deit_hard, "beats DeiT's hard distillation", "is worse than DeiT's hard distillation",
                      "is within the noise of DeiT's hard distillation") + f" {numbers(deit_hard)}, and "
        + said(deit_soft, "beats its soft distillation", "is worse than its soft distillation",
               "is within the noise of its soft distillation") + f" {numbers(deit_soft)}.")
    cnn_student = report["cnn_student"]

    def cnn_said(first, second, better, worse, tie):
        comparison = by_pair[(first, second)]
        return f"{said(comparison, better, worse, tie)} {numbers(comparison)}"

    answers.append(
        f"**5. A CNN student** ({cnn_student['student']}, {cnn_student['student_params'] / 1e6:.2f} M parameters, "
        f"distilled from the {cnn_student['teacher_params'] / 1e6:.2f} M-parameter {cnn_student['teacher']}). VkD "
        + cnn_said(CNN_VKD, CNN_NONE, "beats no distillation", "is worse than no distillation",
                   "is within the noise of no distillation") + "; against logit KD alone it "
        + cnn_said(CNN_VKD, CNN_KD, "is better, so its feature term adds to the KL term",
                   "is worse, so its feature term costs accuracy here",
                   "is within the noise, so at this budget its feature term adds nothing measurable") + "; against "
        "FitNets it " + cnn_said(CNN_VKD, CNN_FITNET, "is better", "is worse", "is within the noise")
        + ". Without logit KD on either side, the orthogonal projector with LayerNorm against FitNets' linear "
        "projector on raw features " + cnn_said(CNN_VKD_FEATURES, CNN_FITNET, "is better", "is worse",
                                                "is within the noise")
        + "; FitNets' hints against no distillation " + cnn_said(
            CNN_FITNET, CNN_NONE, "teach: the student is better", "hurt: the student is worse",
            "make no measurable difference") + ".")
    # The best of the rows that finished every seed (of all rows while none has): one lucky seed is no row's mean.
    complete = [row for row in rows.values() if len(row["seeds"]) == len(report["seeds"])] or list(rows.values())
    best = max(complete, key=lambda row: row["acc1_mean"] if row["acc1_mean"] is not None else -1)
    if best["acc1_mean"] is not None:
        epochs = report["budget"]["epochs"]
        answers.append(f"**Scope.** After {epochs} epochs on {report['training_images']:,} images the best row "
                       f"({best['title'].split('. ', 1)[-1].rstrip('.')}) reaches {best['acc1_mean']:.2f}% against the teacher's "
                       f"{report['teacher_acc1']:.2f}%: these answers hold for these students at this budget on "
                       "32 px Fashion-MNIST, not for converged students or for ImageNet.")
    return answers


def students_text(rows: list) -> str:
    """Which student each group of rows trains, at which learning rate (``rows`` in order)."""
    groups = []
    for row in rows:
        student, lr = row["student_model"], row["settings"].get("lr")
        number = row["row"].split("_")[0][3:]
        if groups and groups[-1][:2] == (student, lr):
            groups[-1][2].append(number)
        else:
            groups.append((student, lr, [number]))
    return "; ".join(f"{student} students in rows {numbers[0]}-{numbers[-1]} at lr {lr:g}"
                     for student, lr, numbers in groups)


def cnn_text(cnn: dict) -> str:
    return (f"{cnn['student']} ({cnn['student_params']:,} parameters against the teacher {cnn['teacher']}'s "
            f"{cnn['teacher_params']:,}): {cnn['why']}")


def evaluated_epochs(epochs: int, eval_freq: int) -> list:
    """The (1-based) epochs after which ``--eval-freq`` evaluates: every eval_freq-th and the last."""
    return [epoch for epoch in range(1, epochs + 1) if epoch % eval_freq == 0 or epoch == epochs]


def results_page(report: dict) -> str:
    """results/fmnist/README.md, from the report (fmnist.json) alone."""
    budget, rows, threads = report["budget"], report["rows"], report["threads"]
    finished = sum(len(row["seeds"]) for row in rows)
    common = "../../configs/fmnist/common.yaml"
    cache = report["teacher_cache"]
    curve = report["teacher_curve"]
    lines = [
        "# Fashion-MNIST: the projector, with and without logit KD, the collapse, DeiT's distillation and a CNN "
        "student", "",
        f"Made by `make fmnist` (`.venv/bin/python -m experiments.fmnist`) on {report['date']}: {report['hardware']}, "
        f"torch {report['torch']}, {threads} thread{'s' if threads > 1 else ''} per run and deterministic kernels, "
        f"{report['workers']} runs side by side under `nice -n 19`. The student runs took "
        f"{report['students_wall_seconds'] / 3600:.1f} h of wall time ({sum(row['seconds'] for row in rows) / 3600:.1f} "
        f"run-hours), the teacher {report['teacher_seconds'] / 60:.0f} min. Every number below comes from "
        "[`fmnist.json`](fmnist.json).", "",
        f"**Budget, fixed before any student ran** ([`configs/fmnist/`]({common}), where the head of "
        "`common.yaml` gives the throughput it was sized on): a class-balanced training subset of "
        f"{report['training_images']:,} of the 60,000 training images (`{budget['subset']}`, drawn once with seed 0, "
        f"the same for every run), the full {report['test_images']:,}-image test set, input {budget['input_size']} px "
        f"(the 28 px gray images copied to 3 channels and resized), {students_text(rows)}, each for "
        f"{budget['epochs']} epochs at batch {budget['batch_size']}, random-resized crops keeping "
        f"at least {budget['crop_scale_min']:.0%} of the image, no mixup, evaluated after epochs "
        f"{' and '.join(map(str, evaluated_epochs(budget['epochs'], budget['eval_freq'])))}; teacher {budget['teacher']} trained on the same subset for "
        f"{report['teacher_epochs']} epochs ({report['teacher_acc1']:.2f}% test top-1; after each epoch: "
        f"{', '.join(f'{a:.1f}' for a in curve)}), `{report['teacher_command']}`. Seeds "
        f"{', '.join(map(str, report['seeds']))}: a seed fixes the initialisation and the data order, the same for "
        "every row (the data pipeline draws from its own generator), so rows are compared seed by seed. The rows of "
        "a seed shared one teacher-output cache: "
        f"{cache['hits']:,} of {cache['hits'] + cache['misses']:,} teacher batches were read back "
        f"({100 * cache['hit_rate']:.1f}%), which gives the numbers of computing them.", "",
        f"{finished} of {len(rows) * len(report['seeds'])} student runs finished"
        + (f"; missing: {', '.join(report['missing'])}." if report["missing"] else "."), "",
        f"The CNN student: {cnn_text(report['cnn_student'])}.", "",
        "| row | top-1 mean ± std | per seed | evaluated on | ‖W‖_F/√width | config |", "|---|---|---|---|---|---|",
    ]
    for row in rows:
        scales = [s for s in row["projector_scale"] if s is not None]
        scale_text = ", ".join(f"{s:.3g}" for s in scales) if scales else "—"
        per_seed = ", ".join(f"{a:.2f}" for a in row["acc1_per_seed"]) or "—"
        head = ("its one head" if row["student_model"] == CNN_STUDENT else
                "cls head" if row["eval_head"] == "cls" else "mean of both heads")
        lines.append(f"| {row['title']} | {_mean_std(row)} | {per_seed} | {head} | {scale_text} | "
                     f"[`{os.path.basename(row['config'])}`](../../{row['config']}) |")
    means = [row["acc1_mean"] for row in rows if row["acc1_mean"] is not None]
    noise = binomial_standard_error(statistics.mean(means), TEST_IMAGES) if means else float("nan")
    lines += [
        "", "![Fashion-MNIST](fmnist.png)", "",
        "**Paired comparisons** (first row minus second, per seed; a difference exceeds the noise when its "
        "95% t interval across seeds excludes zero, a rule fixed before the runs). For scale: one accuracy on "
        f"{TEST_IMAGES:,} test images has a binomial standard error of about {noise:.2f} points.", "",
        "| comparison | question | per seed | mean ± sd | 95% interval | verdict |", "|---|---|---|---|---|---|",
    ]
    for comparison in report["comparisons"]:
        per_seed = ", ".join(f"{d:+.2f}" for d in comparison["differences"]) or "—"
        spread = "—" if comparison["mean"] is None else (
            f"{comparison['mean']:+.2f}" + (f" ± {comparison['sd']:.2f}" if comparison["sd"] is not None else ""))
        interval = "—" if comparison["ci95"] is None else f"{comparison['ci95'][0]:+.2f} to {comparison['ci95'][1]:+.2f}"
        lines.append(f"| {comparison['first'].split('_')[0]} − {comparison['second'].split('_')[0]} | "
                     f"{comparison['question']} | {per_seed} | {spread} | {interval} | "
                     f"{TABLE_VERDICTS[outcome(comparison)]} |")
    lines += ["", "**What the numbers say.**", ""] + [answer + "\n" for answer in conclusion(report)]
    first = rows[0]
    lines += ["Commands: `make fmnist` runs everything (finished runs are reused, an interrupted one continues, "
              "`FORCE=1` reruns); one run is "
              f"`.venv/bin/python main_distributed.py --config {first['config']} --seed 0 --output_dir "
              f"{os.path.join(OUT, first['row'], 'seed0')} --resume auto` "
              "(the other rows and seeds change only the config and `--seed`; every command is in `fmnist.json`, "
              "and the configs fix the thread count and deterministic kernels, so a command gives its number again "
              "on the same CPU type). `.venv/bin/python -m experiments.fmnist --report-only` rewrites this page "
              "from the finished runs.", ""]
    return "\n".join(lines)


@entry_point
def main(argv=None) -> None:
    parser = driver_parser(__doc__)
    parser.add_argument("--report-only", action="store_true", help="write the results from the finished runs only")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    require_writable_results(RESULTS)
    torch.set_num_threads(THREADS)  # the projector measurements here, like the runs
    force = force_requested() and not args.report_only
    rows = row_configs(CONFIGS)
    if args.report_only and not TEACHER.finished():
        raise BadInput(f"no finished teacher in {TEACHER.output_dir}: run `make fmnist` first")
    if not args.report_only:
        run_jobs([TEACHER], force)
        if force and os.path.exists(WALL_RECORD):
            os.remove(WALL_RECORD)
        started = time.time()
        try:
            run_jobs(study_jobs(rows), force, workers=WORKERS,
                     describe=lambda job: f"top-1 {epoch_log(job.output_dir)[-1]['val_acc1']:.2f}")
        finally:
            add_study_wall_seconds(time.time() - started)
    record = TEACHER.done_record()
    curve = [epoch["val_acc1"] for epoch in epoch_log(TEACHER.output_dir) if "val_acc1" in epoch]
    teacher = {"acc1": curve[-1], "curve": curve, "seconds": record["seconds"], "command": record["command"]}
    write_report(RESULTS, "fmnist.json", build_report(rows, teacher), results_page, plot)
    print(f"wrote {RESULTS}/fmnist.json, fmnist.png and README.md")


if __name__ == "__main__":
    main()
