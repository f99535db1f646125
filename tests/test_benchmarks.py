"""The benchmark scripts run and print the JSON their docs promise (tiny models, 32 px, one step; CPU)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher", "resnet10t", "--batch-size", "2", "--input-size", "32"]

pytestmark = pytest.mark.slow  # each benchmark runs end to end in subprocesses


def run_benchmark(script, flags):
    environment = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)] + flags, cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_step_prints_every_figure_the_issue_names():
    report = run_benchmark("train_step.py", TINY + ["--steps", "2", "--warmup", "1"])
    for key in ("img_per_s", "step_s_median", "step_s_min", "step_s_max", "projector_ms", "teacher_ms",
                "student_ms", "peak_mem_mb", "device", "torch", "threads"):
        assert key in report
    assert report["step_s_min"] <= report["step_s_median"] <= report["step_s_max"]
    assert report["projector_impl"] == "fast" and report["teacher_channels_last"] is True


def test_train_step_times_the_compiled_teacher_step():
    report = run_benchmark("train_step.py", TINY + ["--steps", "1", "--warmup", "1", "--compile", "teacher"])
    assert report["compile"] == "teacher" and report["first_step_s"] > 0 and report["step_s_median"] > 0


def test_projector_ratio_runs_both_implementations_in_separate_processes():
    report = run_benchmark("projector_ratio.py", ["--pairs", "1", "--steps", "1", "--warmup", "0", "--"] + TINY)
    assert set(report["step_s_by_run"]) == {"fast", "torch"}
    assert all(len(runs) == 1 for runs in report["step_s_by_run"].values())
    expected = report["step_s_by_run"]["torch"][0] / report["step_s_by_run"]["fast"][0]
    assert abs(report["ratio_by_pair"][0] - expected) < 1e-2
    assert report["teacher"] == "resnet10t" and report["input_size"] == 32
