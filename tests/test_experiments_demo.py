"""The demo's reading of the learning curves (thresholds, who learned faster, the final difference against
the noise), its configs, and its summary.json, on made-up training logs (no training)."""
import json
import os

import pytest
import yaml

from config import check_arguments, parse_arguments
from experiments import demo
from experiments.stats import two_proportion_p_value
from vkd.errors import BadInput

N = 360


def percent(correct: int, n: int = N) -> float:
    """A top-1 as the training log writes it."""
    return 100.0 * correct / n


def curve(*counts: int):
    return [percent(count) for count in counts]


# Shaped like the demo's runs: VkD far ahead early, the baseline ends 10 images higher (342 vs 332).
VKD_FAST = curve(150, 240, 286, 300, 310, 320, 322, 325, 326, 328, 330, 331, 331, 332, 332)
BASELINE_SLOW = curve(60, 90, 115, 160, 200, 227, 260, 280, 300, 310, 320, 330, 336, 340, 342)


def test_thresholds_are_compared_in_image_counts():
    assert demo.first_epoch_reaching(curve(305, 306), 85, N) == 2      # 306 / 360 is exactly 85%
    assert demo.first_epoch_reaching(curve(305, 305), 85, N) is None
    assert demo.first_epoch_reaching(curve(324, 100), 90, N) == 1      # reached once counts, even if lost later


def test_describe_curve_reports_the_table_columns():
    stats = demo.describe_curve(VKD_FAST, N)
    assert stats["acc1_at_epoch"] == {"3": pytest.approx(79.4444, abs=1e-3), "6": pytest.approx(88.8889, abs=1e-3),
                                      "9": pytest.approx(90.5556, abs=1e-3)}
    assert stats["first_epoch_at"] == {"85": 5, "90": 8}
    assert stats["mean_acc1_over_epochs"] == pytest.approx(sum(VKD_FAST) / 15, abs=1e-4)
    assert stats["acc1_interval95"] == [88.99, 94.56]
    assert stats["acc1_per_epoch"] == pytest.approx(VKD_FAST, abs=1e-4)
    assert demo.describe_curve(BASELINE_SLOW, N)["first_epoch_at"] == {"85": 10, "90": 12}
    short = demo.describe_curve(curve(100, 200), N)  # fewer epochs than EARLY_EPOCHS name
    assert short["acc1_at_epoch"] == {} and short["first_epoch_at"] == {"85": None, "90": None}
    with pytest.raises(ValueError):
        demo.describe_curve([], N)


def test_vkd_faster_but_behind_at_the_end_inside_the_noise():
    found = demo.compare_students(BASELINE_SLOW, VKD_FAST, N)
    assert found["learned_faster"] == "vkd" and found["epochs"] == 15
    # epochs 1-10 are 18 or more images apart; from epoch 11 on the gap is inside the noise
    assert found["epochs_ahead_beyond_noise"] == {"vkd": 10, "baseline": 0}
    assert found["final_correct"] == {"vkd": 332, "baseline": 342}
    assert found["final_p_value"] == pytest.approx(0.1275, abs=5e-4) and found["final_beyond_noise"] is False


def test_when_distillation_loses_everywhere():
    found = demo.compare_students(VKD_FAST[:-1] + [percent(345)], curve(*[c // 2 for c in range(100, 400, 20)]), N)
    assert found["learned_faster"] == "baseline"
    assert found["epochs_ahead_beyond_noise"] == {"vkd": 0, "baseline": 15}
    assert found["final_correct"] == {"vkd": 190, "baseline": 345} and found["final_beyond_noise"] is True
    assert found["final_p_value"] < 0.001


def test_when_vkd_wins_the_end_beyond_the_noise():
    found = demo.compare_students(BASELINE_SLOW[:-1] + [percent(330)], VKD_FAST[:-1] + [percent(350)], N)
    assert found["learned_faster"] == "vkd" and found["final_correct"] == {"vkd": 350, "baseline": 330}
    assert found["final_p_value"] == two_proportion_p_value(350, 330, N) < 0.05 and found["final_beyond_noise"]


def test_when_the_curves_cross_neither_learned_faster():
    # VkD reaches 85% first, but the baseline has the larger area and reaches 90% first.
    found = demo.compare_students(curve(300, 305, 325, 330, 330, 330), curve(250, 310, 312, 314, 316, 318), N)
    assert found["learned_faster"] is None
    # only epoch 1 (300 vs 250) is beyond the noise; 330 vs 314 at epoch 4 gives p = 0.052
    assert found["epochs_ahead_beyond_noise"] == {"vkd": 0, "baseline": 1}


def test_a_faster_learner_must_be_ahead_beyond_the_noise_once():
    # VkD is ahead after every epoch but by 3 images at most: never beyond the noise.
    found = demo.compare_students(curve(290, 300, 305, 310, 320, 325), curve(293, 303, 306, 312, 322, 325), N)
    assert found["learned_faster"] is None and found["epochs_ahead_beyond_noise"] == {"vkd": 0, "baseline": 0}
    assert found["final_correct"] == {"vkd": 325, "baseline": 325} and found["final_p_value"] == 1.0


def test_curves_of_different_lengths_are_refused():
    with pytest.raises(ValueError):
        demo.compare_students(VKD_FAST, VKD_FAST[:-1], N)


# ----------------------------------------------------------------------------- the configs


def test_every_demo_run_is_accepted_pinned_and_repeatable(tmp_path):
    with open(os.path.join(demo.CONFIGS, "common.yaml")) as handle:
        assert yaml.safe_load(handle)["threads"] == demo.THREADS
    parsed = {}
    for job in demo.JOBS:
        assert job.threads == demo.THREADS and job.reuse_finished == (job.name == "teacher")
        args, explicit = parse_arguments(["--config", job.config, "--output_dir", str(tmp_path / job.name)])
        check_arguments(args, explicit)
        assert args.seed == 0 and args.deterministic and args.threads == demo.THREADS and args.eval_freq == 1
        parsed[job.name] = args
    assert parsed["teacher"].train_teacher and parsed["teacher"].teacher == demo.TEACHER
    baseline, vkd = parsed["baseline"], parsed["vkd"]
    assert (baseline.alpha, baseline.gamma, vkd.alpha, vkd.gamma) == (0, 0, 1, 1)
    assert vkd.projector_weight_decay is False  # the projector stays an isometry
    assert vkd.teacher_path == os.path.join(demo.OUT, "teacher", "teacher.pth") and vkd.teacher == demo.TEACHER
    same_budget = ("epochs", "lr", "batch_size", "input_size", "student_model", "seed")
    assert [getattr(baseline, key) for key in same_budget] == [getattr(vkd, key) for key in same_budget]
    assert vkd.epochs == 15


# ----------------------------------------------------------------------------- summary.json and the table


def fake_log(acc1_curve, teacher=False):
    return [{"epoch": epoch, "val_acc1": acc1, "val_acc5": 100.0, "val_images": N,
             "train_loss": 1.0 / (epoch + 1), "train_ce": 0.5 / (epoch + 1), "train_kd": 0.0 if teacher else 0.3,
             "train_vkd": 0.0 if teacher else 0.2} for epoch, acc1 in enumerate(acc1_curve)]


LOGS = {"teacher": fake_log(curve(200, 300, 352), teacher=True), "baseline": fake_log(BASELINE_SLOW),
        "vkd": fake_log(VKD_FAST)}
RECORDS = {name: {"command": f"python main_distributed.py --config configs/demo/{name}.yaml", "seconds": 10.0,
                  "reused": False} for name in LOGS}
MACHINE = {"cpu": "a test CPU", "cores": 2, "threads": demo.THREADS, "torch": "2", "date": "2026-11-30"}


def test_summary_holds_the_numbers_and_a_verdict_made_from_them():
    summary = demo.build_summary(LOGS, RECORDS, 30.0, MACHINE)
    # the keys it always had
    assert summary["baseline_acc1"] == pytest.approx(95.0) and summary["vkd_acc1"] == pytest.approx(percent(332))
    assert summary["teacher_acc1"] == pytest.approx(percent(352)) and summary["val_images"] == N
    assert summary["commands"]["vkd"] == RECORDS["vkd"]["command"] and summary["seconds"] == 30.0
    assert summary["runs"]["teacher"]["acc1_interval95"] == [95.68, 98.87]
    assert "first_epoch_at" not in summary["runs"]["teacher"]
    vkd, baseline = summary["runs"]["vkd"], summary["runs"]["baseline"]
    assert vkd["acc1_per_epoch"] == pytest.approx(VKD_FAST, abs=1e-4) and vkd["seconds"] == 10.0
    assert vkd["first_epoch_at"] == {"85": 5, "90": 8} and baseline["first_epoch_at"] == {"85": 10, "90": 12}
    assert vkd["train_loss_per_epoch"]["vkd"] == [0.2] * 15 and len(baseline["train_loss_per_epoch"]["ce"]) == 15
    assert summary["comparison"] == demo.compare_students(baseline["acc1_per_epoch"], vkd["acc1_per_epoch"], N)
    assert summary["comparison"]["learned_faster"] == "vkd" and not summary["comparison"]["final_beyond_noise"]
    assert summary["verdict"] == demo.verdict({"baseline": baseline, "vkd": vkd}, summary["comparison"], N)
    assert summary["thresholds"] == [85, 90] and summary["machine"] == MACHINE


def test_a_log_with_skipped_evaluations_is_refused():
    skipping = dict(LOGS, vkd=[{key: value for key, value in epoch.items() if not key.startswith("val_")}
                               if epoch["epoch"] == 3 else epoch for epoch in LOGS["vkd"]])
    with pytest.raises(BadInput, match="the vkd run skipped evaluations.*eval_freq: 1"):
        demo.build_summary(skipping, RECORDS, 30.0, MACHINE)


def test_the_table_shows_the_summarys_numbers():
    summary = demo.build_summary(LOGS, RECORDS, 30.0, MACHINE)
    printed = demo.format_table(summary["runs"], N)
    rows = {line.split("  ")[0]: line for line in printed.splitlines() if line.startswith(("teacher", "DeiT-Ti"))}
    assert rows["DeiT-Ti, VkD"].split()[2:] == ["92.22", "89.0-94.6", "100.00", "79.4", "88.9", "90.6", "5", "8",
                                                 f"{sum(VKD_FAST) / 15:.1f}", "10.0"]
    assert rows["DeiT-Ti, no distillation"].split()[3:] == [
        "95.00", "92.2-96.8", "100.00", "31.9", "63.1", "83.3", "10", "12", f"{sum(BASELINE_SLOW) / 15:.1f}", "10.0"]
    assert rows["teacher (resnet10t)"].split()[2:] == ["97.78", "95.7-98.9", "100.00"] + ["-"] * 6 + ["10.0"]


@pytest.mark.slow
def test_main_writes_the_report_from_its_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # demo.main changes the working folder; monkeypatch restores it afterwards
    monkeypatch.setattr(demo, "ROOT", str(tmp_path))
    monkeypatch.setattr(demo, "run_jobs", lambda jobs, force, show_output: RECORDS)
    monkeypatch.setattr(demo, "epoch_log", lambda output_dir: LOGS[os.path.basename(output_dir)])
    monkeypatch.setattr(demo.datasets, "export_digits", lambda root, force=False: root)
    demo.main([])
    printed = capsys.readouterr().out
    with open(tmp_path / demo.RESULTS / "summary.json") as handle:
        summary = json.load(handle)
    recomputed = demo.build_summary(LOGS, RECORDS, summary["seconds"], summary["machine"])
    assert summary == json.loads(json.dumps(recomputed))
    assert summary["machine"]["threads"] == demo.THREADS and summary["machine"]["date"]
    assert os.path.getsize(tmp_path / demo.RESULTS / "curves.png") > 10_000
    assert (tmp_path / demo.RESULTS / "README.md").read_text() == demo.results_page(summary)
    assert f"verdict: {summary['verdict']}" in printed and demo.format_table(summary["runs"], N) in printed
