"""export.py: a tiny student, from our checkpoint layout and from the released one, to ONNX, torch.export and
safetensors; each file gives the PyTorch student's logits where it is used (onnxruntime, a Python without
this repository, this repository's strict loader) and carries the config predict.py needs."""
import builtins
import errno
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE, write_image_folder

import export
from models.inference import ONNX_OPSET, load_exported_student
from vkd.checkpoints import file_sha256

CHECK_LINE = re.compile(r"^Check against the PyTorch student, max \|logits difference\|: ([\d.e+-]+) on 3 random "
                        r"inputs, ([\d.e+-]+) on (\d+) (.+) \(limit ([\d.e+-]+): 1e-04 x max\(1, largest \|logit\| "
                        r"([\d.e+-]+)\)\)$", re.M)
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
        [(random_difference, images_difference, count, source, _, _)] = CHECK_LINE.findall(stdout)
        assert float(random_difference) <= TOLERANCE and float(images_difference) <= TOLERANCE
        assert (int(count), source) == (export.MAX_CHECK_IMAGES, "scikit-learn digits images")
        config = json.loads((tmp_path / f"{layout}{suffix}.json").read_text())
        assert (config["architecture"], config["input_size"], config["num_classes"]) == ("deit_ti_distilled", 32, 3)
        assert config["checkpoint_sha256"] == file_sha256(checkpoint)
        assert config["format"] == export_format
        exported[layout] = str(out), config
    # Released files name no classes, and 3 is no ImageNet head.
    assert exported["ours"][1]["class_names"] == list(CLASSES)
    assert exported["released"][1]["class_names"] == ["class 0", "class 1", "class 2"]
    return exported


@torch.no_grad()
def expected_logits(files, inputs):
    return files.student(inputs)


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_like_pytorch(run_entry_point, tiny_student_files, inputs, tmp_path):
    exported = export_both_layouts(run_entry_point, tiny_student_files, "onnx", ".onnx", tmp_path)
    expected = expected_logits(tiny_student_files, inputs)
    for path, config in exported.values():
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        [logits] = session.run(["logits"], {"images": inputs.numpy()})
        assert np.abs(logits - expected.numpy()).max() <= TOLERANCE
        assert config["onnx_opset"] == ONNX_OPSET
        model = onnx.load(path)
        assert {entry.domain: entry.version for entry in model.opset_import}[""] == ONNX_OPSET
        assert json.loads(session.get_modelmeta().custom_metadata_map["vkd_config"]) == config


# Runs with -I, from the test's folder: neither this repository nor PYTHONPATH is on its path.
STANDALONE = """
import importlib.util, sys, torch
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("utils") is None
inputs = torch.load(sys.argv[1])
outputs = [torch.export.load(path).module()(inputs) for path in sys.argv[3:]]
torch.save(outputs, sys.argv[2])
"""


@pytest.mark.slow
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
    [(_, difference, count, source, _, _)] = CHECK_LINE.findall(stdout)
    assert (float(difference), int(count), source) == (0.0, 4, f"images of {tmp_path / 'images'}")


def test_a_failed_check_exits_1_and_leaves_no_file(run_entry_point, tiny_student_files, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # no difference is small enough
    out = tmp_path / "student.safetensors"
    code, _, stderr = run_entry_point(export, ["--checkpoint", tiny_student_files.ours, "--format", "safetensors",
                                               "--out", out])
    assert code == 1
    assert re.fullmatch(r"error: the exported student's logits differ .* more than -[\d.e+]+; .* was not written\n",
                        stderr)
    assert not out.exists() and not (tmp_path / "student.safetensors.json").exists()


@pytest.mark.parametrize("case", ["suffix", "missing", "input size", "input size 0", "not a student",
                                  "check folder"])
def test_bad_input_is_one_line_and_exit_2(case, run_entry_point, tiny_student_files, tiny_teacher_file, tmp_path):
    checkpoint, out, extra = tiny_student_files.ours, tmp_path / "student.onnx", []
    expected = {"suffix": r"--out must end in \.onnx for --format onnx, got .*student\.pt2",
                "missing": r"checkpoint file not found: .*absent\.pth",
                "input size": r"does not fit DistilledVisionTransformer: .*pass --input-size 32",
                "input size 0": r"the input size must be positive, got 0",
                "not a student": r"has no head\.weight: not a checkpoint of a DistilledVisionTransformer student",
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


def export_argv(checkpoint, out, *extra, export_format="safetensors"):
    return ["--checkpoint", checkpoint, "--format", export_format, "--out", out] + list(extra)


def test_an_existing_export_is_replaced_only_with_overwrite(run_entry_point, tiny_student_files, tmp_path):
    out, config = tmp_path / "student.safetensors", tmp_path / "student.safetensors.json"
    for existing in (out, config):  # either file of an earlier export is enough to refuse
        existing.write_bytes(b"an earlier export")
        code, stdout, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out))
        assert code == 2 and stdout == ""  # refused before any work
        assert re.fullmatch(rf"error: {re.escape(str(existing))} already exists: pass --overwrite to replace it .*\n",
                            stderr)
        assert existing.read_bytes() == b"an earlier export"
        existing.unlink()
    out.write_bytes(b"an earlier export")
    code, _, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out, "--overwrite"))
    assert code == 0, stderr
    student, written_config = load_exported_student(str(out))
    assert written_config == json.loads(config.read_text()) and written_config["num_classes"] == len(CLASSES)
    assert sorted(os.listdir(tmp_path)) == [out.name, config.name]  # no temporary left


def test_the_checkpoint_is_never_the_out(run_entry_point, tiny_student_files, tmp_path):
    checkpoint = tmp_path / "student.pt2"  # a training checkpoint under an export's name
    shutil.copy(tiny_student_files.ours, checkpoint)
    os.symlink(checkpoint, tmp_path / "link.pt2")
    os.link(checkpoint, tmp_path / "hard.pt2")
    before = file_sha256(str(checkpoint))
    for out, overwrite in itertools.product(("student.pt2", "link.pt2", "hard.pt2"), ([], ["--overwrite"])):
        code, stdout, stderr = run_entry_point(export, export_argv(checkpoint, tmp_path / out, *overwrite,
                                                                   export_format="torch-export"))
        assert code == 2 and stdout == ""
        assert re.fullmatch(rf"error: --out .*{out} would replace the checkpoint .*student\.pt2 itself: choose "
                            rf"another --out\n", stderr)
    assert file_sha256(str(checkpoint)) == before


def test_a_failed_check_keeps_the_previous_export(run_entry_point, tiny_student_files, tmp_path, monkeypatch):
    out = tmp_path / "student.safetensors"
    code, _, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out))
    assert code == 0, stderr
    previous = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # no difference is small enough
    code, _, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out, "--overwrite"))
    assert code == 1
    assert re.fullmatch(rf"error: the exported student's logits differ .*; the previous {re.escape(str(out))} is "
                        rf"kept\n", stderr)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == previous


class FullDisk:
    """A file opened for writing whose first write stores half its bytes, then fails as a full disk does."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[:len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device", self.handle.name)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def files_open_for_writing_under(folder, monkeypatch, make):
    """``open`` of a file under ``folder`` for writing returns ``make(real handle)`` (or raises what it raises)."""
    real_open = builtins.open

    def patched(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(folder)) and set(mode) & set("wxa"):
            return make(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", patched)


@pytest.mark.parametrize("export_format, suffix", [("onnx", ".onnx"), ("torch-export", ".pt2"),
                                                   ("safetensors", ".safetensors")])
def test_a_full_disk_leaves_no_partial_file(export_format, suffix, run_entry_point, tiny_student_files, tmp_path,
                                            monkeypatch):
    out = tmp_path / f"student{suffix}"
    files_open_for_writing_under(tmp_path, monkeypatch, FullDisk)
    code, stdout, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out,
                                                               export_format=export_format))
    assert code == 1
    assert stderr == (f"error: no space left in {tmp_path} to write {out.name}: free some space and export again "
                      f"(nothing was written)\n")
    assert os.listdir(tmp_path) == []  # neither a truncated file nor a temporary


@pytest.mark.parametrize("case", ["a folder", "under a file", "permission denied", "read-only file system"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(case, run_entry_point, tiny_student_files,
                                                                   tmp_path, monkeypatch):
    out, expected = tmp_path / "student.safetensors", r"cannot write .*student\.safetensors \({}\): choose another --out"
    if case == "a folder":
        out.mkdir()
        expected = r"--out .*student\.safetensors: .*student\.safetensors is a folder; give a file name"
    elif case == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "folder" / "student.safetensors"
        expected = r"--out .*student\.safetensors: .*file is not a folder"
    else:
        error = (errno.EACCES, "Permission denied") if case == "permission denied" else (errno.EROFS,
                                                                                        "Read-only file system")

        def refuse(handle):  # root writes through permissions, so the refusal is simulated
            handle.close()
            raise OSError(*error)

        files_open_for_writing_under(tmp_path, monkeypatch, refuse)
        expected = expected.format(error[1])
    code, stdout, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out))
    assert code == 2 and stdout == ""  # no "Student ..." line: refused before loading it
    assert re.fullmatch(f"error: {expected}\n", stderr), stderr


@pytest.mark.parametrize("stop", ["ctrl-c", "full disk"])
def test_a_stopped_export_advises_no_resume(stop, run_entry_point, tiny_student_files, tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")

    # Ctrl-C while checking the written file; a full disk anywhere else (the log, a library's cache)
    monkeypatch.setattr(export, "load_classifier" if stop == "ctrl-c" else "check_batches", stopped)
    code, _, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, tmp_path / "student.safetensors"))
    assert "--resume" not in stderr
    if stop == "ctrl-c":
        assert (code, stderr) == (130, "stopped: interrupted; no file was changed (an export is put in place only "
                                       "once checked)\n")
    else:
        assert (code, stderr) == (1, "error: no space left to write somewhere: free some space, then export again (an "
                                     "export is put in place only once checked: no file was changed)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("relative_difference, accepted", [(5e-5, True), (2e-4, False)])
def test_the_check_tolerance_is_relative_to_the_largest_logit(relative_difference, accepted, run_entry_point,
                                                               tiny_student_files, tmp_path, monkeypatch):
    content = torch.load(tiny_student_files.ours, weights_only=True)
    for key in ("module.head.weight", "module.head_dist.weight"):
        content["student"][key] = content["student"][key] * 7  # logits reach ~100
    checkpoint = tmp_path / "large_logits.pth.tar"
    torch.save(content, checkpoint)
    load_classifier = export.load_classifier

    def off_by(path, **kwargs):  # the loaded export, each logit off by relative_difference of the largest
        logits_of, config = load_classifier(path, **kwargs)
        return (lambda images: (lambda logits: logits + relative_difference * logits.abs().max())(logits_of(images)),
                config)

    monkeypatch.setattr(export, "load_classifier", off_by)
    out = tmp_path / "student.safetensors"
    code, stdout, stderr = run_entry_point(export, export_argv(checkpoint, out))
    assert (code == 0, out.exists()) == (accepted, accepted), stderr
    [(random_difference, images_difference, _, _, limit, largest)] = CHECK_LINE.findall(stdout)
    assert 50 < float(largest) < 200
    assert float(limit) == pytest.approx(TOLERANCE * float(largest), rel=1e-2)
    assert max(float(random_difference), float(images_difference)) > TOLERANCE  # an absolute limit would refuse it


def test_exports_get_the_mode_of_any_new_file(run_entry_point, tiny_student_files, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "student.safetensors"
    code, _, stderr = run_entry_point(export, export_argv(tiny_student_files.ours, out))
    assert code == 0, stderr
    for path in (out, tmp_path / "student.safetensors.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
