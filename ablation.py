"""`make ablation`: the paper's two claims tested by this repository's own code, at digits scale.

Runs every row of ``configs/ablation/`` (projector and normalisation ablations) for three seeds with
identical budgets through ``main_distributed.py --config``, measures how well each trained projector
preserves the student's own pairwise similarities (linear CKA between the pooled student feature
and its projection, on the validation set), and writes ``results/ablation.json``,
``results/ablation.png`` and ``results/README.md``. Finished runs are reused (``FORCE=1`` reruns).
"""
import glob
import json
import os
import shlex
import statistics
import sys
import time

import torch
import yaml

import datasets
import demo
import models
from utils import load_student_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join("configs", "ablation")
OUT = os.path.join("runs", "ablation")
RESULTS = "results"
SEEDS = (0, 1, 2)


def row_configs(configs: str = CONFIGS):
    """Each row's name, file and resolved settings (its file over ``base``) in the folder ``configs``."""
    rows = []
    for path in sorted(glob.glob(os.path.join(configs, "row*.yaml"))):
        with open(path) as handle:
            text = handle.read()
        settings = yaml.safe_load(text)
        with open(os.path.join(configs, settings.pop("base"))) as handle:
            resolved = {**yaml.safe_load(handle), **settings}
        rows.append({"name": os.path.basename(path)[:-5], "path": path,
                     "title": text.splitlines()[0].lstrip("# "), "settings": resolved})
    return rows


def train(row, seed: int, force: bool, out: str = OUT) -> dict:
    output_dir = os.path.join(out, row["name"], f"seed{seed}")
    command = [sys.executable, "main_distributed.py", "--config", row["path"], "--seed", str(seed),
               "--output_dir", output_dir]
    reuse = not force and os.path.isfile(os.path.join(output_dir, "wall_seconds.txt"))
    epochs, seconds = demo.timed_run(command, output_dir, reuse, quiet=True)
    return {"seed": seed, "acc1": epochs[-1]["val_acc1"], "seconds": seconds, "command": shell_command(command),
            "output_dir": output_dir, "reused": reuse}


def shell_command(command) -> str:
    """``command`` as a shell line to run from the repository root, naming the interpreter as a reader has
    it (``make`` sets up ``.venv``), not by this run's absolute path."""
    interpreter = os.path.join(".venv", "bin", "python") if os.path.basename(sys.prefix) == ".venv" else "python"
    return shlex.join([interpreter, *command[1:]])


def section_markers(name: str):
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def replace_section(page: str, name: str, text: str) -> str:
    """``page`` with its section ``name`` (between the section's markers) set to ``text``; appended if absent.

    Other drivers (``fmnist.py``) keep their part of ``results/README.md`` this way."""
    begin, end = section_markers(name)
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in page and end in page:
        return page[:page.index(begin)] + block + page[page.index(end) + len(end):].lstrip("\n")
    return page.rstrip("\n") + "\n\n" + block


def marked_sections(page: str) -> str:
    """Everything from the first section marker on (the parts other drivers own), or ''."""
    begin = section_markers("")[0].split(" -->")[0]
    return page[page.index(begin):] if begin in page else ""


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of row features: 1 means the same geometry."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (x.T @ y).pow(2).sum()
    return (cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt())).item()


@torch.no_grad()
def similarity_preservation(row, run) -> float:
    """Linear CKA between the student's pooled feature and its projection over the validation set."""
    settings = row["settings"]
    data_args = datasets.default_data_args(data_set=settings["data_set"], data_path=settings["data_path"],
                                           input_size=settings["input_size"])
    dataset, nb_classes = datasets.build_dataset(False, data_args)
    teacher_dim = models.create_teacher(settings["teacher"], num_classes=nb_classes,
                                        teacher_path=settings["teacher_path"]).num_features
    student = models.create_student(settings["student_model"], num_classes=nb_classes,
                                    img_size=settings["input_size"], teacher_dim=teacher_dim,
                                    projector=settings["projector"])
    load_student_checkpoint(student, os.path.join(run["output_dir"], "latest.pth.tar"))
    student.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, collate_fn=datasets.collate_skipping_unreadable)
    pooled, projected = [], []
    for samples, _, _ in loader:
        patch_tokens = student.forward_features(samples)[2]
        pooled.append(patch_tokens.mean(1))
        projected.append(student.project(patch_tokens))
    return linear_cka(torch.cat(pooled), torch.cat(projected))


def summarise(row, runs, **measures) -> dict:
    """A row's accuracy over its finished runs (std needs two), their timings and commands, and ``measures``."""
    accuracies = [run["acc1"] for run in runs]
    return {"row": row["name"], "title": row["title"], "config": row["path"], "settings": row["settings"],
            "acc1_mean": statistics.mean(accuracies) if accuracies else None,
            "acc1_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "seeds": [run["seed"] for run in runs], "acc1_per_seed": accuracies,
            "seconds_per_run": [run["seconds"] for run in runs],
            "seconds": sum(run["seconds"] for run in runs), "commands": [run["command"] for run in runs],
            **measures}


PAPER_NUMBERS = """\
## The paper's published numbers, for comparison of direction only

These come from full-scale runs (ImageNet-1k, 300 epochs, RegNetY-160 teacher; COCO, 50 epochs,
ViDT-base teacher) and were **not** re-run here; the table above is digits at 32 px, 15 epochs.

| ImageNet-1k val (top-1 / top-5) | paper | single-GPU re-run (authors) | params |
|---|---|---|---|
| VkD DeiT-Ti | 78.3 / 94.1 | 79.2 / 94.6 | 6M |
| VkD DeiT-S | 82.3 / 96.0 | 82.9 / 96.2 | 22M |
| DeiT-Ti / DeiT-Ti distilled (top-1) | 72.2 / 74.5 | | |
| DeiT-S / DeiT-S distilled (top-1) | 79.8 / 81.2 | | |
| RegNetY-160 teacher (top-1) | 82.6 | | |

| COCO val2017, ViDT 50 epochs | AP | AP50 | AP75 | APs | APm | APl | params |
|---|---|---|---|---|---|---|---|
| VkD Swin-nano | 43.0 | 62.3 | 46.2 | 24.8 | 45.3 | 60.1 | 16M |
| VkD Swin-tiny | 46.9 | 66.6 | 50.9 | 27.8 | 49.8 | 64.6 | 38M |
| ViDT undistilled nano / tiny | 40.4 / 44.9 | | | | | | |
| ViDT token-matching KD nano / tiny | 41.9 / 46.6 | | | | | | |

Generation (BigGAN+DA, FID at 10% data, CIFAR-10 / CIFAR-100): baseline 23.34 / 35.39, VkD with
LayerNorm 16.47 / 24.92, VkD with whitening 13.16 / 16.87 (the normalisation must fit the task).
"""


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
    lines = [
        "# Reproduction at digits scale: projector and normalisation ablations", "",
        f"Made by `make ablation` on {report['date']} (torch {report['torch']}, "
        f"{report['seconds'] / 60:.0f} min on {report.get('hardware', 'a CPU')}). DeiT-Ti students, 32 px digits from "
        f"scikit-learn (1,437 train / 360 val images), {len(report['seeds'])} seeds per row, identical "
        f"budgets; teacher resnet10t at {report['teacher_acc1']:.2f}% top-1. Every number below comes from "
        "`results/ablation.json`.", "",
        "| row | top-1 mean ± std | per seed | CKA(student, projected) | config |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        cka = row["cka_student_vs_projected"]
        cka_text = "—" if cka is None else f"{statistics.mean(cka):.4f} ± {statistics.stdev(cka):.4f}"
        seeds = ", ".join(f"{a:.2f}" for a in row["acc1_per_seed"])
        lines.append(f"| {row['title']} | {row['acc1_mean']:.2f} ± {row['acc1_std']:.2f} | {seeds} | "
                     f"{cka_text} | [`{os.path.basename(row['config'])}`](../{row['config']}) |")
    lines += ["", "![ablation](ablation.png)", "",
              "CKA is linear CKA between the student's pooled patch feature and the projector's output on "
              "the validation set: 1 means the projection kept the student's pairwise similarities exactly "
              "(the paper's argument for an isometry).", "", PAPER_NUMBERS]
    return "\n".join(lines)


def write_results(folder: str, name: str, report: dict, plot_report, edit_page) -> None:
    """``folder/NAME.json`` (the report), ``folder/NAME.png`` (``plot_report(report, path)``) and
    ``folder/README.md`` replaced by ``edit_page(its current text, or '')``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot_report(report, os.path.join(folder, f"{name}.png"))
    readme = os.path.join(folder, "README.md")
    page = ""
    if os.path.isfile(readme):
        with open(readme) as handle:
            page = handle.read()
    with open(readme, "w") as handle:
        handle.write(edit_page(page))


def main() -> None:
    os.chdir(ROOT)
    force = os.environ.get("FORCE", "") not in ("", "0")
    started = time.time()
    datasets.export_digits(demo.DATA)
    teacher = demo.run("teacher", force=False)
    rows = row_configs()
    total, done, trained, summaries = len(rows) * len(SEEDS), 0, 0, []
    for row in rows:
        runs = []
        for seed in SEEDS:
            runs.append(train(row, seed, force))
            done += 1
            trained += not runs[-1]["reused"]
            elapsed = time.time() - started
            # Reused runs cost nothing: the ETA is paced by the runs actually trained.
            eta = elapsed / trained * (total - done) / 60 if trained else float("nan")
            print(f"[{done}/{total}] {row['name']} seed {seed}: top-1 {runs[-1]['acc1']:.2f}  "
                  f"elapsed {elapsed / 60:.1f} min, eta {eta:.1f} min", flush=True)
        with_projector = row["settings"]["alpha"] > 0
        cka = [similarity_preservation(row, run) for run in runs] if with_projector else None
        summaries.append(summarise(row, runs, cka_student_vs_projected=cka))
    report = {"teacher_acc1": teacher["acc1"], "seeds": list(SEEDS), "rows": summaries,
              "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__}
    # The page is this report's; sections that other drivers own are kept after it.
    write_results(RESULTS, "ablation", report, plot,
                  lambda page: results_page(report) + ("\n" + marked_sections(page) if marked_sections(page) else ""))
    print(f"wrote {RESULTS}/ablation.json, {RESULTS}/ablation.png and {RESULTS}/README.md "
          f"in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
