"""export.py: a tiny student, from our checkpoint layout and from the released one, to ONNX, torch.export and
safetensors; each file gives the PyTorch student's logits where it is used (onnxruntime, a Python without
this repository, this repository's strict loader) and carries the config predict.py needs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE, write_image_folder

import export
import models
from models.inference import load_exported_student

CHECK_LINE = re.compile(r"^Check against the PyTorch student, max \|logits difference\|: ([\d.e+-]+) on 3 random "
                        r"inputs, ([\d.e+-]+) on (\d+) (.+) \(limit 1e-04\)$", re.M)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def inputs():
    """A batch of 5: neither the traced batch (2) nor the check's (3), so the batch axis must be dynamic."""
    return torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def export_both_layouts(run_entry_point, files, export_format, suffix, tmp_path):
    """Exports our checkpoint and the released file; returns {layout: (path, config)} after checking the
    printed check line and the config."""
    exported = {}
    for layout, checkpoint in (("ours", files.ours), ("released", files.released)):
        out = tmp_path / f"{layout}{suffix}"
        flags = ["--input-size", IMAGE_SIZE] if layout == "released" else []  # ours records its input size
        code, stdout, stderr = run_entry_point(export, ["--checkpoint", checkpoint, "--format", export_format,
                                                        "--out", out] + flags)
        assert code == 0, stderr
        [(random_difference, images_difference, count, source)] = CHECK_LINE.findall(stdout)
        assert float(random_difference) <= TOLERANCE and float(images_difference) <= TOLERANCE
        assert (int(count), source) == (export.MAX_CHECK_IMAGES, "scikit-learn digits images")
        config = json.loads((tmp_path / f"{layout}{suffix}.json").read_text())
        assert (config["architecture"], config["input_size"], config["num_classes"]) == ("deit_ti_distilled", 32, 3)
        assert config["checkpoint_sha256"] == models.file_sha256(checkpoint)
        assert config["format"] == export_format
        exported[layout] = str(out), config
    # Released files name no classes, and 3 is no ImageNet head.
    assert exported["ours"][1]["class_names"] == list(CLASSES)
    assert exported["released"][1]["class_names"] == ["class 0", "class 1", "class 2"]
    return exported


@torch.no_grad()
def expected_logits(files, inputs):
    return files.student(inputs)


def test_onnx_runs_in_onnxruntime_like_pytorch(run_entry_point, tiny_student_files, inputs, tmp_path):
    exported = export_both_layouts(run_entry_point, tiny_student_files, "onnx", ".onnx", tmp_path)
    expected = expected_logits(tiny_student_files, inputs)
    for path, config in exported.values():
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        [logits] = session.run(["logits"], {"images": inputs.numpy()})
        assert np.abs(logits - expected.numpy()).max() <= TOLERANCE
        assert config["onnx_opset"] == export.ONNX_OPSET
        model = onnx.load(path)
        assert {entry.domain: entry.version for entry in model.opset_import}[""] == export.ONNX_OPSET
        assert json.loads(session.get_modelmeta().custom_metadata_map["vkd_config"]) == config


# Runs with -I, from the test's folder: neither this repository nor PYTHONPATH is on its path.
STANDALONE = """
import importlib.util, sys, torch
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("utils") is None
inputs = torch.load(sys.argv[1])
outputs = [torch.export.load(path).module()(inputs) for path in sys.argv[3:]]
torch.save(outputs, sys.argv[2])
"""


def test_torch_export_program_runs_without_the_repository(run_entry_point, tiny_student_files, inputs, tmp_path):
    exported = export_both_layouts(run_entry_point, tiny_student_files, "torch-export", ".pt2", tmp_path)
    torch.save(inputs, tmp_path / "inputs.pt")
    result = subprocess.run([sys.executable, "-I", "-c", STANDALONE, "inputs.pt", "outputs.pt"]
                            + [path for path, _ in exported.values()], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = expected_logits(tiny_student_files, inputs)
    for logits in torch.load(tmp_path / "outputs.pt", weights_only=True):
        assert (logits - expected).abs().max() <= TOLERANCE


def test_safetensors_load_back_strictly(run_entry_point, tiny_student_files, inputs, tmp_path):
    exported = export_both_layouts(run_entry_point, tiny_student_files, "safetensors", ".safetensors", tmp_path)
    weights = {key: value for key, value in tiny_student_files.student.state_dict().items()
               if not key.startswith("projector.")}
    for path, config in exported.values():
        student, loaded_config = load_exported_student(path)
        assert loaded_config == config
        assert student.state_dict().keys() == weights.keys()
        assert all(torch.equal(student.state_dict()[key], value) for key, value in weights.items())
        with torch.no_grad():
            assert torch.equal(student(inputs), expected_logits(tiny_student_files, inputs))


def test_check_on_a_folder_of_images(run_entry_point, tiny_student_files, tmp_path):
    write_image_folder(str(tmp_path / "images"), (2, 1, 1), seed=2)
    code, stdout, stderr = run_entry_point(export, ["--checkpoint", tiny_student_files.ours, "--format", "safetensors",
                                                    "--out", tmp_path / "student.safetensors",
                                                    "--check-images", tmp_path / "images"])
    assert code == 0, stderr
    [(_, difference, count, source)] = CHECK_LINE.findall(stdout)
    assert (float(difference), int(count), source) == (0.0, 4, f"images of {tmp_path / 'images'}")


def test_a_failed_check_exits_1_and_leaves_no_file(run_entry_point, tiny_student_files, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # no difference is small enough
    out = tmp_path / "student.safetensors"
    code, _, stderr = run_entry_point(export, ["--checkpoint", tiny_student_files.ours, "--format", "safetensors",
                                               "--out", out])
    assert code == 1
    assert re.fullmatch(r"error: the exported student's logits differ .* more than -1e\+00; .* was removed\n", stderr)
    assert not out.exists() and not (tmp_path / "student.safetensors.json").exists()


@pytest.mark.parametrize("case", ["suffix", "missing", "input size", "input size 0", "not a student",
                                  "check folder"])
def test_bad_input_is_one_line_and_exit_2(case, run_entry_point, tiny_student_files, tiny_teacher_file, tmp_path):
    checkpoint, out, extra = tiny_student_files.ours, tmp_path / "student.onnx", []
    expected = {"suffix": r"--out must end in \.onnx for --format onnx, got .*student\.pt2",
                "missing": r"checkpoint file not found: .*absent\.pth",
                "input size": r"does not fit DistilledVisionTransformer: .*pass --input-size 32",
                "input size 0": r"the input size must be positive, got 0",
                "not a student": r"has no head\.weight: not a student checkpoint",
                "check folder": r"--check-images .*absent: not a folder"}[case]
    if case == "suffix":
        out = tmp_path / "student.pt2"
    elif case == "missing":
        checkpoint = tmp_path / "absent.pth"
    elif case in ("input size", "input size 0"):
        extra = ["--input-size", "64" if case == "input size" else "0"]
    elif case == "not a student":
        checkpoint = tiny_teacher_file
    else:
        extra = ["--check-images", tmp_path / "absent"]
    code, stdout, stderr = run_entry_point(export, ["--checkpoint", checkpoint, "--format", "onnx", "--out", out]
                                           + extra)
    assert code == 2
    assert re.fullmatch(f"error: .*{expected}.*\n", stderr), stderr  # one line
    assert not out.exists()


def test_a_student_evaluated_on_its_cls_head_is_exported_with_that_head(run_entry_point, tiny_student_files, inputs,
                                                                        tmp_path):
    content = torch.load(tiny_student_files.ours, weights_only=True)
    content["args"] = dict(content["args"], eval_head="cls")  # a --gamma 0 run evaluated with --eval-head cls
    checkpoint = tmp_path / "cls_head.pth.tar"
    torch.save(content, checkpoint)
    out = tmp_path / "cls_head.safetensors"
    code, _, stderr = run_entry_point(export, ["--checkpoint", checkpoint, "--format", "safetensors", "--out", out])
    assert code == 0, stderr
    student, config = load_exported_student(str(out))
    assert config["eval_head"] == "cls" and "class head" in config["output"]
    with torch.no_grad():
        cls_token = tiny_student_files.student.forward_features(inputs)[0]
        assert torch.equal(student(inputs), tiny_student_files.student.head(cls_token))
