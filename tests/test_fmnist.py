"""The Fashion-MNIST driver: its configs, paired comparisons, conclusion and results page (CPU, seconds)."""
import os
import re

import pytest
import yaml

import ablation
import fmnist
from config import parse_arguments

EXPECTED_ROWS = {
    "row1_no_distillation": {"alpha": 0.0, "gamma": 0.0, "projector_weight_decay": False},
    "row2_logit_kd": {"alpha": 0.0, "gamma": 1.0, "projector_weight_decay": False},
    "row3_original_recipe": {"alpha": 1.0, "gamma": 1.0, "projector": "orthogonal", "normalisation": "layernorm",
                             "projector_weight_decay": True},
    "row4_linear_layernorm": {"alpha": 1.0, "projector": "linear", "normalisation": "layernorm",
                              "projector_weight_decay": False},
    "row5_vkd": {"alpha": 1.0, "gamma": 1.0, "projector": "orthogonal", "normalisation": "layernorm",
                 "projector_weight_decay": False},
    "row6_orthogonal_none": {"alpha": 1.0, "projector": "orthogonal", "normalisation": "none",
                             "projector_weight_decay": False},
}


def test_rows_resolve_through_the_entry_point_with_identical_budgets():
    rows = ablation.row_configs(fmnist.CONFIGS)
    assert [row["name"] for row in rows] == sorted(EXPECTED_ROWS)
    budgets = set()
    for row in rows:
        with open(row["path"]) as handle:
            # Stated in every row file: the flag's default is not part of the recipe.
            assert "projector_weight_decay" in yaml.safe_load(handle), row["name"]
        args, _ = parse_arguments(["--config", row["path"]])
        for key, value in EXPECTED_ROWS[row["name"]].items():
            assert getattr(args, key) == value == row["settings"][key], (row["name"], key)
        assert args.data_set == "FMNIST" and args.data_path is None and not args.train_teacher
        budgets.add((args.epochs, args.batch_size, args.lr, args.input_size, args.subset, args.student_model,
                     args.teacher_path, args.crop_scale_min, args.eval_crop_ratio, args.mixup, args.cutmix))
    assert len(budgets) == 1


def test_teacher_trains_on_the_students_subset():
    teacher, _ = parse_arguments(["--config", os.path.join(fmnist.CONFIGS, "teacher.yaml")])
    student, _ = parse_arguments(["--config", os.path.join(fmnist.CONFIGS, "row5_vkd.yaml")])
    assert teacher.train_teacher and teacher.teacher == student.teacher == "resnet10t"
    assert (teacher.data_set, teacher.subset, teacher.input_size) == (student.data_set, student.subset, 32)
    assert os.path.join(fmnist.OUT, "teacher", "teacher.pth") == student.teacher_path


def row(name, accuracies, seeds=(0, 1, 2), scale=None):
    return {"row": name, "title": f"{name[3]}. {name}", "config": f"configs/fmnist/{name}.yaml",
            "seeds": list(seeds), "acc1_per_seed": list(accuracies),
            "acc1_mean": sum(accuracies) / len(accuracies) if accuracies else None,
            "acc1_std": 0.5 if len(accuracies) > 1 else None, "seconds": 100.0 * len(accuracies),
            "projector_scale": [scale] * len(accuracies), "commands": [f"python main_distributed.py --config {name}"]}


def report_for(vkd, others, collapsed=0.0):
    """A report with VkD's per-seed accuracies ``vkd`` and every other row at ``others``."""
    names = sorted(EXPECTED_ROWS)
    rows = [row(name, vkd if name == fmnist.VKD else others,
                scale=None if EXPECTED_ROWS[name]["alpha"] == 0 else (collapsed if "row3" in name else 1.0))
            for name in names]
    by_name = {r["row"]: r for r in rows}
    comparisons = [dict(fmnist.paired(by_name, fmnist.VKD, other), question=q) for other, q in fmnist.PAIRS]
    comparisons.append(dict(fmnist.paired(by_name, *fmnist.COLLAPSE_PAIR), question="collapse?"))
    return {"rows": rows, "comparisons": comparisons, "teacher_acc1": 91.0, "teacher_seconds": 120.0,
            "teacher_command": "python main_distributed.py --config configs/fmnist/teacher.yaml", "seeds": [0, 1, 2],
            "missing": [], "budget": {"subset": "20PERCENT", "input_size": 32, "epochs": 3, "batch_size": 64,
                                      "lr": 5e-4, "student_model": "deit_ti_distilled", "teacher": "resnet10t",
                                      "crop_scale_min": 0.35, "eval_crop_ratio": 1.0},
            "date": "2026-11-30", "torch": "2", "hardware": "2 cores of a test CPU, no GPU", "seconds": 1.0}


def test_paired_differences_interval_and_verdict():
    rows = {"a": row("row5_vkd", [90.0, 91.0, 92.5]), "b": row("row1_x", [89.0, 89.5, 90.5])}
    result = fmnist.paired(rows, "a", "b")
    assert result["differences"] == [1.0, 1.5, 2.0]
    assert result["mean"] == pytest.approx(1.5) and result["sd"] == pytest.approx(0.5)
    half = 4.303 * 0.5 / 3 ** 0.5
    assert result["ci95"] == pytest.approx([1.5 - half, 1.5 + half]) and result["exceeds_noise"] is True
    rows["b"] = row("row1_x", [91.0, 90.0, 91.5])
    assert fmnist.paired(rows, "a", "b")["exceeds_noise"] is False  # -1, +1, +1: the interval spans zero


def test_paired_uses_only_seeds_both_rows_finished():
    rows = {"a": row("row5_vkd", [90.0, 91.0], seeds=(0, 2)), "b": row("row1_x", [89.0, 89.5, 90.5])}
    result = fmnist.paired(rows, "a", "b")
    assert result["seeds"] == [0, 2] and result["differences"] == [1.0, 0.5]
    rows["a"] = row("row5_vkd", [90.0], seeds=(1,))
    single = fmnist.paired(rows, "a", "b")
    assert single["differences"] == [0.5] and single["ci95"] is None and single["exceeds_noise"] is None


def test_test_set_noise_is_the_binomial_standard_error():
    assert fmnist.test_set_noise(90.0) == pytest.approx(0.3)


def test_conclusion_follows_the_numbers():
    better = "\n".join(fmnist.conclusion(report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])))
    assert "against an unconstrained linear projector it is better, as the paper reports" in better
    assert "Against no distillation, VkD is better" in better
    assert "Keeping the projector an isometry (VkD against row 3) improves the result" in better
    assert "nearly identical within the noise, as the collapse claim predicts" in better  # rows 2, 3 equal
    assert "collapsed to zero" in better
    assert "the best row reaches 92.17% against the teacher's 91.00%: these answers describe early training" in better
    tied = "\n".join(fmnist.conclusion(report_for([90.0, 91.5, 91.0], [91.0, 90.5, 91.0], collapsed=0.7)))
    assert "is within the noise, so this budget does not confirm the paper on this point" in tied
    assert "does not change the result measurably" in tied and "not all collapsed" in tied
    worse = "\n".join(fmnist.conclusion(report_for([88.0, 89.0, 90.0], [90.0, 90.5, 91.5])))
    assert "is worse, the opposite of the paper" in worse


def test_section_table_commands_and_no_machine_paths():
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    report["rows"][0] = row("row1_no_distillation", [90.0], seeds=(0,))
    report["missing"] = ["row1_no_distillation seed 1", "row1_no_distillation seed 2"]
    text = fmnist.section(report)
    assert "| 5. row5_vkd | 92.17 ± 0.50 | 91.00, 92.00, 93.50 | 1.000, 1.000, 1.000 |" in text and "| ‖W‖_F/√192 |" in text
    assert "| 1. row1_no_distillation | 90.00 | 90.00 | — |" in text
    assert "| row5 − row4 | does the orthogonal constraint" in text and "| +1.00, +1.50, +2.00 | +1.50 ± 0.50 |" in text
    assert "16 of 18 student runs finished; missing: row1_no_distillation seed 1, row1_no_distillation seed 2." in text
    assert "`.venv/bin/python fmnist.py`" in text and "full-60k run was not made" in text
    assert not re.search(r"[\s`(]/[A-Za-z]", text)  # no absolute path: commands run from the repository root


def test_shell_command_names_the_interpreter_relative_to_the_repository():
    line = ablation.shell_command(["/some/where/.venv/bin/python", "main_distributed.py", "--seed", "1"])
    assert line.endswith("main_distributed.py --seed 1") and not line.startswith("/")


def test_results_section_replaces_only_itself_and_survives_the_ablation_page(tmp_path):
    page = "# Digits\n\ntable\n"
    once = ablation.replace_section(page, "fmnist", "## Fashion-MNIST\nfirst")
    twice = ablation.replace_section(once, "fmnist", "## Fashion-MNIST\nsecond")
    assert twice.startswith(page) and "second" in twice and "first" not in twice and twice.count("<!-- begin") == 1
    assert ablation.marked_sections(twice).startswith("<!-- begin fmnist -->") and "table" not in ablation.marked_sections(twice)
    assert ablation.marked_sections(page) == ""


def test_plot_and_results_files(tmp_path):
    (tmp_path / "README.md").write_text("# Digits ablation\n\nkept\n")
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    ablation.write_results(str(tmp_path), "fmnist", report, fmnist.plot,
                           lambda page: ablation.replace_section(page, fmnist.SECTION, fmnist.section(report)))
    assert (tmp_path / "fmnist.png").stat().st_size > 10000
    page = (tmp_path / "README.md").read_text()
    assert page.startswith("# Digits ablation\n\nkept\n") and "## Fashion-MNIST" in page
    assert '"exceeds_noise": true' in (tmp_path / "fmnist.json").read_text()


def test_section_and_plot_before_any_student_run_finished(tmp_path):
    report = report_for([91.0, 92.0, 93.5], [90.0, 90.5, 91.5])
    report["rows"] = [row(name, [], seeds=()) for name in sorted(EXPECTED_ROWS)]
    by_name = {r["row"]: r for r in report["rows"]}
    report["comparisons"] = [dict(fmnist.paired(by_name, fmnist.VKD, other), question=q) for other, q in fmnist.PAIRS]
    report["comparisons"].append(dict(fmnist.paired(by_name, *fmnist.COLLAPSE_PAIR), question="collapse?"))
    text = fmnist.section(report)
    assert text.count("too few seeds to tell") == 5 and "| 1. row1_no_distillation | not run | — | — |" in text
    assert "--config configs/fmnist/row1_no_distillation.yaml --seed 0 --output_dir runs/fmnist/row1_no_distillation/seed0" in text
    fmnist.plot(report, str(tmp_path / "empty.png"))
