"""The Fashion-MNIST comparison: its configs, paired comparisons and their outcomes, and its report, written
from fmnist.json (CPU, seconds)."""
import json
import os
import re

import pytest
import yaml

from config import check_arguments, parse_arguments
from experiments import fmnist
from experiments.rows import row_configs
from experiments.runner import write_report
from experiments.stats import paired_comparison

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = os.path.join(REPO, fmnist.RESULTS)
EXPECTED_ROWS = {
    "row1_no_distillation": {"alpha": 0.0, "gamma": 0.0, "eval_head": "cls"},
    "row2_logit_kd": {"alpha": 0.0, "gamma": 1.0, "eval_head": "mean"},
    "row3_vkd": {"alpha": 1.0, "gamma": 1.0, "projector": "orthogonal", "normalisation": "layernorm",
                 "projector_weight_decay": False, "eval_head": "mean"},
    "row4_linear_layernorm": {"alpha": 1.0, "gamma": 1.0, "projector": "linear", "normalisation": "layernorm",
                              "projector_weight_decay": False, "eval_head": "mean"},
    "row5_original_recipe": {"alpha": 1.0, "gamma": 1.0, "projector": "orthogonal", "normalisation": "layernorm",
                             "projector_weight_decay": True, "eval_head": "mean"},
    "row6_features_orthogonal": {"alpha": 1.0, "gamma": 0.0, "projector": "orthogonal", "normalisation": "layernorm",
                                 "projector_weight_decay": False, "eval_head": "cls"},
    "row7_features_linear": {"alpha": 1.0, "gamma": 0.0, "projector": "linear", "normalisation": "layernorm",
                             "projector_weight_decay": False, "eval_head": "cls"},
    "row8_deit_hard": {"distiller": "deit-hard", "distillation_alpha": 0.5, "eval_head": "mean"},
    "row9_deit_soft": {"distiller": "deit-soft", "distillation_alpha": 0.5, "distillation_tau": 1.0, "eval_head": "mean"},
    "row10_cnn_none": {"distiller": "none", "student_model": "regnetx_002"},
    "row11_cnn_kd": {"distiller": "kd", "gamma": 1.0, "temperature": 1.0, "student_model": "regnetx_002"},
    "row12_cnn_fitnet": {"distiller": "fitnet", "alpha": 1.0, "student_model": "regnetx_002"},
    "row13_cnn_vkd": {"distiller": "vkd", "alpha": 1.0, "gamma": 1.0, "projector": "orthogonal",
                      "normalisation": "layernorm", "projector_weight_decay": False, "student_model": "regnetx_002"},
    "row14_cnn_vkd_features": {"distiller": "vkd", "alpha": 1.0, "gamma": 0.0, "projector": "orthogonal",
                               "normalisation": "layernorm", "projector_weight_decay": False,
                               "student_model": "regnetx_002"},
}
ROW_ORDER = sorted(EXPECTED_ROWS, key=lambda name: int(name.split("_")[0][3:]))


def recorded_report() -> dict:
    with open(os.path.join(RECORDED, "fmnist.json")) as handle:
        return json.load(handle)


def test_rows_resolve_through_the_entry_point_with_identical_budgets():
    rows = row_configs(fmnist.CONFIGS)
    assert [row["name"] for row in rows] == ROW_ORDER
    budgets = set()
    for row in rows:
        with open(row["path"]) as handle:
            stated = yaml.safe_load(handle)
        # Stated in every row file: the method and its settings are not left to the flags' defaults (rows 1-7,
        # from before --distiller, are vkd's by its alpha and gamma).
        assert "distiller" in stated or {"alpha", "gamma"} <= set(stated)
        if stated.get("distiller", "vkd") == "vkd":
            assert ("projector_weight_decay" in stated) == (stated["alpha"] > 0)
        args, explicit = parse_arguments(["--config", row["path"]])
        check_arguments(args, explicit)
        for key, value in EXPECTED_ROWS[row["name"]].items():
            assert getattr(args, key) == value, (row["name"], key)
        assert args.data_set == "FMNIST" and args.data_path is None and not args.train_teacher
        assert (args.threads, args.deterministic, args.student_ema) == (1, True, False)
        budgets.add((args.epochs, args.eval_freq, args.batch_size, args.lr, args.input_size, args.subset,
                     args.student_model, args.teacher_path, args.teacher_cache, args.crop_scale_min, args.mixup,
                     args.cutmix, args.seed))
    shared = (32, "10PERCENT")
    assert budgets == {(10, 5, 64, 5e-4, *shared, "deit_ti_distilled", "runs/fmnist/teacher/teacher.pth",
                        "runs/fmnist/teacher_cache", 0.35, 0.0, 0.0, 0),
                       (10, 5, 64, 2e-3, *shared, fmnist.CNN_STUDENT, "runs/fmnist/teacher/teacher.pth",
                        "runs/fmnist/teacher_cache", 0.35, 0.0, 0.0, 0)}
    assert len(fmnist.SEEDS) >= 5


def test_teacher_trains_on_the_students_subset():
    teacher, _ = parse_arguments(["--config", fmnist.TEACHER.config])
    student, _ = parse_arguments(["--config", os.path.join(fmnist.CONFIGS, "row3_vkd.yaml")])
    assert teacher.train_teacher and teacher.teacher == student.teacher == "resnet10t"
    assert (teacher.data_set, teacher.subset, teacher.input_size) == (student.data_set, student.subset, 32)
    assert os.path.join(fmnist.TEACHER.output_dir, "teacher.pth") == student.teacher_path
    assert (teacher.epochs, teacher.eval_freq, teacher.threads, teacher.deterministic) == (30, 1, 1, True)
    assert fmnist.TEACHER.threads == fmnist.THREADS == 1


def row(name, accuracies, seeds=(0, 1, 2), scale=None):
    expected = EXPECTED_ROWS.get(name, {})
    return {"row": name, "title": f"{name.split('_')[0][3:]}. {name}", "config": f"configs/fmnist/{name}.yaml",
            "eval_head": expected.get("eval_head", "mean"), "distiller": expected.get("distiller", "vkd"),
            "student_model": expected.get("student_model", "deit_ti_distilled"),
            "settings": {"lr": 2e-3 if "cnn" in name else 5e-4},
            "seeds": list(seeds), "acc1_per_seed": list(accuracies),
            "acc1_mean": sum(accuracies) / len(accuracies) if accuracies else None,
            "acc1_std": 0.5 if len(accuracies) > 1 else None, "seconds": 100.0 * len(accuracies),
            "projector_scale": [scale] * len(accuracies), "commands": [f"python main_distributed.py --config {name}"]}


def report_for(vkd, others, collapsed=0.0):
    """A report with VkD's per-seed accuracies ``vkd`` and every other row at ``others``."""
    rows = [row(name, vkd if name == fmnist.VKD else others,
                scale=None if EXPECTED_ROWS[name].get("alpha", 0) == 0 else (collapsed if "row5" in name else 1.0))
            for name in ROW_ORDER]
    return {"rows": rows, "comparisons": fmnist.comparisons({r["row"]: r for r in rows}), "teacher_acc1": 91.0,
            "teacher_curve": [80.0, 91.0], "teacher_epochs": 2, "teacher_seconds": 120.0, "seeds": [0, 1, 2],
            "missing": [], "teacher_command": "python main_distributed.py --config configs/fmnist/teacher.yaml",
            "budget": {"subset": "10PERCENT", "input_size": 32, "epochs": 10, "batch_size": 64, "lr": 5e-4,
                       "student_model": "deit_ti_distilled", "teacher": "resnet10t", "crop_scale_min": 0.35,
                       "eval_freq": 5},
            "cnn_student": {"student": "regnetx_002", "student_params": 2319482, "teacher": "resnet10t",
                            "teacher_params": 4928010, "why": "a test's reason"},
            "training_images": 6000, "test_images": 10000, "threads": 1, "deterministic": True, "workers": 2,
            "teacher_cache": {"hits": 3, "misses": 1, "bytes_written": 10, "hit_rate": 0.75},
            "students_wall_seconds": 1800.0, "date": "2026-11-30", "torch": "2",
            "hardware": "2 cores of a test CPU, no GPU", "seconds": 1.0}


def outcomes(report) -> dict:
    return {(c["first"], c["second"]): fmnist.outcome(c) for c in report["comparisons"]}


def test_comparisons_are_vkd_against_each_pair_then_the_collapse():
    report = report_for([90.0, 91.0, 92.5], [89.0, 89.5, 90.5])
    pairs = [(c["first"], c["second"]) for c in report["comparisons"]]
    assert pairs == ([(fmnist.VKD, other) for other, _ in fmnist.PAIRS]
                     + [(first, second) for first, second, _ in fmnist.FEATURE_PAIRS] + [fmnist.COLLAPSE_PAIR]
                     + [(first, second) for first, second, _ in fmnist.DEIT_PAIRS + fmnist.CNN_PAIRS])
    vkd_vs_row1 = report["comparisons"][0]
    assert vkd_vs_row1["differences"] == pytest.approx([1.0, 1.5, 2.0]) and vkd_vs_row1["exceeds_noise"] is True
    assert vkd_vs_row1["question"] == fmnist.PAIRS[0][1]


def test_outcomes_follow_the_numbers():
    better = outcomes(report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5]))
    assert {better[(fmnist.VKD, other)] for other, _ in fmnist.PAIRS} == {"better"}
    assert better[fmnist.COLLAPSE_PAIR] == "within the noise"  # rows 2 and 5 are equal
    tied = outcomes(report_for([90.0, 91.5, 91.0], [91.0, 90.5, 91.0]))
    assert {tied[(fmnist.VKD, other)] for other, _ in fmnist.PAIRS} == {"within the noise"}
    worse = outcomes(report_for([88.0, 89.0, 90.0], [90.0, 90.5, 91.5]))
    assert {worse[(fmnist.VKD, other)] for other, _ in fmnist.PAIRS} == {"worse"}


def test_too_few_seeds_and_the_collapse_measure():
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    rows = {r["row"]: r for r in report["rows"]}
    rows[fmnist.VKD] = row(fmnist.VKD, [91.0], seeds=(1,), scale=1.0)
    found = outcomes({"comparisons": fmnist.comparisons(rows)})
    assert {found[(fmnist.VKD, other)] for other, _ in fmnist.PAIRS} == {"too few seeds"}
    assert fmnist.projector_collapsed(row("row5_original_recipe", [1.0, 2.0], scale=0.0)) is True
    assert fmnist.projector_collapsed(row("row5_original_recipe", [1.0, 2.0], scale=0.7)) is False
    assert fmnist.projector_collapsed(row("row1_no_distillation", [1.0, 2.0])) is None


def test_the_recorded_page_is_the_one_written_from_the_recorded_json():
    with open(os.path.join(RECORDED, "README.md")) as handle:
        assert handle.read() == fmnist.results_page(recorded_report())


def test_the_recorded_comparisons_come_back_from_the_per_seed_numbers():
    report = recorded_report()
    rows = {r["row"]: r for r in report["rows"]}
    for comparison in report["comparisons"]:
        first, second = (dict(zip(rows[name]["seeds"], rows[name]["acc1_per_seed"]))
                         for name in (comparison["first"], comparison["second"]))
        again = paired_comparison(first, second)
        assert again["differences"] == pytest.approx(comparison["differences"])
        assert again["ci95"] == pytest.approx(comparison["ci95"])
        assert again["exceeds_noise"] == comparison["exceeds_noise"]
    assert [row["row"] for row in report["rows"]] == ROW_ORDER
    # Weight decay zeroes the original recipe's projector; VkD's stays an isometry (checked once each row ran).
    for name, collapsed in (("row5_original_recipe", True), (fmnist.VKD, False)):
        if rows[name]["seeds"]:
            assert fmnist.projector_collapsed(rows[name]) is collapsed


def test_a_page_with_missing_runs_names_them_and_no_machine_path():
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    report["rows"][0] = row("row1_no_distillation", [90.0], seeds=(0,))
    report["missing"] = ["row1_no_distillation seed 1", "row1_no_distillation seed 2"]
    text = fmnist.results_page(report)
    assert "40 of 42 student runs finished; missing: row1_no_distillation seed 1, row1_no_distillation seed 2." in text
    assert "3 of 4 teacher batches were read back (75.0%)" in text and "evaluated after epochs 5 and 10" in text
    assert not re.search(r"[\s`(]/[A-Za-z]", text)  # no absolute path: commands run from the repository root


def test_write_report_and_plot_before_any_student_run_finished(tmp_path):
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    report["rows"] = [row(name, [], seeds=()) for name in ROW_ORDER]
    report["comparisons"] = fmnist.comparisons({r["row"]: r for r in report["rows"]})
    assert {fmnist.outcome(c) for c in report["comparisons"]} == {"too few seeds"}
    write_report(str(tmp_path), "fmnist.json", report, fmnist.results_page, fmnist.plot)
    with open(tmp_path / "fmnist.json") as handle:
        assert json.load(handle) == report
    assert (tmp_path / "fmnist.png").stat().st_size > 1000
    assert (tmp_path / "README.md").read_text() == fmnist.results_page(report)
    assert "VkD could not be compared (no seed where both rows finished)" in fmnist.results_page(report)


def test_the_scope_names_the_best_row_that_finished_every_seed():
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    report["rows"][ROW_ORDER.index("row4_linear_layernorm")] = row("row4_linear_layernorm", [99.0], seeds=(0,))
    text = fmnist.results_page(report)
    assert "reaches 92.17% against the teacher's 91.00%" in text and "reaches 99.00%" not in text
