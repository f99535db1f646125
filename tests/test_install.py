"""Installing the project adds only its own name, ``vkd``, to site-packages: no top-level ``datasets``,
``utils``, ``config``... that would shadow other projects' packages (Hugging Face's ``datasets``). In a Python
with only that install (no clone on its path), ``import vkd.models`` lets timm load the timm folder of a DeiT
student, as it loads a plain timm student's, with the checkpoint's evaluation logits and preprocessing."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, IMAGE_SIZE
from PIL import Image

import export
import models
from models.inference import eval_transform, load_checkpoint_student
from vkd.checkpoints import add_ddp_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "runs", "output", "build", "*.egg-info", "__pycache__")
LOGITS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory) -> str:
    """``pip install --target`` of a copy of the clone, once for the module (it takes about 20 s)."""
    root = tmp_path_factory.mktemp("install")
    source, target = root / "source", root / "site-packages"
    shutil.copytree(REPO, source, ignore=NOT_COPIED, symlinks=True)  # pip builds in place: keep the clone clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return str(target)


def run_installed(site_packages: str, code: str, cwd, *arguments) -> str:
    """``code`` in a Python whose path holds the install and the virtual environment, not the clone."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], cwd=cwd, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=site_packages, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_an_install_puts_only_vkd_into_site_packages(site_packages, tmp_path):
    top_level = {name for name in os.listdir(site_packages) if not name.endswith(".dist-info")}
    assert top_level == {"vkd"}
    installed = {os.path.relpath(os.path.join(folder, name), site_packages)
                 for folder, _, files in os.walk(os.path.join(site_packages, "vkd")) for name in files
                 if name.endswith(".py")}
    assert {"vkd/__init__.py", "vkd/projector.py", "vkd/models.py", "vkd/data/__init__.py",
            "vkd/data/folders.py"} <= installed
    probe = "import vkd, vkd.data.folders; print(vkd.OrthogonalProjector.__module__)"
    assert run_installed(site_packages, probe, tmp_path).strip() == "vkd.projector"


# Loads each folder through timm alone and writes its logits on the inputs and its preprocessing of the image.
LOAD_WITH_TIMM = """
import importlib.util, sys, timm, torch, vkd.models
from PIL import Image
from timm.data import create_transform, resolve_data_config
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("export") is None
assert vkd.models.__file__.startswith(sys.argv[1])
inputs, image = torch.load(sys.argv[2]), Image.open(sys.argv[3])
results = []
for folder in sys.argv[5:]:
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    with torch.no_grad():
        logits = model(inputs)
    results.append((logits, create_transform(**resolve_data_config({}, model=model))(image)))
torch.save(results, sys.argv[4])
"""


@pytest.fixture(scope="module")
def timm_student_checkpoint(tmp_path_factory) -> str:
    """A random 3-class resnet18 at 32 px with its projector, as training saves a student (run args included)."""
    torch.manual_seed(0)
    student = models.create_student("resnet18", num_classes=len(CLASSES), img_size=IMAGE_SIZE, teacher_dim=64)
    path = str(tmp_path_factory.mktemp("resnet18") / "latest.pth.tar")
    torch.save({"student": add_ddp_prefix(student.state_dict()), "class_names": list(CLASSES),
                "args": {"student_model": "resnet18", "input_size": IMAGE_SIZE}}, path)
    return path


@pytest.mark.slow
def test_timm_folders_load_with_only_the_installed_package(site_packages, tiny_student_files, timm_student_checkpoint,
                                                          tmp_path):
    """The DeiT student of our checkpoint and of the released layout, and a plain timm student: timm gives the
    checkpoint's evaluation logits, and its data config the evaluation preprocessing (of an image of another
    size, so that the resize is exercised)."""
    exported = {"ours": (tiny_student_files.ours, None), "released": (tiny_student_files.released, IMAGE_SIZE),
                "resnet18": (timm_student_checkpoint, None)}
    for name, (checkpoint, input_size) in exported.items():
        export.export_timm_folder(checkpoint, str(tmp_path / name), input_size=input_size, log=lambda line: None)
    inputs = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "inputs.pt")
    pixels = np.random.RandomState(4).randint(0, 256, (27, 45, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    run_installed(site_packages, LOAD_WITH_TIMM, tmp_path, site_packages, "inputs.pt", "image.png", "results.pt",
                  *exported)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for (name, (checkpoint, input_size)), (logits, preprocessed) in zip(exported.items(), results):
        student, config = load_checkpoint_student(checkpoint, input_size=input_size)
        with torch.no_grad():
            expected = student(inputs)
        assert (logits - expected).abs().max() <= LOGITS_TOLERANCE, name
        assert not torch.equal(logits[0], logits[1])  # not a constant: the weights were loaded
        evaluated = eval_transform(config)(Image.open(tmp_path / "image.png"))
        assert preprocessed.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert (preprocessed - evaluated).abs().max() <= 1e-6, name
