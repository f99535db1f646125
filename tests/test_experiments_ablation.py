"""The digits ablation: its configs, its similarity measure, and its report, written from ablation.json."""
import json
import os

import pytest
import torch

from config import parse_arguments
from experiments import ablation, demo, paper
from experiments.rows import row_configs
from experiments.runner import write_report
from vkd.errors import BadInput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = os.path.join(REPO, ablation.RESULTS)
EXPECTED_ROWS = {
    "row1_no_distillation": {"alpha": 0.0, "gamma": 0.0},
    "row2_logit_kd": {"alpha": 0.0, "gamma": 1.0},
    "row3_linear_layernorm": {"projector": "linear", "normalisation": "layernorm"},
    "row4_orthogonal_none": {"projector": "orthogonal", "normalisation": "none"},
    "row5_vkd": {"projector": "orthogonal", "normalisation": "layernorm", "feature_loss": "smooth_l1"},
    "row6_orthogonal_batchstd": {"normalisation": "batchstd"},
    "row7_orthogonal_whiten": {"normalisation": "whiten"},
    "row8_vkd_mse": {"feature_loss": "mse", "normalisation": "layernorm"},
}


def recorded_report() -> dict:
    with open(os.path.join(RECORDED, "ablation.json")) as handle:
        return json.load(handle)


def test_ablation_rows_resolve_through_the_entry_point():
    rows = row_configs(ablation.CONFIGS)
    assert [row["name"] for row in rows] == sorted(EXPECTED_ROWS)
    budgets = set()
    for row in rows:
        args, _ = parse_arguments(["--config", row["path"]])
        for key, value in EXPECTED_ROWS[row["name"]].items():
            assert getattr(args, key) == value == row["settings"][key], (row["name"], key)
        assert args.data_set == "DIGITS" and args.projector_weight_decay is False
        budgets.add((args.epochs, args.batch_size, args.lr, args.input_size, args.student_model))
    assert len(budgets) == 1  # identical budgets across rows


def test_the_rows_teacher_is_the_demos():
    teacher = next(job for job in demo.JOBS if job.name == "teacher")
    assert ablation.DEMO_TEACHER == teacher
    for row in row_configs(ablation.CONFIGS):
        assert os.path.dirname(row["settings"]["teacher_path"]) == teacher.output_dir


def test_command_line_overrides_config():
    args, _ = parse_arguments(["--config", "configs/ablation/row5_vkd.yaml", "--epochs", "3", "--seed", "7"])
    assert (args.epochs, args.seed, args.normalisation) == (3, 7, "layernorm")


def test_config_base_cycle_is_one_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nepochs: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(BadInput, match="refers back to itself") as error:
        parse_arguments(["--config", str(tmp_path / "a.yaml")])
    assert error.value.exit_code == 2


def test_linear_cka_sees_isometries_but_not_arbitrary_maps():
    torch.manual_seed(0)
    features = torch.randn(200, 16)
    orthonormal_columns = torch.linalg.qr(torch.randn(48, 16)).Q
    assert abs(ablation.linear_cka(features, features @ orthonormal_columns.T) - 1) < 1e-9
    assert abs(ablation.linear_cka(features, 3 * features) - 1) < 1e-9
    squashing = torch.randn(48, 16) * torch.logspace(0, -3, 16)
    assert ablation.linear_cka(features, features @ squashing.T) < 0.9


def test_the_recorded_page_is_the_one_written_from_the_recorded_json():
    with open(os.path.join(RECORDED, "README.md")) as handle:
        assert handle.read() == ablation.results_page(recorded_report())


def test_the_recorded_numbers():
    report = recorded_report()
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == sorted(EXPECTED_ROWS) and report["seeds"] == [0, 1, 2]
    assert round(report["teacher_acc1"], 2) == 97.78
    assert [round(rows[name]["acc1_mean"], 2) for name in ("row1_no_distillation", "row5_vkd")] == [92.31, 92.78]
    for name, row in rows.items():
        assert len(row["acc1_per_seed"]) == 3
        assert (row["cka_student_vs_projected"] is None) == (row["settings"]["alpha"] == 0), name


def test_write_report_writes_the_json_and_a_plot(tmp_path):
    report = recorded_report()
    write_report(str(tmp_path), "ablation.json", report, ablation.results_page, ablation.plot)
    with open(tmp_path / "ablation.json") as handle:
        assert json.load(handle) == report
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert (tmp_path / "README.md").read_text() == ablation.results_page(report)
    assert paper.imagenet_table()[2] in ablation.results_page(report)
