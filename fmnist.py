"""`make fmnist`: does VkD's projector beat the alternatives, and does the original's collapse matter?

Trains the resnet10t teacher of ``configs/fmnist/teacher.yaml`` on a class-balanced training subset of
Fashion-MNIST, then every row of ``configs/fmnist/`` for three seeds with identical budgets, seed by seed
(all rows of seed 0 first), so that an interrupted run still holds complete pairs. Finished runs are
reused (``FORCE=1`` reruns them); each finished run prints an ETA. Writes ``results/fmnist.json``,
``results/fmnist.png`` and the Fashion-MNIST section of ``results/README.md``: the table, paired
per-seed comparisons of VkD with the other rows, and a conclusion that follows from those numbers.
``--report-only`` writes them from the runs finished so far, without training.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

import ablation
import demo
import models
from utils import load_student_checkpoint
from vkd.runs import cpu_model

ROOT = ablation.ROOT
CONFIGS = os.path.join("configs", "fmnist")
OUT = os.path.join("runs", "fmnist")
RESULTS = ablation.RESULTS
SECTION = "fmnist"
SEEDS = (0, 1, 2)
TEST_IMAGES = 10000
# Every run computes with one thread (and the driver runs under `nice -n 19` when started by make). On
# cores shared with other jobs, two OpenMP threads spent ten times the CPU per image of one (measured:
# 76 vs 7.8 CPU-ms per DeiT-Ti training image at load average 19), waiting for each other.
THREADS = 1
VKD = "row5_vkd"
# (row compared with VKD, what the comparison asks); 3 vs 2 asks whether the collapsed projector taught anything.
PAIRS = (("row1_no_distillation", "does VkD beat training without distillation?"),
         ("row2_logit_kd", "does the feature term add to logit KD?"),
         ("row3_original_recipe", "does keeping the projector an isometry (no weight decay) change the result?"),
         ("row4_linear_layernorm", "does the orthogonal constraint beat an unconstrained linear projector?"))
COLLAPSE_PAIR = ("row3_original_recipe", "row2_logit_kd")
# Two-sided 95% quantiles of Student's t, by degrees of freedom (pairs - 1).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_teacher(force: bool) -> dict:
    output_dir = os.path.join(OUT, "teacher")
    command = [sys.executable, "main_distributed.py", "--config", os.path.join(CONFIGS, "teacher.yaml"),
               "--output_dir", output_dir]
    reuse = not force and os.path.isfile(os.path.join(output_dir, "wall_seconds.txt"))
    print(("reusing the teacher in " + output_dir) if reuse else "training the teacher: " +
          ablation.shell_command(command), flush=True)
    epochs, seconds = demo.timed_run(command, output_dir, reuse, quiet=True)
    return {"acc1": epochs[-1]["val_acc1"], "seconds": seconds, "command": ablation.shell_command(command)}


def finished_run(row, seed: int):
    """The run of ``row`` and ``seed`` if it finished (a reused run), else None."""
    output_dir = os.path.join(OUT, row["name"], f"seed{seed}")
    if not os.path.isfile(os.path.join(output_dir, "wall_seconds.txt")):
        return None
    return ablation.train(row, seed, force=False, out=OUT)


@torch.no_grad()
def projector_scale(row, run):
    """||W||_F / sqrt(student width) of the trained projector: 1 for an isometry, 0 after the collapse."""
    settings = row["settings"]
    if settings["alpha"] == 0:
        return None
    teacher_dim = models.create_teacher(settings["teacher"], num_classes=10,
                                        teacher_path=settings["teacher_path"]).num_features
    student = models.create_student(settings["student_model"], num_classes=10, img_size=settings["input_size"],
                                    teacher_dim=teacher_dim, projector=settings["projector"])
    load_student_checkpoint(student, os.path.join(run["output_dir"], "latest.pth.tar"))
    return (student.projector.weight.norm() / math.sqrt(student.embed_dim)).item()


def paired(report_rows: dict, first: str, second: str) -> dict:
    """Per-seed differences first - second over seeds both rows finished, their mean, sd and 95% interval.

    Same seed = same initialisation and data order, so the difference removes what the two runs share.
    A difference exceeds the noise when its 95% t interval excludes zero.
    """
    a, b = report_rows[first], report_rows[second]
    seeds = [seed for seed in a["seeds"] if seed in b["seeds"]]
    differences = [a["acc1_per_seed"][a["seeds"].index(s)] - b["acc1_per_seed"][b["seeds"].index(s)] for s in seeds]
    result = {"first": first, "second": second, "seeds": seeds, "differences": differences,
              "mean": statistics.mean(differences) if differences else None, "sd": None, "ci95": None,
              "exceeds_noise": None}
    if len(differences) > 1:
        result["sd"] = statistics.stdev(differences)
        half = T_95[len(differences) - 1] * result["sd"] / math.sqrt(len(differences))
        result["ci95"] = [result["mean"] - half, result["mean"] + half]
        result["exceeds_noise"] = not result["ci95"][0] <= 0 <= result["ci95"][1]
    return result


def test_set_noise(accuracy: float) -> float:
    """Binomial standard error, in points, of one top-1 accuracy measured on the 10,000 test images."""
    p = accuracy / 100
    return 100 * math.sqrt(p * (1 - p) / TEST_IMAGES)


def hardware() -> str:
    return f"{len(os.sched_getaffinity(0))} cores of {cpu_model()}, no GPU"


def build_report(rows, teacher: dict) -> dict:
    summaries = []
    for row in rows:
        runs = [run for run in (finished_run(row, seed) for seed in SEEDS) if run is not None]
        summaries.append(ablation.summarise(row, runs, projector_scale=[projector_scale(row, run) for run in runs]))
    by_name = {summary["row"]: summary for summary in summaries}
    comparisons = [dict(paired(by_name, VKD, other), question=question) for other, question in PAIRS]
    comparisons.append(dict(paired(by_name, *COLLAPSE_PAIR),
                            question="did the collapsed projector's feature term teach anything beyond logit KD?"))
    missing = [f"{row['name']} seed {seed}" for row, summary in zip(rows, summaries) for seed in SEEDS
               if seed not in summary["seeds"]]
    settings = rows[0]["settings"]
    return {"teacher_acc1": teacher["acc1"], "teacher_seconds": teacher["seconds"], "teacher_command": teacher["command"],
            "seeds": list(SEEDS), "rows": summaries, "comparisons": comparisons, "missing": missing,
            "budget": {key: settings[key] for key in ("subset", "input_size", "epochs", "batch_size", "lr",
                                                     "student_model", "teacher", "crop_scale_min", "eval_crop_ratio")},
            "threads": THREADS,
            "seconds": round(teacher["seconds"] + sum(summary["seconds"] for summary in summaries), 1), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "hardware": hardware()}


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (rows_axes, pairs_axes) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    rows = [row for row in report["rows"] if row["acc1_per_seed"]]
    positions = range(len(rows))
    rows_axes.bar(positions, [r["acc1_mean"] for r in rows], yerr=[r["acc1_std"] or 0 for r in rows], capsize=4,
                  color=["tab:orange" if r["row"] == VKD else "tab:blue" for r in rows])
    for position, row in zip(positions, rows):
        rows_axes.scatter([position] * len(row["acc1_per_seed"]), row["acc1_per_seed"], color="black", s=8, zorder=3)
    rows_axes.axhline(report["teacher_acc1"], color="tab:red", linestyle="--", label="teacher")
    rows_axes.set_xticks(list(positions), [r["row"].split("_", 1)[1].replace("_", "\n") for r in rows], fontsize=8)
    values = [a for r in rows for a in r["acc1_per_seed"]] + [report["teacher_acc1"]]
    rows_axes.set_ylim(min(values) - 2, max(values) + 1)
    rows_axes.set(ylabel="test top-1 (%)", title="Fashion-MNIST, DeiT-Ti: mean ± std (dots: seeds)")
    rows_axes.legend(loc="lower right")
    comparisons = [c for c in report["comparisons"] if c["differences"]]
    for index, comparison in enumerate(comparisons):
        pairs_axes.scatter(comparison["differences"], [index] * len(comparison["differences"]), color="black", s=10)
        if comparison["ci95"]:
            pairs_axes.plot(comparison["ci95"], [index, index], color="tab:orange", linewidth=3, alpha=0.6)
    pairs_axes.axvline(0, color="gray", linewidth=1)
    pairs_axes.set_yticks(range(len(comparisons)),
                          [f"{c['first'].split('_')[0]} - {c['second'].split('_')[0]}" for c in comparisons])
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


def _verdict(comparison) -> str:
    if comparison["exceeds_noise"] is None:
        return "too few seeds to tell"
    return "exceeds the noise" if comparison["exceeds_noise"] else "within the noise"


def conclusion(report: dict) -> list:
    """Plain-language answers to the two questions, each sentence chosen by the numbers."""
    comparisons = {c["second"]: c for c in report["comparisons"] if c["first"] == VKD}
    collapse = next(c for c in report["comparisons"] if c["first"] == COLLAPSE_PAIR[0])
    rows = {row["row"]: row for row in report["rows"]}

    def said(comparison, better: str, worse: str, tie: str) -> str:
        if comparison["exceeds_noise"] is None:
            return "cannot be told from the finished runs"
        if not comparison["exceeds_noise"]:
            return tie
        return better if comparison["mean"] > 0 else worse

    def numbers(comparison) -> str:
        if comparison["ci95"] is None:
            return f"({_signed(comparison['mean'])} points)"
        low, high = comparison["ci95"]
        return f"({comparison['mean']:+.2f} points, 95% interval {low:+.2f} to {high:+.2f})"

    answers = ["**1. Orthogonal projector + LayerNorm against the alternatives.** "
               f"Against no distillation, VkD {said(comparisons['row1_no_distillation'], 'is better', 'is worse', 'is within the noise')} "
               f"{numbers(comparisons['row1_no_distillation'])}; against logit KD alone it "
               f"{said(comparisons['row2_logit_kd'], 'is better, so the feature term adds to the KL term', 'is worse, so the feature term costs accuracy here', 'is within the noise, so at this budget the feature term adds nothing measurable to the KL term')} "
               f"{numbers(comparisons['row2_logit_kd'])}; against an unconstrained linear projector it "
               f"{said(comparisons['row4_linear_layernorm'], 'is better, as the paper reports', 'is worse, the opposite of the paper', 'is within the noise, so this budget does not confirm the paper on this point')} "
               f"{numbers(comparisons['row4_linear_layernorm'])}."]
    scales = [s for s in rows[COLLAPSE_PAIR[0]]["projector_scale"] if s is not None]
    scale_text = (f"Row 3's projectors ended with ‖W‖_F/√192 = {', '.join(f'{s:.3f}' for s in scales)} "
                  f"({'collapsed to zero' if scales and max(scales) < 1e-6 else 'not all collapsed'}; "
                  "VkD's stay at 1). " if scales else "")
    answers.append("**2. The collapse.** " + scale_text +
                   f"Row 3 against logit KD alone {numbers(collapse)}: "
                   f"{said(collapse, 'they differ beyond the noise, which the collapse claim does not predict', 'they differ beyond the noise, which the collapse claim does not predict', 'nearly identical within the noise, as the collapse claim predicts')}. "
                   f"Keeping the projector an isometry (VkD against row 3) "
                   f"{said(comparisons['row3_original_recipe'], 'improves the result', 'lowers the result', 'does not change the result measurably')} "
                   f"{numbers(comparisons['row3_original_recipe'])}.")
    best = max(rows.values(), key=lambda row: row["acc1_mean"] if row["acc1_mean"] is not None else -1)
    if best["acc1_mean"] is not None:
        epochs = report["budget"]["epochs"]
        answers.append(f"**Scope.** After {epochs} epoch{'s' if epochs > 1 else ''} the best row reaches "
                       f"{best['acc1_mean']:.2f}% against the teacher's {report['teacher_acc1']:.2f}%: these answers "
                       "describe early training at this budget, not converged students.")
    return answers


def section(report: dict) -> str:
    budget = report["budget"]
    rows = report["rows"]
    finished = sum(len(row["seeds"]) for row in rows)
    lines = [
        "## Fashion-MNIST: the projector and the collapse, at a resolvable scale", "",
        f"Made by `make fmnist` (`.venv/bin/python fmnist.py`) on {report['date']}: {report['hardware']}, torch "
        f"{report['torch']}, {THREADS} thread{'s' if THREADS > 1 else ''} per run, `nice -n 19` beside other jobs; "
        f"{sum(row['seconds'] for row in rows) / 60:.0f} min of student runs and {report['teacher_seconds'] / 60:.0f} min "
        f"for the teacher. Every number below comes from `results/fmnist.json`.", "",
        f"**Budget, fixed before the runs** ([`configs/fmnist/`](../configs/fmnist/common.yaml)): training subset "
        f"`{budget['subset']}` of the 60,000 training images (class-balanced, drawn once with seed 0 and the same for "
        f"every run), the full 10,000-image test set, input {budget['input_size']} px (the 28 px gray images copied "
        f"to 3 channels, bicubic resize), {budget['student_model']} students for {budget['epochs']} epoch{'s' if budget['epochs'] > 1 else ''} at batch "
        f"{budget['batch_size']}, lr {budget['lr']:g}, random-resized crops keeping at least "
        f"{budget['crop_scale_min']:.0%} of the image, no mixup; teacher {budget['teacher']} trained on the same "
        f"subset ({report['teacher_acc1']:.2f}% test top-1, `{report['teacher_command']}`). Seeds "
        f"{', '.join(map(str, report['seeds']))}; a seed fixes the initialisation and the data order, the same "
        "for every row, so rows are compared seed by seed. The budget was sized to the time left on shared "
        "CPU cores (the reasoning and the throughput measured beforehand are in the head of "
        "[`common.yaml`](../configs/fmnist/common.yaml)); fewer epochs were preferred to fewer seeds or rows. "
        "No GPU was lent to this work, so the full-60k run was not made.", "",
        f"{finished} of {len(rows) * len(report['seeds'])} student runs finished"
        + (f"; missing: {', '.join(report['missing'])}." if report["missing"] else "."), "",
        "| row | top-1 mean ± std | per seed | ‖W‖_F/√192 | config |", "|---|---|---|---|---|",
    ]
    for row in rows:
        scales = [s for s in row["projector_scale"] if s is not None]
        scale_text = ", ".join(f"{s:.3f}" for s in scales) if scales else "—"
        per_seed = ", ".join(f"{a:.2f}" for a in row["acc1_per_seed"]) or "—"
        lines.append(f"| {row['title']} | {_mean_std(row)} | {per_seed} | {scale_text} | "
                     f"[`{os.path.basename(row['config'])}`](../{row['config']}) |")
    means = [row["acc1_mean"] for row in rows if row["acc1_mean"] is not None]
    noise = test_set_noise(statistics.mean(means)) if means else float("nan")
    lines += [
        "", "![Fashion-MNIST](fmnist.png)", "",
        "**Paired comparisons** (first row minus second, per seed; a difference exceeds the noise when its "
        "95% t interval across seeds excludes zero, a rule fixed before the runs). For scale: one accuracy on "
        f"10,000 test images has a binomial standard error of about {noise:.2f} points.", "",
        "| comparison | question | per seed | mean ± sd | 95% interval | verdict |", "|---|---|---|---|---|---|",
    ]
    for comparison in report["comparisons"]:
        per_seed = ", ".join(f"{d:+.2f}" for d in comparison["differences"]) or "—"
        spread = "—" if comparison["mean"] is None else (
            f"{comparison['mean']:+.2f}" + (f" ± {comparison['sd']:.2f}" if comparison["sd"] is not None else ""))
        interval = "—" if comparison["ci95"] is None else f"{comparison['ci95'][0]:+.2f} to {comparison['ci95'][1]:+.2f}"
        lines.append(f"| {comparison['first'].split('_')[0]} − {comparison['second'].split('_')[0]} | "
                     f"{comparison['question']} | {per_seed} | {spread} | {interval} | {_verdict(comparison)} |")
    lines += ["", "**What the numbers say.**", ""] + [answer + "\n" for answer in conclusion(report)]
    lines += ["Commands: `make fmnist` runs everything (finished runs are reused, `FORCE=1` reruns); one run is "
              f"`.venv/bin/python main_distributed.py --config {rows[0]['config']} --seed 0 --output_dir "
              f"{os.path.join(OUT, rows[0]['row'], 'seed0')}` "
              "(the other rows and seeds change only the config and `--seed`; all are in `results/fmnist.json`). "
              "`.venv/bin/python fmnist.py --report-only` rewrites this section from the finished runs."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="write the results from the finished runs only")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
    force = os.environ.get("FORCE", "") not in ("", "0") and not args.report_only
    started = time.time()
    rows = ablation.row_configs(CONFIGS)
    if args.report_only:
        if not os.path.isfile(os.path.join(OUT, "teacher", "wall_seconds.txt")):
            print(f"no finished teacher in {os.path.join(OUT, 'teacher')}: run `make fmnist` first", file=sys.stderr)
            sys.exit(2)
        teacher = run_teacher(force=False)
    else:
        teacher = run_teacher(force)
        total, done, seconds = len(rows) * len(SEEDS), 0, []
        for seed in SEEDS:
            for row in rows:
                run = ablation.train(row, seed, force, out=OUT)
                done += 1
                seconds.append(run["seconds"])
                # Reused runs keep their measured wall time, so the ETA is right after a restart too.
                eta = statistics.mean(seconds) * (total - done) / 60
                took = "reused" if run["reused"] else f"{run['seconds']:.0f} s"
                print(f"[{done}/{total}] {row['name']} seed {seed}: top-1 {run['acc1']:.2f} ({took})  "
                      f"elapsed {(time.time() - started) / 60:.1f} min, eta {eta:.1f} min", flush=True)
    report = build_report(rows, teacher)
    ablation.write_results(RESULTS, "fmnist", report, plot,
                           lambda page: ablation.replace_section(page, SECTION, section(report)))
    print(f"wrote {RESULTS}/fmnist.json, {RESULTS}/fmnist.png and the Fashion-MNIST section of {RESULTS}/README.md")


if __name__ == "__main__":
    main()
