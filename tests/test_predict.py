"""predict.py: the top classes of images written here, from a checkpoint of either layout and from each exported
format, against the PyTorch student's probabilities; unreadable images and bad flags."""
import io
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE
from PIL import Image

import datasets
import export
import predict
from models.inference import class_names_for, load_classifier, read_image
from vkd.checkpoints import safe_torch_load

IMAGES = 3
PRINTED_PROBABILITY = 1e-4  # printed with 4 decimals, from logits within export.CHECK_TOLERANCE


@pytest.fixture(scope="module")
def exported(tiny_student_files, tmp_path_factory):
    """Our tiny checkpoint exported to every format: {format: path}."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {}
    for export_format, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2"), ("safetensors", ".safetensors")):
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


@pytest.mark.parametrize("source", ["checkpoint", "released checkpoint", "onnx", "torch-export", "safetensors"])
def test_top_classes_match_pytorch(source, tiny_student_files, exported, image_folder, run_entry_point):
    folder, pixels = image_folder
    model, flags, names = {
        "checkpoint": (tiny_student_files.ours, [], CLASSES),
        "released checkpoint": (tiny_student_files.released, ["--input-size", IMAGE_SIZE], ("class 0", "class 1",
                                                                                             "class 2")),
    }.get(source, (exported.get(source), [], CLASSES))
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


@pytest.mark.parametrize("case", ["no readable image", "topk", "input size of an export", "missing config"])
def test_bad_input_exits_2(case, tiny_student_files, exported, image_folder, run_entry_point, tmp_path):
    folder, _ = image_folder
    model, argv = tiny_student_files.ours, [folder / "0.png"]
    expected = {"no readable image": r"no image could be predicted \(2 file\(s\) tried\)",
                "topk": r"--topk must be at least 1, got 0",
                "input size of an export": r".*student\.onnx was exported with --input-size 32, not 64",
                "missing config": r".*copy\.safetensors\.json not found: export\.py writes it beside every "
                                  r"exported file.*"}[case]
    if case == "no readable image":
        argv = [folder / "truncated.png", folder / "absent.png"]
    elif case == "topk":
        argv += ["--topk", 0]
    elif case == "input size of an export":
        model, argv = exported["onnx"], argv + ["--input-size", 64]
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
