"""`make demo`: the whole VkD story on real images that ship offline, in minutes on a laptop CPU.

1. Export scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) to an ImageFolder.
2. Train a small CNN teacher on them with ``main_distributed.py --train-teacher``.
3. Train two DeiT-Ti students with identical budgets: no distillation (alpha = gamma = 0) and full
   VkD (orthogonal projector + LayerNorm teacher features + KL on the dist head).
4. Print a table and write ``runs/demo/summary.json`` and ``runs/demo/curves.png``.

Every step goes through the same entry point, data pipeline and engine as an ImageNet run. A rerun
reuses the exported data and the teacher; ``FORCE=1 make demo`` redoes everything.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import datasets

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join("data", "digits")
OUT = os.path.join("runs", "demo")

# Budget (README, "The demo"): all of it must fit in 10 minutes on 2 CPU cores. 32 px is the
# exported digit size (4x the 8x8 originals), giving a 2x2 token grid to DeiT-Ti's stride-16 stem.
INPUT_SIZE = 32
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


def timed_run(command, output_dir: str, reuse: bool, quiet: bool = False):
    """Run ``command`` (a main_distributed.py job writing to ``output_dir``) unless ``reuse``; return its
    per-epoch log and the wall seconds it took (stored beside the log, so reused runs keep theirs)."""
    seconds_path = os.path.join(output_dir, "wall_seconds.txt")
    if not reuse:
        shutil.rmtree(output_dir, ignore_errors=True)
        started = time.time()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if quiet else None)
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


def plot_curves(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("baseline", "vkd"):
        epochs = results[name]["epochs"]
        accuracy_axes.plot([e["epoch"] + 1 for e in epochs], [e["val_acc1"] for e in epochs],
                           marker="o", label={"baseline": "no distillation", "vkd": "VkD"}[name])
    accuracy_axes.axhline(results["teacher"]["acc1"], color="gray", linestyle="--", label=f"teacher ({TEACHER})")
    accuracy_axes.set(xlabel="epoch", ylabel="validation top-1 (%)", title="DeiT-Ti students on digits")
    accuracy_axes.legend()
    vkd_epochs = results["vkd"]["epochs"]
    for term in ("ce", "kd", "vkd", "loss"):
        loss_axes.plot([e["epoch"] + 1 for e in vkd_epochs], [e[f"train_{term}"] for e in vkd_epochs],
                       marker=".", label=term)
    loss_axes.set(xlabel="epoch", ylabel="mean train loss", title="VkD student: loss terms (weighted)")
    loss_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    os.chdir(ROOT)
    force = os.environ.get("FORCE", "") not in ("", "0")
    started = time.time()
    datasets.export_digits(DATA, force=force)
    results = {name: run(name, force) for name in RUNS}
    os.makedirs(OUT, exist_ok=True)
    summary = {
        "teacher_acc1": results["teacher"]["acc1"], "baseline_acc1": results["baseline"]["acc1"],
        "vkd_acc1": results["vkd"]["acc1"], "seconds": round(time.time() - started, 1),
        "commands": {name: result["command"] for name, result in results.items()},
        "runs": {name: {"acc1": r["acc1"], "acc5": r["acc5"], "seconds": r["seconds"]} for name, r in results.items()},
    }
    with open(os.path.join(OUT, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plot_curves(results, os.path.join(OUT, "curves.png"))
    print(f"\n{'model':<34}{'top-1':>8}{'top-5':>8}{'wall s':>9}")
    labels = {"teacher": f"teacher ({TEACHER})", "baseline": "DeiT-Ti, no distillation", "vkd": "DeiT-Ti, VkD"}
    for name, result in results.items():
        print(f"{labels[name]:<34}{result['acc1']:>8.2f}{result['acc5']:>8.2f}{result['seconds']:>9.1f}")
    print(f"\ntotal {summary['seconds']:.0f} s; wrote {OUT}/summary.json and {OUT}/curves.png")


if __name__ == "__main__":
    main()
