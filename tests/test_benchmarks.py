"""The benchmark scripts run and print the JSON their docs promise (tiny models, 32 px, one step; CPU)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher", "resnet10t", "--batch-size", "2", "--input-size", "32"]

pytestmark = pytest.mark.slow  # each benchmark runs end to end in subprocesses


def run_benchmark(script, flags, timeout=300):
    # As the documentation runs them: a module from the repository root, no PYTHONPATH.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}"] + flags, cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=timeout)
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


def test_ablation_cache_rows_hit_the_shared_cache_and_end_bit_identical_to_independent_runs():
    # 2 rows x 4 passes of real runs: 10 training images (1PERCENT), 2 steps of 4 each; aot_eager compiles fast.
    report = run_benchmark("ablation_cache.py", ["--rows", "2", "--teacher", "resnet10t", "--input-size", "32",
                                                 "--batch-size", "4", "--subset", "1PERCENT", "--epochs", "1",
                                                 "--threads", "1", "--compile-backend", "aot_eager", "--repeats", "1"],
                           timeout=900)  # eight training processes: minutes on busy cores
    for key in ("rows", "ratio", "warm_ratio", "compile_ratio", "train_ratio", "ideal_ratio", "teacher_share", "teacher_ms",
                "student_ms", "step_ms", "hit_rate", "warm_hit_rate", "identical", "row_seconds", "bytes_written",
                "teacher", "student", "input_size", "batch_size", "epochs", "threads", "torch", "cpu"):
        assert key in report
    assert report["rows"] == 2 and report["identical"] is True
    assert report["identical_rows"] == {"cold": [True, True], "warm": [True, True]}
    assert report["steps_per_epoch"] == 2
    # The first cold row computes both batches, the second reads them; the warm pass reads everything.
    assert report["cache_counts"] == {"cold": [[0, 2], [2, 0]], "warm": [[2, 0], [2, 0]]}
    assert report["hit_rate"] == 0.5 and report["warm_hit_rate"] == 1.0
    assert report["bytes_written"] > 0 and report["warm_bytes_written"] == 0
    assert all(len(report["row_seconds"][name]) == 2 for name in ("independent", "cold", "warm", "compiled"))
    assert min(report["ratio"], report["warm_ratio"], report["compile_ratio"], report["ideal_ratio"]) > 0
    # The student step is what a perfect cache leaves of the whole step; the ideal follows from it.
    teacher, student = report["teacher_ms"], report["student_ms"]
    assert student == pytest.approx(report["step_ms"] - teacher, abs=0.15)
    assert report["ideal_ratio"] == pytest.approx(2 * (teacher + student) / (teacher + 2 * student), abs=0.01)
    assert report["teacher_share"] == pytest.approx(teacher / report["step_ms"], abs=1e-3)
    assert report["ratio_of_ideal"] == pytest.approx(report["ratio"] / report["ideal_ratio"], abs=0.01)
    assert len(report["compile_seconds"]) == 2
    assert report["teacher"] == "resnet10t" and report["input_size"] == 32 and report["threads"] == 1
