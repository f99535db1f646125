"""`make ablation` (``python -m experiments.ablation``): the paper's two claims tested by this repository's
own code, at digits scale.

Runs every row of ``configs/ablation/`` (projector and normalisation ablations) for three seeds with
identical budgets through ``main_distributed.py --config``, measures how well each trained projector
preserves the student's own pairwise similarities (linear CKA between the pooled student feature and its
projection, on the validation set), and writes ``results/ablation/``: ``ablation.json``, ``ablation.png``
and ``README.md``, the page written from the JSON. Finished runs are reused (``FORCE=1`` reruns).
"""
import os
import statistics
import time

import torch

import datasets
from experiments import paper
from experiments.rows import finished_runs, row_configs, row_job, summarise, trained_student
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
from vkd.cli import entry_point

CONFIGS = os.path.join("configs", "ablation")
OUT = os.path.join("runs", "ablation")
RESULTS = os.path.join("results", "ablation")
SEEDS = (0, 1, 2)
# The rows distil from the demo's teacher (teacher_path in configs/ablation/common.yaml); when `make demo`
# has not trained it yet, it is trained here as the demo trains it.
DEMO_TEACHER = Job("teacher", os.path.join("runs", "demo", "teacher"),
                   config=os.path.join("configs", "demo", "teacher.yaml"), threads=2)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of row features: 1 means the same geometry."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (x.T @ y).pow(2).sum()
    return (cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt())).item()


@torch.no_grad()
def similarity_preservation(row: dict, run: dict) -> float:
    """Linear CKA between the student's pooled feature and its projection over the validation set."""
    settings = row["settings"]
    data_args = datasets.default_data_args(data_set=settings["data_set"], data_path=settings["data_path"],
                                           input_size=settings["input_size"])
    dataset, num_classes = datasets.build_dataset(False, data_args)
    student = trained_student(row, run["output_dir"], num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, collate_fn=datasets.collate_skipping_unreadable)
    pooled, projected = [], []
    for samples, _, _ in loader:
        patch_tokens = student.forward_features(samples)[2]
        pooled.append(patch_tokens.mean(1))
        projected.append(student.project(patch_tokens))
    return linear_cka(torch.cat(pooled), torch.cat(projected))


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    figure, axes = plt.subplots(figsize=(10, 4))
    positions = range(len(rows))
    axes.bar(positions, [r["acc1_mean"] for r in rows], yerr=[r["acc1_std"] for r in rows], capsize=4,
             color=["tab:gray" if r["cka_student_vs_projected"] is None else "tab:blue" for r in rows])
    for position, row in zip(positions, rows):
        axes.scatter([position] * len(row["acc1_per_seed"]), row["acc1_per_seed"], color="black", s=8, zorder=3)
    axes.axhline(report["teacher_acc1"], color="tab:red", linestyle="--", label="teacher")
    axes.set_xticks(list(positions), [r["row"].split("_", 1)[1].replace("_", "\n") for r in rows], fontsize=8)
    low = min(min(r["acc1_per_seed"]) for r in rows)
    axes.set_ylim(max(0, low - 5), 100)
    axes.set(ylabel="validation top-1 (%)", title="Digits ablation: mean ± std over seeds (dots: seeds)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def results_page(report: dict) -> str:
    """results/ablation/README.md, from the report (ablation.json) alone."""
    lines = [
        "# Reproduction at digits scale: projector and normalisation ablations", "",
        f"Made by `make ablation` (`python -m experiments.ablation`) on {report['date']} (torch {report['torch']}, "
        f"{report['seconds'] / 60:.0f} min on {report['hardware']}). DeiT-Ti students, 32 px digits from "
        f"scikit-learn (1,437 train / 360 val images), {len(report['seeds'])} seeds per row, identical "
        f"budgets; teacher resnet10t at {report['teacher_acc1']:.2f}% top-1. Every number below comes from "
        f"[`ablation.json`](ablation.json).", "",
        "| row | top-1 mean ± std | per seed | CKA(student, projected) | config |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        cka = row["cka_student_vs_projected"]
        cka_text = "—" if cka is None else f"{statistics.mean(cka):.4f} ± {statistics.stdev(cka):.4f}"
        seeds = ", ".join(f"{a:.2f}" for a in row["acc1_per_seed"])
        lines.append(f"| {row['title']} | {row['acc1_mean']:.2f} ± {row['acc1_std']:.2f} | {seeds} | "
                     f"{cka_text} | [`{os.path.basename(row['config'])}`](../../{row['config']}) |")
    lines += [
        "", "![ablation](ablation.png)", "",
        "CKA is linear CKA between the student's pooled patch feature and the projector's output on the "
        "validation set: 1 means the projection kept the student's pairwise similarities exactly (the paper's "
        "argument for an isometry).", "",
        "## The paper's published numbers, for comparison of direction only", "",
        "These come from full-scale runs (ImageNet-1k, 300 epochs, RegNetY-160 teacher; COCO, 50 epochs, "
        "ViDT-base teacher) and were **not** re-run here; the table above is digits at 32 px, 15 epochs.", "",
        *paper.imagenet_table(), "", *paper.coco_table(), "", paper.generation_sentence(), "",
    ]
    return "\n".join(lines)


@entry_point
def main(argv=None) -> None:
    driver_parser(__doc__).parse_args(argv)
    os.chdir(ROOT)
    require_writable_results(RESULTS)
    force = force_requested()
    started = time.time()
    datasets.export_digits(datasets.DEFAULT_DIGITS_ROOT)
    run_jobs([DEMO_TEACHER], force=False)  # FORCE reruns the rows, not the demo's teacher
    rows = row_configs(CONFIGS)
    run_jobs([row_job(row, seed, OUT) for row in rows for seed in SEEDS], force,
             describe=lambda job: f"top-1 {epoch_log(job.output_dir)[-1]['val_acc1']:.2f}")
    summaries = []
    for row in rows:
        runs = finished_runs(row, SEEDS, OUT)
        with_projector = row["settings"]["alpha"] > 0
        cka = [similarity_preservation(row, run) for run in runs] if with_projector else None
        summaries.append(summarise(row, runs, cka_student_vs_projected=cka))
    report = {"teacher_acc1": epoch_log(DEMO_TEACHER.output_dir)[-1]["val_acc1"], "seeds": list(SEEDS),
              "rows": summaries, "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "hardware": hardware_description()}
    write_report(RESULTS, "ablation.json", report, results_page, plot)
    print(f"wrote {RESULTS}/ablation.json, ablation.png and README.md in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
