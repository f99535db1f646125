"""Downloads where there is a network, one clear line where there is none: CIFAR (``--download``), the CLIP
teacher (open_clip's ``openai`` weights) and torch-fidelity's Inception weights.

Hermetic: every connection attempt and name lookup fails at once (``no_network``), the download caches are
empty folders of tmp_path, and the tests that need a download replace the library's download function."""
import errno
import hashlib
import os
import pickle
import socket
import time
import urllib.error
import urllib.parse

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
from huggingface_hub import constants as hub
from torchvision.datasets import CIFAR100
from torchvision.datasets import cifar as torchvision_cifar

import config
import datasets
from generation import fid, teachers
from generation import main as gan_main
from vkd import downloads
from vkd.data import cifar
from vkd.errors import BadInput, CheckpointError, DatasetError

DEADLINE_S = 20  # the longest an offline failure may take
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CLIP_REPOSITORY = "timm/vit_base_patch32_clip_224.openai"


def unreachable(*args, **kwargs):
    raise OSError(errno.ENETUNREACH, "Network is unreachable")


def unresolvable(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No connection, no name lookup, no proxy; empty Hugging Face and torch.hub caches; one thread."""
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machines running the tests are small and shared
    yield
    torch.set_num_threads(threads)


class Connection:
    def close(self):
        pass


@pytest.fixture
def probes(monkeypatch):
    """The reachability probe succeeds; returns the (host, port) pairs it connected to."""
    seen = []

    def connect(address, timeout=None, *args, **kwargs):
        seen.append(address)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    return seen


def write_tiny_cifar(root, num_classes: int, per_file: int = 4) -> None:
    """Random CIFAR files in torchvision's layout, ``per_file`` images in each batch file."""
    dataset_class, folder = cifar.CIFAR_VERSIONS[num_classes]
    os.makedirs(os.path.join(root, folder))
    generator = np.random.RandomState(0)
    labels = "labels" if num_classes == 10 else "fine_labels"
    for name, _ in dataset_class.train_list + dataset_class.test_list:
        batch = {"data": generator.randint(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),
                 labels: [index % num_classes for index in range(per_file)]}
        with open(os.path.join(root, folder, name), "wb") as handle:
            pickle.dump(batch, handle)
    with open(os.path.join(root, folder, dataset_class.meta["filename"]), "wb") as handle:
        pickle.dump({dataset_class.meta["key"]: [f"class {index}" for index in range(num_classes)]}, handle)


@pytest.fixture
def tiny_files_pass_checks(monkeypatch):
    """torchvision accepts the tiny files: present is intact (their checksums are not the real ones)."""
    monkeypatch.setattr(torchvision_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.fixture
def fake_cifar_download(monkeypatch, tiny_files_pass_checks):
    """torchvision's CIFAR download replaced by one that writes tiny files; returns the calls it got."""
    calls = []

    def download_and_extract_archive(url, download_root, filename=None, md5=None, **kwargs):
        calls.append(dict(url=url, root=download_root, filename=filename, md5=md5))
        write_tiny_cifar(download_root, 10 if "cifar-10-" in url else 100)

    monkeypatch.setattr(torchvision_cifar, "download_and_extract_archive", download_and_extract_archive)
    return calls


@pytest.fixture
def tiny_cifar10(tmp_path, tiny_files_pass_checks) -> str:
    root = tmp_path / "cifar10"
    write_tiny_cifar(str(root), 10)  # 20 training and 4 test images
    return str(root)


def tiny_run(data_path, *flags):
    return ["--dataset", "C10", "--data-path", str(data_path), "--g-ch", "2", "--d-ch", "2", "--dim-z", "8",
            "--batch-size", "4", "--num-d-steps", "1", "--iterations", "1", "--ema-start", "1",
            "--fid-extractor", "none", "--device", "cpu", "--print-freq", "1", *flags]


def run_main(argv, capsys):
    """generation/main.py's main() here: (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    try:
        gan_main.main([str(item) for item in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err, time.monotonic() - started


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def raises_in_time(error_type, call, *args):
    """The one-line error ``call(*args)`` raises, after asserting it came within the deadline."""
    started = time.monotonic()
    with pytest.raises(error_type) as error:
        call(*args)
    assert time.monotonic() - started < DEADLINE_S
    assert "\n" not in str(error.value)
    return str(error.value)


# ----------------------------------------------------------------------------- the reachability probe

def hanging_lookup(*args, **kwargs):
    time.sleep(3)
    raise socket.timeout("timed out")


def test_the_probe_gives_up_on_a_hanging_lookup_within_its_timeout(monkeypatch):
    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    started = time.monotonic()
    assert downloads.reachable("https://example.org/file", timeout=0.2) is False
    assert time.monotonic() - started < 1


def test_the_probe_connects_to_the_server_or_to_the_proxy_the_environment_names(monkeypatch, probes):
    assert downloads.reachable("https://www.cs.toronto.edu/~kriz/x.tar.gz") is True
    assert downloads.reachable("http://example.org:8080/x") is True
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert downloads.reachable("https://github.com/x") is True
    monkeypatch.setenv("no_proxy", "github.com")
    assert downloads.reachable("https://github.com/x") is True
    assert probes == [("www.cs.toronto.edu", 443), ("example.org", 8080), ("proxy.example", 3128), ("github.com", 443)]


def test_no_network_means_unreachable_at_once():
    started = time.monotonic()
    assert downloads.reachable("https://huggingface.co") is False
    assert time.monotonic() - started < 1


# ----------------------------------------------------------------------------- CIFAR

def test_offline_cifar_download_is_one_line_naming_the_url_and_the_flag(tmp_path, capsys):
    data = tmp_path / "cifar10"
    code, _, err, seconds = run_main(tiny_run(data, "--download"), capsys)
    line = one_error_line(err)
    assert code == 2 and seconds < DEADLINE_S
    assert ("could not download CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            "(the server cannot be reached)") in line and "--data-path" in line
    assert not data.exists()


def test_without_download_a_missing_cifar_names_the_flag(tmp_path, capsys):
    code, _, err, _ = run_main(tiny_run(tmp_path), capsys)
    line = one_error_line(err)
    assert code == 2 and "cifar-10-batches-py/" in line and "nothing is downloaded without --download" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failure", [urllib.error.URLError("timed out"), ConnectionResetError("reset by peer"),
                                     RuntimeError("File not found or corrupted.")])
def test_a_failing_cifar_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, probes, failure):
    def download_and_extract_archive(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torchvision_cifar, "download_and_extract_archive", download_and_extract_archive)
    message = raises_in_time(DatasetError, cifar.load_cifar, str(tmp_path), 100, True, None, True)
    assert message.startswith("could not download CIFAR-100 from https://www.cs.toronto.edu/~kriz/"
                              "cifar-100-python.tar.gz (") and "--data-path" in message
    assert os.listdir(tmp_path) == []


def test_generation_download_asks_torchvision_for_cifar10_once(tmp_path, capsys, probes, fake_cifar_download):
    data = tmp_path / "new" / "cifar10"
    code, out, err, _ = run_main(tiny_run(data, "--download"), capsys)
    assert code == 0, err
    assert "C10: 20 of 20 training images" in out
    assert len(fake_cifar_download) == 1
    call = fake_cifar_download[0]
    assert (call["url"], call["filename"], call["md5"]) == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a")
    # Unpacked in a scratch folder under --data-path, then moved into place; the scratch folder is gone.
    assert os.path.dirname(call["root"]) == str(data) and os.path.basename(call["root"]).startswith(".download-")
    assert os.listdir(data) == ["cifar-10-batches-py"]
    assert probes == [("www.cs.toronto.edu", 443)]

    # Present and intact: --download reads it and asks nothing of the network.
    assert len(cifar.load_cifar(str(data), 10, False, download=True)) == 4
    assert len(fake_cifar_download) == 1 and len(probes) == 1


def test_classification_download_asks_torchvision_for_cifar100(tmp_path, probes, fake_cifar_download):
    args = datasets.default_data_args(data_set="CIFAR", data_path=str(tmp_path / "cifar100"), download=True,
                                      input_size=32)
    dataset, num_classes = datasets.build_dataset(True, args)
    assert (len(dataset), num_classes) == (4, 100)
    assert [(call["url"], call["md5"]) for call in fake_cifar_download] == [
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]
    assert os.listdir(tmp_path / "cifar100") == ["cifar-100-python"]


def test_classification_download_offline_is_one_line(tmp_path):
    args = datasets.default_data_args(data_set="CIFAR", data_path=str(tmp_path), download=True)
    message = raises_in_time(DatasetError, datasets.build_dataset, True, args)
    assert message.startswith(f"could not download CIFAR-100 from {CIFAR100.url}") and "--data-path" in message


def test_the_download_flag_of_classification(tmp_path):
    args, explicit = config.parse_arguments(["--data-set", "CIFAR", "--data-path", str(tmp_path), "--download"])
    assert datasets.data_args_from(args).download is True
    config.check_arguments(args, explicit)
    args, explicit = config.parse_arguments(["--data-set", "FOLDER", "--data-path", str(tmp_path), "--download"])
    with pytest.raises(BadInput, match="--download has no effect here: it applies to --data-set CIFAR"):
        config.check_arguments(args, explicit)


def test_generation_download_is_for_cifar_only(tmp_path, capsys):
    code, _, err, _ = run_main(["--dataset", "FASHION", "--data-path", tmp_path, "--download"], capsys)
    assert code == 2 and "--download fetches C10 or C100; FASHION is read from local files" in one_error_line(err)


# ----------------------------------------------------------------------------- the CLIP teacher

def test_offline_clip_teacher_is_one_line_naming_the_weights_and_the_flag(tiny_cifar10, capsys, caplog):
    offline_before = hub.HF_HUB_OFFLINE
    code, _, err, seconds = run_main(tiny_run(tiny_cifar10, "--teacher", "clip"), capsys)
    line = one_error_line(err)
    assert code == 2 and seconds < DEADLINE_S
    assert caplog.records == []  # open_clip's own log of the failure would be a second line
    assert ("could not download open_clip's ViT-B-32-quickgelu weights (pretrained tag 'openai') from the Hugging "
            f"Face hub's {CLIP_REPOSITORY}") in line and "--teacher-path FILE" in line
    assert hub.HF_HUB_OFFLINE is offline_before  # restored


def test_a_failing_clip_download_is_one_line(monkeypatch, probes):
    def create_model(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': ReadTimeout\nmore details")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    message = raises_in_time(CheckpointError, teachers.load_clip, None)
    assert "(Failed to download weights for tag 'openai': ReadTimeout)" in message and "--teacher-path" in message


class TinyVisual(nn.Module):
    output_dim = 4

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, self.output_dim)

    def forward(self, images):
        return self.head(images.mean((2, 3)))


class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = TinyVisual()


def test_clip_teacher_without_a_file_asks_open_clip_for_the_openai_weights(tiny_cifar10, monkeypatch, probes,
                                                                           capsys):
    requests = []

    def create_model(model_name, pretrained=None, **kwargs):
        requests.append((model_name, pretrained))
        return TinyClip()

    monkeypatch.setattr(open_clip, "create_model", create_model)
    code, out, err, _ = run_main(tiny_run(tiny_cifar10, "--teacher", "clip", "--teacher-input-size", "32",
                                          "--normalisation", "layernorm"), capsys)
    assert code == 0, err
    assert requests == [("ViT-B-32-quickgelu", "openai")]
    assert ("Teacher: CLIP ViT-B-32-quickgelu, weights: open_clip's ViT-B-32-quickgelu weights (pretrained tag "
            f"'openai') from the Hugging Face hub's {CLIP_REPOSITORY}") in out
    assert probes == [(urllib.parse.urlparse(hub.ENDPOINT).hostname, 443)]


# ----------------------------------------------------------------------------- the Inception FID network

def test_offline_inception_is_one_line_naming_the_url_and_the_flag(tiny_cifar10, capsys):
    code, _, err, seconds = run_main(tiny_run(tiny_cifar10, "--fid-extractor", "inception"), capsys)
    line = one_error_line(err)
    assert code == 2 and seconds < DEADLINE_S
    assert f"could not download torch-fidelity's Inception weights from {INCEPTION_URL}" in line
    assert "--fid-weights FILE" in line


@pytest.mark.parametrize("failure", [urllib.error.HTTPError(INCEPTION_URL, 503, "Service Unavailable", {}, None),
                                     TimeoutError("timed out")])
def test_a_failing_inception_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, probes, failure):
    def download_url_to_file(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    message = raises_in_time(CheckpointError, fid.build_fid_network, "inception", None, None, 32)
    assert message.startswith(f"could not download torch-fidelity's Inception weights from {INCEPTION_URL} (")
    assert "--fid-weights" in message
    assert os.listdir(tmp_path / "torch-hub" / "checkpoints") == []


def test_inception_without_a_file_is_torch_fidelitys_file_in_the_torch_hub_cache(tmp_path, monkeypatch, probes):
    assert fid.URL_INCEPTION_V3 == INCEPTION_URL  # torch-fidelity's own URL
    downloads_asked = []

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):
        downloads_asked.append((url, dst))
        with open(dst, "wb") as handle:
            handle.write(b"not a torch file")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    cached = str(tmp_path / "torch-hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    # The downloaded file goes through the safe loader, like a local one.
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {cached}: corrupt"):
        fid.build_fid_network("inception", None, None, 32)
    assert downloads_asked == [(INCEPTION_URL, cached)] and probes == [("github.com", 443)]

    built = []
    monkeypatch.setattr(fid, "InceptionNetwork", lambda path, source: built.append((path, source)))
    fid.build_fid_network("inception", None, None, 32)
    assert built == [(cached, f"{INCEPTION_URL}, cached as {cached}")]
    assert len(downloads_asked) == 1 and len(probes) == 1  # cached: no second download, no probe


# ----------------------------------------------------------------------------- detection: NAVER's release URLs

EXAMPLE_RELEASE_URL = "https://github.com/naver-ai/vidt/releases/download/TAG/vidt_base_150.pth"  # the form only


def test_an_offline_release_url_is_one_line_naming_the_flag():
    from vidt.util import checkpoint as vidt_checkpoint
    message = raises_in_time(CheckpointError, vidt_checkpoint.load_checkpoint, EXAMPLE_RELEASE_URL, "--distil_model_path")
    assert "cannot reach github.com" in message and "--distil_model_path" in message


def test_a_release_url_is_fetched_once_into_the_torch_hub_cache_and_its_checksum_printed(monkeypatch, probes,
                                                                                         capsys):
    from vidt.util import checkpoint as vidt_checkpoint
    calls = []

    def download_url_to_file(url, path, *args, **kwargs):
        calls.append((url, path))
        torch.save({"model": {"weight": torch.ones(2)}}, path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    for _ in range(2):
        assert torch.equal(vidt_checkpoint.load_checkpoint(EXAMPLE_RELEASE_URL, "--resume")["model"]["weight"], torch.ones(2))
    [(url, path)] = calls
    assert url == EXAMPLE_RELEASE_URL and path == os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    with open(path, "rb") as handle:
        assert f"(sha256 {hashlib.sha256(handle.read()).hexdigest()})" in capsys.readouterr().out
