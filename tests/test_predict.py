"""predict.py: the top classes of images written here, from a checkpoint of either layout and from each exported
format, against the PyTorch student's probabilities; unreadable images and bad flags."""
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE, REPO
from PIL import Image

import datasets
import export
import predict
from models.inference import class_names_for, config_path, load_classifier, read_image
from vkd.checkpoints import safe_torch_load

IMAGES = 3
PRINTED_PROBABILITY = 1e-4  # printed with 4 decimals, from logits within export.CHECK_TOLERANCE


@pytest.fixture(scope="module")
def exported(tiny_student_files, tmp_path_factory):
    """Our tiny checkpoint exported to every format: {format: path} (a folder for timm)."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {}
    for export_format, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2"), ("safetensors", ".safetensors"),
                                  ("timm", "")):
        paths[export_format] = str(folder / f"student{suffix}")
        export.export_student(tiny_student_files.ours, paths[export_format], export_format, log=lambda line: None)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    """IMAGES random 32 px PNGs and one truncated PNG; returns (folder, {name: pixels})."""
    folder = tmp_path / "images"
    folder.mkdir()
    generator = np.random.RandomState(3)
    pixels = {}
    for index in range(IMAGES):
        pixels[f"{index}.png"] = generator.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels[f"{index}.png"]).save(folder / f"{index}.png")
    encoded = io.BytesIO()
    Image.fromarray(pixels["0.png"]).save(encoded, format="PNG")
    (folder / "truncated.png").write_bytes(encoded.getvalue()[:200])
    return folder, pixels


def parse(stdout: str):
    """{image path: [(probability, class name)]} from the printed lines."""
    predictions, current = {}, None
    for line in stdout.splitlines():
        scored = re.fullmatch(r"  (\d\.\d{4})  (.+)", line)
        if scored:
            predictions[current].append((float(scored.group(1)), scored.group(2)))
        else:
            current = line
            predictions[current] = []
    return predictions


@torch.no_grad()
def pytorch_probabilities(student, pixels: np.ndarray) -> torch.Tensor:
    """The evaluation preprocessing of a 32 px image written out by hand: no resize, ImageNet normalisation."""
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(values)[:, None, None] for values in (datasets.IMAGENET_MEAN, datasets.IMAGENET_STD))
    return student(((image - mean) / std)[None])[0].softmax(dim=-1)


@pytest.mark.parametrize("source", ["checkpoint", "released checkpoint", "onnx", "torch-export", "safetensors",
                                    "timm folder"])
def test_top_classes_match_pytorch(source, tiny_student_files, exported, image_folder, run_entry_point):
    folder, pixels = image_folder
    model, flags, names = {
        "checkpoint": (tiny_student_files.ours, [], CLASSES),
        "released checkpoint": (tiny_student_files.released, ["--input-size", IMAGE_SIZE], ("class 0", "class 1",
                                                                                             "class 2")),
        "timm folder": (f"local-dir:{exported['timm']}", [], CLASSES),  # class names from its label_names
    }.get(source, (exported.get(source), ["--trust-pt2"] if source == "torch-export" else [], CLASSES))
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", model, "--topk", len(CLASSES), folder] + flags)
    assert code == 0, stderr
    assert re.fullmatch(r"warning: skipped .*truncated\.png: not a readable image \(.*\)\n", stderr)
    predictions = parse(stdout)
    assert list(predictions) == [str(folder / name) for name in sorted(pixels)]
    for name, image in pixels.items():
        printed = predictions[str(folder / name)]
        expected = pytorch_probabilities(tiny_student_files.student, image)
        assert sum(probability for probability, _ in printed) == pytest.approx(1.0, abs=len(CLASSES) * 5e-5)
        assert printed[0][1] == names[int(expected.argmax())]
        for probability, class_name in printed:
            assert probability == pytest.approx(expected[names.index(class_name)].item(), abs=PRINTED_PROBABILITY)


def test_topk_and_files_given_one_by_one(tiny_student_files, image_folder, run_entry_point):
    folder, _ = image_folder
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", tiny_student_files.ours, "--topk", 2,
                                                     folder / "1.png", folder / "absent.png", folder / "0.png"])
    assert code == 0, stderr
    assert stderr == f"warning: skipped {folder / 'absent.png'}: no such file\n"
    predictions = parse(stdout)
    assert list(predictions) == [str(folder / "1.png"), str(folder / "0.png")]
    assert all(len(classes) == 2 and classes[0][0] >= classes[1][0] for classes in predictions.values())


@pytest.mark.parametrize("case", ["no readable image", "topk", "input size of an export", "missing config",
                                  "not a timm folder", "input size of a timm folder", "hub offline"])
def test_bad_input_exits_2(case, tiny_student_files, exported, image_folder, run_entry_point, tmp_path, monkeypatch):
    folder, _ = image_folder
    model, argv = tiny_student_files.ours, [folder / "0.png"]
    expected = {"no readable image": r"no image could be predicted \(2 file\(s\) tried\)",
                "topk": r"--topk must be at least 1, got 0",
                "input size of an export": r".*student\.onnx was exported with --input-size 32, not 64",
                "missing config": r".*copy\.safetensors\.json not found: export\.py writes it beside every "
                                  r"exported file.*",
                "not a timm folder": r"local-dir:.*images: .*images holds no config\.json, so it is not a timm "
                                     r"folder \(export\.py --format timm writes one\)",
                "input size of a timm folder": r"--input-size is for checkpoints: the config\.json of "
                                               r"local-dir:.*student gives it",
                "hub offline": r"could not load hf-hub:my-org/absent through timm: the model hub cannot be reached "
                               r"and the model is not cached"}[case]
    if case == "no readable image":
        argv = [folder / "truncated.png", folder / "absent.png"]
    elif case == "topk":
        argv += ["--topk", 0]
    elif case == "input size of an export":
        model, argv = exported["onnx"], argv + ["--input-size", 64]
    elif case == "not a timm folder":
        model = f"local-dir:{folder}"
    elif case == "input size of a timm folder":
        model, argv = f"local-dir:{exported['timm']}", argv + ["--input-size", IMAGE_SIZE]
    elif case == "hub offline":  # HF_HUB_OFFLINE, and an empty cache: nothing is asked of the network
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        model = "hf-hub:my-org/absent"
    else:
        model = tmp_path / "copy.safetensors"
        shutil.copy(exported["safetensors"], model)
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", model] + argv)
    assert code == 2
    assert stdout == ""
    assert re.search(f"^error: {expected}\n$", stderr, re.M), stderr


def test_released_imagenet_students_use_imagenet_class_names():
    names = class_names_for(None, 1000)
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    assert class_names_for(None, 3) == ["class 0", "class 1", "class 2"]
    assert class_names_for(["a", "b"], 2) == ["a", "b"]


def test_a_trained_checkpoint_names_its_classes(run_main, data_flags, tmp_path, tiny_image_folder,
                                                run_entry_point):
    code, _, stderr = run_main(data_flags + ["--epochs", 1, "--alpha", 0, "--gamma", 0, "--output_dir", tmp_path])
    assert code == 0, stderr
    checkpoint = str(tmp_path / "latest.pth.tar")
    assert safe_torch_load(checkpoint)["class_names"] == list(CLASSES)
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", checkpoint, f"{tiny_image_folder}/val/fox"])
    assert code == 0, stderr
    predictions = parse(stdout)
    assert len(predictions) == 2
    assert all(sorted(name for _, name in classes) == sorted(CLASSES) for classes in predictions.values())


class WritesMarker:
    """A pickle whose loading writes a file: what a crafted export could run instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_program(source, target, marker):
    """A copy of the .pt2 export ``source`` (and its config) whose sample inputs are replaced by a pickle that
    writes ``marker``: torch.export.load unpickles them with weights_only=False."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as crafted:
        for item in original.infolist():
            content = original.read(item.filename)
            if item.filename.endswith("data/sample_inputs/model.pt"):
                content = pickle.dumps(WritesMarker(marker))
            crafted.writestr(item.filename, content)
    shutil.copy(config_path(source), config_path(str(target)))


def test_a_pt2_file_is_refused_unless_trusted_so_a_crafted_one_runs_nothing(exported, image_folder, tmp_path,
                                                                            run_entry_point):
    folder, _ = image_folder
    marker, crafted = tmp_path / "marker", tmp_path / "crafted.pt2"
    crafted_program(exported["torch-export"], crafted, marker)
    for model in (crafted, exported["torch-export"]):
        code, stdout, stderr = run_entry_point(predict, ["--checkpoint", model, folder / "0.png"])
        assert code == 2 and stdout == ""
        assert re.fullmatch(r"error: .*\.pt2: loading a torch\.export program can run code .* only with --trust-pt2, "
                            r"for files you made; from anyone else, use an ONNX or safetensors export, or a timm "
                            r"folder \(model\.safetensors with its config\.json\)\n", stderr)
        assert not marker.exists()
    # The crafted file does run its payload when trusted: the refusal above is what kept it from running.
    code, _, stderr = run_entry_point(predict, ["--checkpoint", crafted, "--trust-pt2", folder / "0.png"])
    assert code == 2 and marker.exists()
    assert re.fullmatch(r"error: could not load torch\.export file .*crafted\.pt2: .*\n", stderr)


def test_images_are_read_one_batch_at_a_time(tiny_student_files, image_folder, monkeypatch):
    folder, _ = image_folder
    paths = [str(folder / name) for name in ("0.png", "truncated.png", "1.png", "2.png", "0.png")]
    read = []

    def counting_read_image(path):
        read.append(path)
        return read_image(path)

    monkeypatch.setattr(predict, "read_image", counting_read_image)
    logits_of, config = load_classifier(tiny_student_files.ours)
    warnings = []
    images_read_at_each_result = [(path, len(read)) for path, _ in predict.predict(
        logits_of, config, paths, topk=1, batch_size=2, warn=warnings.append)]
    # The first batch (two readable images, the unreadable one between them skipped) is predicted before the
    # rest is read.
    assert images_read_at_each_result == [(paths[0], 3), (paths[2], 3), (paths[3], 5), (paths[4], 5)]
    assert len(warnings) == 1 and warnings[0].startswith(f"{paths[1]}: not a readable image")


@pytest.mark.parametrize("export_format", ["onnx", "torch-export", "safetensors"])
@pytest.mark.parametrize("edit", ["too few class names", "input size as text", "another input size"])
def test_an_edited_config_is_one_line(edit, export_format, exported, image_folder, tmp_path, run_entry_point):
    folder, _ = image_folder
    model = str(tmp_path / os.path.basename(exported[export_format]))
    shutil.copy(exported[export_format], model)
    with open(config_path(exported[export_format])) as handle:
        config = json.load(handle)
    key, value, expected = {
        "too few class names": ("class_names", list(CLASSES[:2]), r"class_names has 2 names for 3 classes: write it "
                                                                  r"again with export\.py"),
        "input size as text": ("input_size", "32", r"input_size is '32', not a positive integer: write it again "
                                                         r"with export\.py"),
        "another input size": ("input_size", 64, r"says input_size 64, but .* takes 32x32 images: write the config "
                                                 r"again with export\.py"
                               if export_format != "safetensors" else
                               r"does not fit DistilledVisionTransformer: shape mismatch: pos_embed .*; .*\.json may "
                               r"not describe it: write it again with export\.py"),
    }[edit]
    with open(config_path(model), "w") as handle:
        json.dump(dict(config, **{key: value}), handle)
    trust = ["--trust-pt2"] if export_format == "torch-export" else []
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", model, "--topk", 3, folder / "0.png"] + trust)
    assert code == 2 and stdout == ""
    assert re.fullmatch(f"error: .*{expected}\n", stderr), stderr


def test_a_truncated_pt2_is_one_line(exported, image_folder, tmp_path):
    folder, _ = image_folder
    truncated = tmp_path / "truncated.pt2"
    with open(exported["torch-export"], "rb") as handle:
        truncated.write_bytes(handle.read()[:4096])
    shutil.copy(config_path(exported["torch-export"]), config_path(str(truncated)))
    # A process of its own: torch logs through a handler made when it was imported, which capsys does not see.
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(truncated), "--trust-pt2",
                             str(folder / "0.png")], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"error: could not load torch\.export file .*truncated\.pt2: .*\n", result.stderr), \
        result.stderr
