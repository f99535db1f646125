"""Images read where a person points predict.py, export.py's check or training: 16-bit PNGs scaled to 8 bits
rather than clipped, in all three; a folder whose links loop listed once and at once; a huge image without
PIL's two-line warning; a FIFO named for what it is."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import IMAGE_SIZE, REPO
from PIL import Image

import datasets
import export
import predict
from models.inference import read_image
from vkd.data.folders import build_image_folder, to_rgb

SIXTEEN_BIT_LEVELS = np.linspace(0, 65535, IMAGE_SIZE * IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE).astype(np.uint16)
EIGHT_BIT_TWIN = np.round(SIXTEEN_BIT_LEVELS / 257).astype(np.uint8)  # 257 * n is level n


@pytest.fixture
def gradient_roots(tmp_path):
    """{bits: root} of an ImageFolder (``val/gradient/image.png``) holding a grey gradient as a 16-bit PNG and
    as its 8-bit twin."""
    roots = {}
    for bits, pixels in ((16, SIXTEEN_BIT_LEVELS), (8, EIGHT_BIT_TWIN)):
        folder = tmp_path / f"{bits}_bits" / "val" / "gradient"
        folder.mkdir(parents=True)
        Image.fromarray(pixels).save(folder / "image.png")
        roots[bits] = tmp_path / f"{bits}_bits"
    assert Image.open(roots[16] / "val" / "gradient" / "image.png").mode == "I;16"
    return roots


def test_a_16_bit_png_reads_as_its_8_bit_twin_in_predict_export_and_training(gradient_roots):
    paths = {bits: str(root / "val" / "gradient" / "image.png") for bits, root in gradient_roots.items()}
    # predict.py
    predicted = {bits: np.asarray(read_image(path), dtype=np.int16) for bits, path in paths.items()}
    assert np.abs(predicted[16] - predicted[8]).max() <= 1
    assert np.array_equal(predicted[8][..., 0], EIGHT_BIT_TWIN)
    # export.py's check on --check-images (normalised: one level is 1 / 255 / std)
    config = dict(input_size=IMAGE_SIZE, eval_crop_ratio=0.875)
    checked = {bits: export.check_batches(config, str(root))[1] for bits, root in gradient_roots.items()}
    assert checked[16][0] == f"1 images of {gradient_roots[16]}"
    assert (checked[16][1] - checked[8][1]).abs().max() <= 1.01 / 255 / min(datasets.IMAGENET_STD)
    # training's (and generation's) ImageFolder loader
    loaded = {bits: build_image_folder(str(root), is_train=False, transform=np.asarray, strict=True)[0][0][0]
              for bits, root in gradient_roots.items()}
    assert np.abs(loaded[16].astype(np.int16) - loaded[8]).max() <= 1


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16_bit_grey_mode_is_scaled(mode):
    if mode == "I":
        image = Image.fromarray(SIXTEEN_BIT_LEVELS).convert("I")
    else:
        image = Image.fromarray(SIXTEEN_BIT_LEVELS.astype(">u2" if mode == "I;16B" else "<u2"))
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image), dtype=np.int16)
    assert all(np.abs(rgb[..., channel] - EIGHT_BIT_TWIN).max() <= 1 for channel in range(3))


LIST_IMAGES = "import json, sys; from models.inference import image_files; print(json.dumps(image_files(sys.argv[1])))"


@pytest.mark.slow
def test_a_folder_whose_links_loop_lists_each_image_once(tmp_path):
    root = tmp_path / "images"
    for folder in (root / "a", root / "b"):
        folder.mkdir(parents=True)
    for path in (root / "0.png", root / "a" / "1.png", root / "b" / "2.png"):
        Image.fromarray(EIGHT_BIT_TWIN).save(path)
    os.symlink(".", root / "self")  # a link back to its own folder
    os.symlink("../b", root / "a" / "to_b")  # two folders linking to each other
    os.symlink("../a", root / "b" / "to_a")
    # A process of its own, so that a walk that never ends fails the test instead of hanging it.
    result = subprocess.run([sys.executable, "-c", LIST_IMAGES, str(root)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == [str(root / "0.png"), str(root / "a" / "1.png"), str(root / "b" / "2.png")]


def test_a_huge_image_is_read_without_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(EIGHT_BIT_TWIN).save(path)
    # Over PIL's decompression-bomb limit, under twice it (where PIL refuses to decode): PIL warns in two lines.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", IMAGE_SIZE * IMAGE_SIZE * 2 // 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(str(path))
    assert [str(warning.message) for warning in caught] == []
    assert np.array_equal(np.asarray(image)[..., 0], EIGHT_BIT_TWIN)


def test_a_fifo_is_named_as_such(tiny_student_files, tmp_path, run_entry_point):
    image, fifo = tmp_path / "image.png", tmp_path / "fifo.png"
    Image.fromarray(EIGHT_BIT_TWIN).save(image)
    os.mkfifo(fifo)
    code, stdout, stderr = run_entry_point(predict, ["--checkpoint", tiny_student_files.ours, fifo, image])
    assert code == 0 and stdout.startswith(f"{image}\n")
    assert stderr == f"warning: skipped {fifo}: not a regular file (a FIFO, a socket or a device)\n"
    code, _, stderr = run_entry_point(predict, ["--checkpoint", fifo, image])
    assert (code, stderr) == (2, f"error: {fifo}: not a regular file (a FIFO, a socket or a device)\n")
