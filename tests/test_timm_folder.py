"""export.py --format timm: a folder timm loads as its own (config.json, model.safetensors, a model card filled
from the run folder), written and replaced as safely as the other formats, and uploaded to the Hub through
huggingface_hub (replaced here by fakes: no network). That it loads in a Python with only the installed package
is tests/test_install.py's."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import CLASSES, IMAGE_SIZE, REPO
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform

import datasets
import export
import models
import vkd.models
from models.inference import eval_transform, timm_data_config
from models.model_card import NO_RUN_ARGS, VKD_CITATION
from vkd.checkpoints import file_sha256

TEACHER_SHA256 = "ab" * 32


def export_folder(checkpoint, out, *extra):
    return ["--checkpoint", checkpoint, "--format", "timm", "--out", out] + [str(item) for item in extra]


def front_matter_and_body(card: str):
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


# ----------------------------------------------------------------------------- the architecture's home


def test_the_deit_students_have_one_home_in_the_installed_package():
    assert models.DistilledVisionTransformer is vkd.models.DistilledVisionTransformer
    assert not os.path.exists(os.path.join(REPO, "models", "deit.py"))
    probe = "import sys, vkd; print(sorted(m for m in ('vkd.models', 'timm') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"  # import vkd stays torch-only


def test_the_deit_constructors_take_what_a_timm_folder_passes():
    model = timm.create_model("deit_ti_distilled", num_classes=3, img_size=[IMAGE_SIZE, IMAGE_SIZE],
                              eval_head="cls", global_pool="token", in_chans=3).eval()
    assert (model.num_patches, model.eval_head) == ((IMAGE_SIZE // 16) ** 2, "cls")
    inputs = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(model(inputs), model.head(model.forward_features(inputs)[0]))
    with pytest.raises(ValueError, match="unknown eval head 'dist'"):
        timm.create_model("deit_ti_distilled", eval_head="dist")


# ----------------------------------------------------------------------------- the folder


def test_a_timm_folder_holds_timms_config_the_weights_and_a_card(run_entry_point, tiny_student_files, tmp_path):
    out = tmp_path / "student"
    code, stdout, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out))
    assert code == 0, stderr
    assert re.search(r"^Check against the PyTorch student, max \|logits difference\|: 0\.00e\+00 on 3 random inputs, "
                     r"0\.00e\+00 on 16 scikit-learn digits images", stdout, re.M)
    assert re.search(r"^Check of timm's preprocessing .*: max \|difference\| 0\.00e\+00 on 16 images$", stdout, re.M)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["student"]  # no temporary left
    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["label_names"]) == ("deit_ti_distilled", 3,
                                                                                       list(CLASSES))
    assert {key: config["model_args"][key] for key in ("img_size", "eval_head", "num_classes")} == {
        "img_size": [IMAGE_SIZE, IMAGE_SIZE], "eval_head": "mean", "num_classes": 3}
    pretrained_cfg = config["pretrained_cfg"]
    assert {key: pretrained_cfg[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean",
                                                 "std")} == {
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
        "crop_mode": "squash", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    # Nothing of timm's own pretrained weights for the architecture (their tag, URL, paper) is claimed.
    assert not {"tag", "url", "hf_hub_id", "paper_ids", "origin_url"} & set(pretrained_cfg)
    weights = load_file(out / "model.safetensors")
    expected = {key: value for key, value in tiny_student_files.student.state_dict().items()
                if not key.startswith("projector.")}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], value) for key, value in expected.items())
    front, body = front_matter_and_body((out / "README.md").read_text())
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0"
    assert {"image-classification", "knowledge-distillation"} <= set(front["tags"])
    assert front["datasets"] == ["imagenet-1k"]  # the tiny run's arguments are the defaults: --data-set IMNET
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in body and "import vkd.models" in body


def test_a_student_evaluated_on_its_cls_head_keeps_that_head_in_timm(run_entry_point, tiny_student_files, tmp_path):
    content = torch.load(tiny_student_files.ours, weights_only=True)
    content["args"] = dict(content["args"], eval_head="cls")
    checkpoint = tmp_path / "cls_head.pth.tar"
    torch.save(content, checkpoint)
    code, _, stderr = run_entry_point(export, export_folder(checkpoint, tmp_path / "cls"))
    assert code == 0, stderr
    loaded = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    inputs = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        cls_token = tiny_student_files.student.forward_features(inputs)[0]
        assert torch.equal(loaded(inputs), tiny_student_files.student.head(cls_token))


@pytest.mark.parametrize("input_size, crop_ratio", [(16, 0.875), (32, 0.875), (48, 0.875), (224, 0.875), (224, 0.9)])
def test_timms_data_config_is_the_evaluation_transform(input_size, crop_ratio):
    config = dict(input_size=input_size, eval_crop_ratio=crop_ratio, mean=list(datasets.IMAGENET_MEAN),
                  std=list(datasets.IMAGENET_STD))
    timm_transform, evaluation = create_transform(**timm_data_config(config)), eval_transform(config)
    generator = np.random.RandomState(input_size)
    for height, width in ((300, 200), (20, 50), (input_size, input_size)):
        image = Image.fromarray(generator.randint(0, 256, (height, width, 3), dtype=np.uint8))
        assert torch.equal(timm_transform(image), evaluation(image)), (height, width)


def test_a_timm_folder_of_the_released_layout_needs_its_input_size(run_entry_point, tiny_student_files, tmp_path):
    out = tmp_path / "released"
    code, _, stderr = run_entry_point(export, export_folder(tiny_student_files.released, out, "--input-size",
                                                            IMAGE_SIZE))
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["class 0", "class 1", "class 2"]


# ----------------------------------------------------------------------------- the model card


def write_run_folder(folder, checkpoint, epochs_logged=(0,)):
    """A run folder as main_distributed.py leaves it: the checkpoint (saved after epoch 0), args.json of a first
    invocation and a resume, and log.txt (with a line torn by a kill at its end)."""
    folder.mkdir()
    shutil.copy(checkpoint, folder / "latest.pth.tar")
    first = ["--teacher", "resnet10t", "--teacher-path", "/data/teacher.pth", "--output_dir", str(folder)]
    (folder / "args.json").write_text(json.dumps({
        "args": {"teacher": "resnet10t"}, "command": first,
        "teacher_weights": {"source": "/data/teacher.pth", "sha256": TEACHER_SHA256},
        "invocations": [{"command": first}, {"command": first + ["--resume", "auto"]}]}))
    lines = [json.dumps({"epoch": epoch, "val_acc1": 91.25 + epoch, "val_acc5": 99.5, "val_images": 7})
             for epoch in epochs_logged]
    (folder / "log.txt").write_text("\n".join(lines) + '\n{"epoch": 1, "val_a')
    return folder / "latest.pth.tar"


def card_of(run_entry_point, checkpoint, out, *extra) -> str:
    code, _, stderr = run_entry_point(export, export_folder(checkpoint, out, *extra))
    assert code == 0, stderr
    return (out / "README.md").read_text()


def test_the_model_card_is_filled_from_the_run_folder(run_entry_point, tiny_student_files, tmp_path):
    checkpoint = write_run_folder(tmp_path / "run", tiny_student_files.ours)
    _, body = front_matter_and_body(card_of(run_entry_point, checkpoint, tmp_path / "folder"))
    assert "- **Student:** `deit_ti_distilled`, 6.21 M parameters, 32 px input, 3 classes" in body
    assert "- **Teacher:** `regnety_160`, weights `/data/teacher.pth`, sha256 `" + TEACHER_SHA256 + "`" in body
    assert re.search(r"- \*\*Distillation method:\*\* `vkd` \(VkD, Miles, Elezi, Deng, CVPR 2024\): .*; settings: "
                     r"alpha=1\.0, gamma=1\.0, temperature=1\.0, projector='orthogonal', normalisation='layernorm'",
                     body)
    assert ("- **Data and schedule:** ImageNet-1k (`--data-set IMNET`), 32 px; epochs: 1 (this checkpoint: after "
            "epoch 1)") in body
    assert "- **Evaluation:** top-1 91.25%, top-5 99.50% (log.txt, epoch 0, 7 validation images)" in body
    assert f"- **Checkpoint:** `latest.pth.tar`, sha256 `{file_sha256(str(checkpoint))}`" in body
    command = (f"python main_distributed.py --teacher resnet10t --teacher-path /data/teacher.pth "
               f"--output_dir {tmp_path}/run")
    assert f"{command}\n{command} --resume auto\n" in body
    assert body.endswith(f"## Citation\n\n```bibtex\n{VKD_CITATION}\n```\n")


def test_an_evaluation_of_the_checkpoint_comes_before_its_training_log(run_entry_point, tiny_student_files, tmp_path):
    checkpoint = write_run_folder(tmp_path / "run", tiny_student_files.ours)
    (tmp_path / "run" / "eval_results.json").write_text(json.dumps(
        {"acc1": 88.0, "acc5": 97.0, "images": 7, "checkpoint": str(checkpoint)}))
    body = card_of(run_entry_point, checkpoint, tmp_path / "evaluated")
    assert "- **Evaluation:** top-1 88.00%, top-5 97.00% (eval_results.json on 7 validation images)" in body
    # An evaluation of another checkpoint says nothing of this one.
    (tmp_path / "run" / "eval_results.json").write_text(json.dumps(
        {"acc1": 12.0, "acc5": 30.0, "checkpoint": str(tmp_path / "run" / "best.pth.tar")}))
    assert "top-1 91.25%" in card_of(run_entry_point, checkpoint, tmp_path / "other")


def test_a_card_says_what_is_not_known(run_entry_point, tiny_student_files, tmp_path):
    # Validated at another epoch only: the last line's accuracy is not this checkpoint's.
    checkpoint = write_run_folder(tmp_path / "run", tiny_student_files.ours, epochs_logged=(3,))
    body = card_of(run_entry_point, checkpoint, tmp_path / "other epoch")
    assert "- **Evaluation:** not known: no eval_results.json of this checkpoint and no validation of its epoch" in body
    # A released checkpoint alone: no arguments, no run folder.
    _, body = front_matter_and_body(card_of(run_entry_point, tiny_student_files.released, tmp_path / "released",
                                            "--input-size", IMAGE_SIZE))
    for field in ("Teacher", "Distillation method", "Data and schedule"):
        assert f"- **{field}:** {NO_RUN_ARGS}\n" in body
    assert "- **Evaluation:** not known" in body
    assert "## Training command\n\nNot known: no readable args.json beside the checkpoint." in body


def test_the_card_cites_vkd_as_the_readme_does():
    with open(os.path.join(REPO, "README.md")) as handle:
        assert f"```bibtex\n{VKD_CITATION}\n```" in handle.read()


# ----------------------------------------------------------------------------- replacing a folder


def test_an_existing_folder_is_replaced_only_with_overwrite(run_entry_point, tiny_student_files, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, stdout, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out))
    assert code == 2 and stdout == ""
    assert re.fullmatch(rf"error: {re.escape(str(out))} already exists: pass --overwrite to replace it .*\n", stderr)
    assert os.listdir(out) == ["config.json"]
    code, _, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out, "--overwrite"))
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["student"]  # neither the temporary nor the previous folder is left


@pytest.mark.parametrize("case", ["not a timm folder", "holds the checkpoint", "a file", "a link"])
def test_an_out_that_must_not_be_replaced_is_refused(case, run_entry_point, tiny_student_files, tmp_path):
    out, checkpoint = tmp_path / "out", tiny_student_files.ours
    expected = {"not a timm folder": r"--out .*out is not a timm folder \(it has no config\.json\): --overwrite "
                                     r"replaces only a folder export\.py wrote; choose another --out",
                "holds the checkpoint": r"--out .*out holds the checkpoint .*latest\.pth\.tar: choose another --out",
                "a file": r"--out .*out is a file: give the path of a new folder .*",
                "a link": r"--out .*out is a link: give the path of a new folder .*"}[case]
    if case == "a file":
        out.write_text("notes")
    elif case == "a link":
        (tmp_path / "target").mkdir()
        os.symlink(tmp_path / "target", out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if case == "holds the checkpoint":
            (out / "config.json").write_text("{}")
            checkpoint = shutil.copy(checkpoint, out / "latest.pth.tar")
    before = sorted(os.listdir(out)) if out.is_dir() else None
    code, stdout, stderr = run_entry_point(export, export_folder(checkpoint, out, "--overwrite"))
    assert code == 2 and stdout == ""
    assert re.fullmatch(f"error: {expected}\n", stderr), stderr
    assert (sorted(os.listdir(out)) if out.is_dir() else None) == before


def test_a_failed_check_keeps_the_previous_folder(run_entry_point, tiny_student_files, tmp_path, monkeypatch):
    out = tmp_path / "student"
    code, _, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out))
    assert code == 0, stderr
    previous = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # no difference is small enough
    code, _, stderr = run_entry_point(export, export_folder(tiny_student_files.released, out, "--overwrite",
                                                            "--input-size", IMAGE_SIZE))
    assert code == 1
    assert re.fullmatch(rf"error: the exported student's logits differ .*; the previous {re.escape(str(out))} is "
                        rf"kept\n", stderr)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == previous
    assert sorted(os.listdir(tmp_path)) == ["student"]


# ----------------------------------------------------------------------------- to the Hub


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's create_repo and upload_folder replaced by fakes that record their calls (and what the
    folder held when it was uploaded), a token in the usual place, and no proxy to reach anything through."""
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(**kwargs):
        calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_secretTokenThatIsNeverShown")
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return calls


def test_push_to_hub_uploads_the_checked_folder_privately(run_entry_point, tiny_student_files, tmp_path, hub,
                                                          monkeypatch):
    monkeypatch.setattr(export, "reachable", lambda url: True)
    out = tmp_path / "student"
    code, stdout, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out, "--push-to-hub",
                                                                 "my-org/deit-ti-vkd"))
    assert code == 0, stderr
    assert hub == [("create_repo", "my-org/deit-ti-vkd", {"private": True, "exist_ok": True}),
                   ("upload_folder", {"repo_id": "my-org/deit-ti-vkd", "folder_path": str(out),
                                      "commit_message": "A student distilled and exported by VkD's export.py"},
                    ["README.md", "config.json", "model.safetensors"])]
    assert 'timm.create_model("hf-hub:my-org/deit-ti-vkd", pretrained=True)' in (out / "README.md").read_text()
    assert "Uploaded" in stdout.splitlines()[-1] and os.environ["HF_TOKEN"] not in stdout + stderr


def test_an_unreachable_hub_is_one_line_and_exit_2_and_the_folder_stays(run_entry_point, tiny_student_files,
                                                                        tmp_path, hub, monkeypatch):
    with socket.socket() as probe:  # a local port nothing listens on: refused at once, no network involved
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    out = tmp_path / "student"
    started = time.monotonic()
    code, stdout, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, out, "--push-to-hub",
                                                                 "my-org/deit-ti-vkd"))
    assert code == 2 and time.monotonic() - started < 30
    assert re.fullmatch(rf"error: the Hugging Face Hub \(http://127\.0\.0\.1:{port}\) cannot be reached; "
                        rf"{re.escape(str(out))} is kept; upload it later with: hf upload my-org/deit-ti-vkd "
                        rf"{re.escape(str(out))}\n", stderr)
    assert hub == [] and sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]


def test_a_refused_upload_is_one_line_without_the_token(run_entry_point, tiny_student_files, tmp_path, hub,
                                                        monkeypatch):
    class Unauthorized(Exception):
        response = type("Response", (), {"status_code": 401})()

    def create_repo(repo_id, **kwargs):
        raise Unauthorized(f"401 Client Error: token {os.environ['HF_TOKEN']} is not valid\nmore detail")

    monkeypatch.setattr(export, "reachable", lambda url: True)
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    code, stdout, stderr = run_entry_point(export, export_folder(tiny_student_files.ours, tmp_path / "student",
                                                                 "--push-to-hub", "my-org/deit-ti-vkd"))
    assert code == 2
    assert re.fullmatch(r"error: the Hub refused the upload to my-org/deit-ti-vkd \(401 Client Error: token \*\*\* "
                        r"is not valid\): log in with `hf auth login` or set HF_TOKEN .*\n", stderr), stderr
    assert os.environ["HF_TOKEN"] not in stdout + stderr


@pytest.mark.parametrize("argv, expected", [
    (["--format", "onnx", "--out", "s.onnx", "--push-to-hub", "org/name"],
     "--push-to-hub uploads a timm folder: add --format timm"),
    (["--format", "timm", "--out", "s", "--push-to-hub", "no-organisation"],
     "--push-to-hub no-organisation: not a Hub repository name; give ORG/NAME .*"),
    (["--format", "timm", "--out", "s", "--public"], "--public applies to --push-to-hub ORG/NAME"),
])
def test_push_flags_are_checked_before_any_work(argv, expected, run_entry_point, tiny_student_files, tmp_path,
                                                monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_entry_point(export, ["--checkpoint", tiny_student_files.ours] + argv)
    assert code == 2 and stdout == ""
    assert re.fullmatch(f"error: {expected}\n", stderr), stderr
    assert os.listdir(tmp_path) == [] and hub == []
