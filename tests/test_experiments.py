"""The ablation's configs, its similarity measure and its results page."""
import pytest
import torch

import ablation
from config import parse_arguments

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


def test_ablation_rows_resolve_through_the_entry_point():
    rows = ablation.row_configs()
    assert [row["name"] for row in rows] == sorted(EXPECTED_ROWS)
    budgets = set()
    for row in rows:
        args, _ = parse_arguments(["--config", row["path"]])
        for key, value in EXPECTED_ROWS[row["name"]].items():
            assert getattr(args, key) == value == row["settings"][key], (row["name"], key)
        assert args.data_set == "DIGITS" and args.projector_weight_decay is False
        budgets.add((args.epochs, args.batch_size, args.lr, args.input_size, args.student_model))
    assert len(budgets) == 1  # identical budgets across rows


def test_command_line_overrides_config():
    args, _ = parse_arguments(["--config", "configs/ablation/row5_vkd.yaml", "--epochs", "3", "--seed", "7"])
    assert (args.epochs, args.seed, args.normalisation) == (3, 7, "layernorm")


def test_linear_cka_sees_isometries_but_not_arbitrary_maps():
    torch.manual_seed(0)
    features = torch.randn(200, 16)
    orthonormal_columns = torch.linalg.qr(torch.randn(48, 16)).Q
    assert abs(ablation.linear_cka(features, features @ orthonormal_columns.T) - 1) < 1e-9
    assert abs(ablation.linear_cka(features, 3 * features) - 1) < 1e-9
    squashing = torch.randn(48, 16) * torch.logspace(0, -3, 16)
    assert ablation.linear_cka(features, features @ squashing.T) < 0.9


def test_results_page_lists_every_row_with_error_bars(tmp_path):
    rows = []
    for index, name in enumerate(sorted(EXPECTED_ROWS)):
        rows.append({"row": name, "title": f"{index + 1}. {name}", "config": f"configs/ablation/{name}.yaml",
                     "acc1_mean": 90.0 + index, "acc1_std": 0.5, "acc1_per_seed": [89.5 + index, 90.0 + index, 90.5 + index],
                     "cka_student_vs_projected": None if index < 2 else [1.0, 0.99, 0.98]})
    report = {"rows": rows, "teacher_acc1": 97.0, "seeds": [0, 1, 2], "seconds": 600.0, "date": "2026-11-27",
              "torch": torch.__version__}
    page = ablation.results_page(report)
    table_lines = [line for line in page.splitlines() if line.startswith("| ") and "row" in line]
    for index, name in enumerate(sorted(EXPECTED_ROWS)):
        line = next(line for line in table_lines if f"{index + 1}. {name} |" in line)
        assert f"| {90.0 + index:.2f} ± 0.50 |" in line
        assert ("—" in line) == (index < 2)
    assert "0.9900 ± 0.0100" in page and "78.3 / 94.1" in page and "43.0 | 62.3" in page
    ablation.plot(report, str(tmp_path / "ablation.png"))
    assert (tmp_path / "ablation.png").stat().st_size > 1000


def test_config_base_cycle_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nepochs: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(SystemExit) as stop:
        parse_arguments(["--config", str(tmp_path / "a.yaml")])
    assert stop.value.code == 2
    assert "refers back to itself" in capsys.readouterr().err
