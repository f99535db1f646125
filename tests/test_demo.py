"""demo.py's reading of the learning curves: intervals, the noise rule, thresholds, the verdict's wording,
and a whole `main()` on made-up training logs (no training), checked against its summary.json."""
import json
import os

import pytest

import demo

N = 360


def percent(correct: int, n: int = N) -> float:
    """A top-1 as the training log writes it."""
    return 100.0 * correct / n


def curve(*counts: int):
    return [percent(count) for count in counts]


# Shaped like the demo's runs: VkD far ahead early, the baseline ends 10 images higher (342 vs 332).
VKD_FAST = curve(150, 240, 286, 300, 310, 320, 322, 325, 326, 328, 330, 331, 331, 332, 332)
BASELINE_SLOW = curve(60, 90, 115, 160, 200, 227, 260, 280, 300, 310, 320, 330, 336, 340, 342)


# ----------------------------------------------------------------------------- intervals and the noise rule


def test_wilson_interval_matches_the_closed_form():
    low, high = demo.wilson_interval(332, N)
    assert low == pytest.approx(88.9886, abs=1e-3) and high == pytest.approx(94.5642, abs=1e-3)
    # 0 of n: [0, z^2 / (n + z^2)]
    z2 = demo.Z95 ** 2
    assert demo.wilson_interval(0, N) == pytest.approx((0.0, 100 * z2 / (N + z2)))
    # symmetric under swapping right and wrong; always contains the observed proportion
    for correct in (0, 1, 100, 180, 300, 359, 360):
        low, high = demo.wilson_interval(correct, N)
        mirror_low, mirror_high = demo.wilson_interval(N - correct, N)
        assert (low, high) == pytest.approx((100 - mirror_high, 100 - mirror_low))
        assert low - 1e-9 <= percent(correct) <= high + 1e-9
    # and scipy's Wilson interval agrees
    from scipy.stats import binomtest
    for correct in (5, 200, 332, 352):
        reference = binomtest(correct, N).proportion_ci(confidence_level=0.95, method="wilson")
        assert demo.wilson_interval(correct, N) == pytest.approx((100 * reference.low, 100 * reference.high), abs=1e-6)


def test_two_proportion_test_on_the_demo_readme_numbers():
    # 342 vs 332 of 360: pooled p = 674/720, z = (10/360) / sqrt(p (1 - p) 2/360) = 1.524
    assert demo.two_proportion_p_value(342, 332, N) == pytest.approx(0.1275, abs=5e-4)
    assert demo.two_proportion_p_value(332, 342, N) == demo.two_proportion_p_value(342, 332, N)
    assert demo.two_proportion_p_value(286, 115, N) < 1e-30      # 79% vs 32% after 3 epochs
    assert demo.two_proportion_p_value(300, 300, N) == 1.0
    assert demo.two_proportion_p_value(360, 360, N) == 1.0 and demo.two_proportion_p_value(0, 0, N) == 1.0
    # where the rule switches at n = 360 and 93%: 14 images apart is beyond the noise, 13 is not
    assert demo.two_proportion_p_value(342, 328, N) < 0.05 < demo.two_proportion_p_value(342, 329, N)


def test_p_values_print_with_three_decimals_rounded_down():
    assert demo.format_p(0.1275) == "p = 0.127"
    assert demo.format_p(0.04999) == "p = 0.049"
    assert demo.format_p(0.0004) == "p < 0.001"
    assert demo.format_p(1.0) == "p = 1.000"


def test_thresholds_are_compared_in_image_counts():
    assert demo.first_epoch_reaching(curve(305, 306), 85, N) == 2      # 306 / 360 is exactly 85%
    assert demo.first_epoch_reaching(curve(305, 305), 85, N) is None
    assert demo.first_epoch_reaching(curve(324, 100), 90, N) == 1      # reached once counts, even if lost later
    assert demo.correct_count(percent(331), N) == 331


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


# ----------------------------------------------------------------------------- the verdict's wording


def test_verdict_vkd_faster_but_behind_at_the_end_inside_the_noise():
    line = demo.verdict(BASELINE_SLOW, VKD_FAST, N)
    assert line.startswith("VkD learned faster: 85%/90% reached at epoch 5/8 (VkD) vs 10/12 (no distillation), ")
    assert f"mean top-1 over the 15 epochs {sum(VKD_FAST) / 15:.1f} vs {sum(BASELINE_SLOW) / 15:.1f}" in line
    # epochs 1-10 are 18 or more images apart; from epoch 11 on the gap is inside the noise
    assert "VkD ahead beyond the noise after 10 of 15 epochs." in line
    assert line.endswith("Final top-1 92.2 (VkD) vs 95.0 (no distillation): a difference of 10 of 360 images, "
                         "inside the noise (two-proportion z-test, p = 0.127), so the final numbers alone do not "
                         "rank them.")


def test_verdict_when_distillation_loses_everywhere():
    line = demo.verdict(VKD_FAST[:-1] + [percent(345)], curve(*[c // 2 for c in range(100, 400, 20)]), N)
    assert line.startswith("No distillation learned faster: 85%/90% reached at epoch never/never (VkD) vs 5/8 "
                           "(no distillation), ")
    assert "no distillation ahead beyond the noise after 15 of 15 epochs." in line
    assert "no distillation ends 155 of 360 images ahead, beyond the noise (two-proportion z-test, p < 0.001)." in line
    assert "VkD learned faster" not in line and "inside the noise" not in line


def test_verdict_when_vkd_wins_the_end_beyond_the_noise():
    vkd = VKD_FAST[:-1] + [percent(350)]
    baseline = BASELINE_SLOW[:-1] + [percent(330)]
    line = demo.verdict(baseline, vkd, N)
    assert line.startswith("VkD learned faster:")
    p_value = demo.two_proportion_p_value(350, 330, N)
    assert p_value < 0.05
    assert line.endswith(f"Final top-1 97.2 (VkD) vs 91.7 (no distillation): VkD ends 20 of 360 images ahead, "
                         f"beyond the noise (two-proportion z-test, {demo.format_p(p_value)}).")


def test_verdict_when_the_curves_cross():
    # VkD reaches 85% first, but the baseline has the larger area and reaches 90% first: no winner.
    vkd = curve(250, 310, 312, 314, 316, 318)
    baseline = curve(300, 305, 325, 330, 330, 330)
    line = demo.verdict(baseline, vkd, N)
    assert line.startswith("Neither learned clearly faster: 85%/90% reached at epoch 2/never (VkD) vs 3/3 "
                           "(no distillation), ")
    # only epoch 1 (300 vs 250) is beyond the noise; 330 vs 314 at epoch 4 gives p = 0.052
    assert "ahead beyond the noise after 0 (VkD) and 1 (no distillation) of 6 epochs." in line


def test_verdict_needs_one_epoch_beyond_the_noise_to_call_a_faster_learner():
    # VkD is ahead after every epoch but by 3 images at most: never beyond the noise.
    baseline = curve(290, 300, 305, 310, 320, 325)
    vkd = curve(293, 303, 306, 312, 322, 325)
    line = demo.verdict(baseline, vkd, N)
    assert line.startswith("Neither learned clearly faster:")
    assert "after 0 (VkD) and 0 (no distillation) of 6 epochs." in line
    assert line.endswith("Final top-1 90.3 (VkD) vs 90.3 (no distillation): the same 325 of 360 images.")


def test_verdict_refuses_curves_of_different_lengths():
    with pytest.raises(ValueError):
        demo.verdict(VKD_FAST, VKD_FAST[:-1], N)


# ----------------------------------------------------------------------------- the commands and a whole main()


def test_runs_are_pinned_and_vkd_keeps_its_projector_an_isometry():
    for name in ("baseline", "vkd"):
        argv = demo.COMMON + demo.RUNS[name]
        assert argv[argv.index("--seed") + 1] == "0" and argv[argv.index("--epochs") + 1] == "15"
    assert "--no-projector-weight-decay" in demo.RUNS["vkd"]
    assert demo.THREAD_ENV["OMP_NUM_THREADS"] == demo.THREAD_ENV["MKL_NUM_THREADS"] == str(demo.THREADS)
    assert demo.THREAD_ENV["OMP_WAIT_POLICY"] == "PASSIVE"


def test_every_demo_command_is_accepted_and_repeatable(tmp_path):
    from config import check_arguments, parse_arguments
    for name in demo.RUNS:
        args, explicit = parse_arguments(demo.COMMON + demo.RUNS[name] + ["--output_dir", str(tmp_path / name)])
        check_arguments(args, explicit)
        assert args.seed == 0 and args.batch_size == demo.BATCH_SIZE
        assert args.deterministic and args.threads == demo.THREADS


def fake_log(acc1_curve, seconds_per_epoch=1.0, teacher=False):
    return [{"epoch": epoch, "val_acc1": acc1, "val_acc5": 100.0, "val_images": N, "train_seconds": seconds_per_epoch,
             "train_loss": 1.0 / (epoch + 1), "train_ce": 0.5 / (epoch + 1), "train_kd": 0.0 if teacher else 0.3,
             "train_vkd": 0.0 if teacher else 0.2} for epoch, acc1 in enumerate(acc1_curve)]


def test_main_writes_a_summary_whose_verdict_agrees_with_its_numbers(tmp_path, monkeypatch, capsys):
    logs = {"teacher": fake_log(curve(200, 300, 352), teacher=True), "baseline": fake_log(BASELINE_SLOW),
            "vkd": fake_log(VKD_FAST)}

    def fake_run(name, force):
        epochs = logs[name]
        return {"command": f"main_distributed.py {name}", "epochs": epochs, "seconds": 10.0,
                "acc1": epochs[-1]["val_acc1"], "acc5": epochs[-1]["val_acc5"]}

    monkeypatch.chdir(tmp_path)  # demo.main changes the working folder; monkeypatch restores it afterwards
    monkeypatch.setattr(demo, "ROOT", str(tmp_path))
    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo.datasets, "export_digits", lambda root, force=False: root)
    demo.main()
    printed = capsys.readouterr().out
    with open(tmp_path / demo.OUT / "summary.json") as handle:
        summary = json.load(handle)
    # the keys it always had
    for key in ("teacher_acc1", "baseline_acc1", "vkd_acc1", "seconds", "commands", "runs"):
        assert key in summary
    assert summary["baseline_acc1"] == pytest.approx(95.0) and summary["vkd_acc1"] == pytest.approx(percent(332))
    for name in ("teacher", "baseline", "vkd"):
        assert {"acc1", "acc5", "seconds", "acc1_interval95"} <= set(summary["runs"][name])
    assert summary["runs"]["teacher"]["acc1_interval95"] == [95.68, 98.87]
    # the added numbers, and a verdict recomputed from them reads the same
    vkd, baseline = summary["runs"]["vkd"], summary["runs"]["baseline"]
    assert vkd["acc1_per_epoch"] == pytest.approx(VKD_FAST, abs=1e-4)
    assert vkd["first_epoch_at"] == {"85": 5, "90": 8} and baseline["first_epoch_at"] == {"85": 10, "90": 12}
    assert vkd["mean_acc1_over_epochs"] > baseline["mean_acc1_over_epochs"]
    assert summary["verdict"] == demo.verdict(baseline["acc1_per_epoch"], vkd["acc1_per_epoch"], summary["val_images"])
    assert summary["verdict"].startswith("VkD learned faster") and "inside the noise" in summary["verdict"]
    assert summary["machine"]["threads"] == demo.THREADS and summary["machine"]["date"]
    assert os.path.getsize(tmp_path / demo.OUT / "curves.png") > 10_000
    # the printed table and verdict
    assert f"verdict: {summary['verdict']}" in printed
    rows = {line.split("  ")[0]: line for line in printed.splitlines() if line.startswith(("teacher", "DeiT-Ti"))}
    assert rows["DeiT-Ti, VkD"].split()[2:] == ["92.22", "89.0-94.6", "100.00", "79.4", "88.9", "90.6", "5", "8",
                                                 f"{sum(VKD_FAST) / 15:.1f}", "10.0"]
    assert rows["DeiT-Ti, no distillation"].split()[3:] == [
        "95.00", "92.2-96.8", "100.00", "31.9", "63.1", "83.3", "10", "12", f"{sum(BASELINE_SLOW) / 15:.1f}", "10.0"]
    assert rows["teacher (resnet10t)"].split()[2:] == ["97.78", "95.7-98.9", "100.00"] + ["-"] * 6 + ["10.0"]
