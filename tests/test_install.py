"""Installing the project adds only its own name, ``vkd``, to site-packages: no top-level ``datasets``,
``utils``, ``config``... that would shadow other projects' packages (Hugging Face's ``datasets``)."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "runs", "output", "build", "*.egg-info", "__pycache__")


def test_an_install_puts_only_vkd_into_site_packages(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site-packages"
    shutil.copytree(REPO, source, ignore=NOT_COPIED, symlinks=True)  # pip builds in place: keep the clone clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    top_level = {name for name in os.listdir(target) if not name.endswith(".dist-info")}
    assert top_level == {"vkd"}
    installed = {os.path.relpath(os.path.join(folder, name), target)
                 for folder, _, files in os.walk(target / "vkd") for name in files if name.endswith(".py")}
    assert {"vkd/__init__.py", "vkd/projector.py", "vkd/data/__init__.py", "vkd/data/folders.py"} <= installed
    probe = "import vkd, vkd.data.folders; print(vkd.OrthogonalProjector.__module__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "vkd.projector"
