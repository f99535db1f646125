"""benchmarks/inference.py runs both pairs end to end (tiny settings: 32 px, one timed call) and prints the JSON
its doc promises, with figures that make sense."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # two ONNX exports of RegNetY-160 and DeiT-Ti each: about a minute


def test_inference_benchmark_sets_each_student_beside_its_teacher():
    flags = ["--input-size", "32", "--latency-repeats", "1", "--throughput-repeats", "1", "--throughput-batch", "2",
             "--warmup", "0", "--threads", "1"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "inference.py")] + flags, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imagenet: deit_ti_distilled vs regnety_160 at 32 px, 1000 classes" in result.stderr  # progress
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"pairs", "seconds", "cpu", "threads", "torch", "onnxruntime", "timm", "date"} <= set(report)
    assert set(report["pairs"]) == {"imagenet", "fmnist", "fmnist-cnn"} and report["threads"] == 1
    for name, student, teacher in (("imagenet", "deit_ti_distilled", "regnety_160"),
                                   ("fmnist", "deit_ti_distilled", "resnet10t"),
                                   ("fmnist-cnn", "regnetx_002", "resnet10t")):
        pair = report["pairs"][name]
        assert (pair["student_model"], pair["teacher_model"], pair["input_size"]) == (student, teacher, 32)
        for role in ("student", "teacher"):
            figures = pair[role]
            assert figures["parameters"] > 0 and figures["flops"] > 0 and figures["onnx_export_s"] > 0
            for runtime in ("eager", "onnxruntime"):
                assert figures[runtime]["latency_ms"] > 0 and figures[runtime]["throughput_img_s"] > 0
        ratios = pair["teacher_over_student"]
        assert ratios["parameters"] == pytest.approx(pair["teacher"]["parameters"] / pair["student"]["parameters"],
                                                     abs=0.01)
        assert set(ratios) == {"parameters", "flops", "eager_latency", "eager_throughput", "onnxruntime_latency",
                               "onnxruntime_throughput"}
    imagenet = report["pairs"]["imagenet"]
    assert imagenet["student"]["parameters"] < imagenet["teacher"]["parameters"]
    assert imagenet["student"]["flops"] < imagenet["teacher"]["flops"]
