"""Checkpoints from elsewhere, read by predict.py and export.py: crafted training metadata, a file of the
other DeiT family, raw pickles. Each is one line naming the problem (and the flag that fixes it), never a
traceback, a warning of several lines or a hint about the wrong thing."""
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE
from PIL import Image

import models
import predict
from vkd.checkpoints import safe_torch_load
from vkd.errors import CheckpointError


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("key, value, expected", [
    ("input_size", "abc", r"its training run's input_size is 'abc', not a positive integer: pass --input-size"),
    ("eval_crop_ratio", None, r"its training run's eval_crop_ratio is None, not a number in \(0, 1\]"),
    ("class_names", 3, r"the checkpoint's class_names is 3, not a list of names"),
])
def test_crafted_training_metadata_is_one_line(key, value, expected, tiny_student_files, image, tmp_path,
                                               run_entry_point):
    content = torch.load(tiny_student_files.ours, weights_only=True)
    if key == "class_names":
        content["class_names"] = value
    else:
        content["args"] = dict(content["args"], **{key: value})
    checkpoint = tmp_path / "crafted.pth.tar"
    torch.save(content, checkpoint)
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", checkpoint, image])
    assert code == 2 and stdout == ""
    assert re.fullmatch(f"error: .*{expected}\n", stderr), stderr


@pytest.mark.parametrize("saved, read_as", [("deit_ti", "deit_ti_distilled"), ("deit_ti_distilled", "deit_ti")])
def test_a_file_of_the_other_deit_family_names_the_student_model(saved, read_as, image, tmp_path, run_entry_point):
    checkpoint = tmp_path / "student.pth"
    torch.save({"model": models.create_student(saved, num_classes=len(CLASSES), img_size=IMAGE_SIZE).state_dict()},
               checkpoint)
    argv = ["--checkpoint", checkpoint, "--input-size", IMAGE_SIZE, image]
    code, _, stderr = run_entry_point(predict, argv + ["--student-model", read_as])
    prefix_tokens = (2, 1) if saved.endswith("_distilled") else (1, 2)
    assert code == 2
    assert re.fullmatch(rf"error: .* does not fit .*; the file is a (distilled )?DeiT with {prefix_tokens[0]} prefix "
                        rf"tokens?, the model has {prefix_tokens[1]}: pass --student-model {saved}\n", stderr), stderr
    assert "input size" not in stderr
    code, _, stderr = run_entry_point(predict, argv + ["--student-model", saved])  # the advice works
    assert code == 0, stderr


@pytest.mark.parametrize("writer", ["torch.save legacy format", "pickle.dump"])
def test_raw_pickle_checkpoints_add_no_warning(writer, tmp_path):
    path, state = tmp_path / "raw.pth", {"weight": torch.arange(3.0)}
    if writer == "pickle.dump":
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=4)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if writer == "pickle.dump":  # no torch file: one line, as any unreadable file
            with pytest.raises(CheckpointError, match=r"^could not read checkpoint .*raw\.pth: corrupt, truncated or "
                                                      r"not a PyTorch file \(UnpicklingError: .*\)$"):
                safe_torch_load(str(path))
        else:
            assert torch.equal(safe_torch_load(str(path))["weight"], state["weight"])
    assert [str(warning.message) for warning in caught] == []
