"""Fixtures shared by the entry-point tests: a tiny ImageFolder, a tiny teacher file, and ways to run
``main_distributed.py`` in this process or under a launcher.

The tests run on the CPU even on a machine with a GPU: CUDA is hidden from this process and the processes it
starts, before torch first looks for a device (the launcher tests would put rank 1 on a missing cuda:1, and the
bit-exact assertions would meet other kernels). Tests marked ``gpu`` opt in: ``VKD_GPU_TESTS=1 pytest -m gpu``
leaves the GPUs visible and runs them alone; without a CUDA device they are skipped."""
import gzip
import os
import socket
import subprocess
import sys

GPU_TESTS = os.environ.get("VKD_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read once, when CUDA initialises: before any test touches it

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
CLASSES = ("cat", "dog", "fox")
TRAIN_PER_CLASS = (6, 6, 6)
VAL_PER_CLASS = (3, 2, 2)  # 7 images: an odd count, so 2 processes hold shards of different sizes
TEACHER = "resnet10t"


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several processes through a launcher (slower)")
    config.addinivalue_line("markers", "slow: end-to-end runs (subprocess kills, launchers, demos); "
                                       "`make test-slow` and .ci/run run them")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; opt in with VKD_GPU_TESTS=1 pytest -m gpu")


def pytest_collection_modifyitems(items):
    # Every multi-process test is end to end: it belongs to the slow tier.
    for item in items:
        if item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.slow)
        on_gpu = item.get_closest_marker("gpu") is not None
        if on_gpu and not (GPU_TESTS and torch.cuda.is_available()):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device: VKD_GPU_TESTS=1 pytest -m gpu"))
        elif GPU_TESTS and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="VKD_GPU_TESTS=1 runs the gpu tests alone; the rest run on the CPU"))


def write_image_folder(root: str, per_class, seed: int) -> None:
    generator = np.random.RandomState(seed)
    for name, count in zip(CLASSES, per_class):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(count):
            pixels = generator.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{index}.png"))


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> str:
    """``train/`` (3 classes x 6 random 32 px images) and ``val/`` (7 images)."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_image_folder(str(root / "train"), TRAIN_PER_CLASS, seed=0)
    write_image_folder(str(root / "val"), VAL_PER_CLASS, seed=1)
    return str(root)


@pytest.fixture(scope="session")
def tiny_teacher_file(tmp_path_factory) -> str:
    """A randomly initialised timm resnet10t (3 classes) in the format --teacher-path reads."""
    import timm
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save({"model": timm.create_model(TEACHER, num_classes=len(CLASSES)).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    """scikit-learn's digits exported as an ImageFolder (1,437 training and 360 validation images, 10 classes)."""
    from vkd.data.digits import export_digits
    return export_digits(str(tmp_path_factory.mktemp("data") / "digits"))


@pytest.fixture
def data_flags(tiny_image_folder):
    """Flags of a small, fast run on the tiny data (the student is the default deit_ti_distilled)."""
    return ["--data-set", "FOLDER", "--data-path", tiny_image_folder, "--input-size", str(IMAGE_SIZE),
            "--batch-size", "4", "--num_workers", "0", "--print-freq", "100"]


@pytest.fixture
def train_flags(data_flags, tiny_teacher_file):
    return data_flags + ["--teacher", TEACHER, "--teacher-path", tiny_teacher_file]


@pytest.fixture
def run_main(run_entry_point):
    """``run_main(argv)`` runs ``main_distributed.main`` here; returns (exit code, stdout, stderr)."""
    import main_distributed
    return lambda argv: run_entry_point(main_distributed, argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(launcher: str, processes: int):
    if launcher == "launch":  # the paper's form; it passes --local-rank to each process
        return ["torch.distributed.launch", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    if launcher == "torchrun":
        return ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    raise ValueError(launcher)


@pytest.fixture
def launch():
    """``launch(launcher, argv)`` runs ``python -m <launcher> --nproc_per_node=2 main_distributed.py argv``
    ('launch' or 'torchrun') from the repository root with one thread per process; returns the
    CompletedProcess, stdout and stderr together in ``.stdout``."""

    def run(launcher, argv, processes=2, timeout=240):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        command = ([sys.executable, "-m"] + launcher_command(launcher, processes) + ["main_distributed.py"]
                   + [str(item) for item in argv])
        return subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)

    return run


def write_idx(path, array, compress):
    """An IDX file of unsigned bytes, as Fashion-MNIST ships them: magic 0x0000 0x08 ndim, big-endian dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with opener(str(path) + (".gz" if compress else ""), "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def run_entry_point(capsys):
    """``run_entry_point(module, argv)`` runs ``module.main(argv)`` here with one thread; returns (exit code,
    stdout, stderr)."""

    def run(module, argv):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            module.main([str(item) for item in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_student_files(tmp_path_factory):
    """A random 3-class deit_ti_distilled at 32 px with its projector, saved twice with the same weights: as
    training saves it (``TrainingState.checkpoint``: 'student' with 'module.' keys, 'args', 'class_names') and in the
    released layout (``{'student': {'module.' + key: value}}``). ``.student`` is the model in eval mode."""
    from types import SimpleNamespace

    import models
    from checkpoint import TrainingState
    from config import parse_arguments
    from vkd.checkpoints import add_ddp_prefix

    torch.manual_seed(0)
    student = models.create_student("deit_ti_distilled", num_classes=len(CLASSES), img_size=IMAGE_SIZE,
                                    teacher_dim=256)
    with torch.no_grad():  # heads far from uniform, so that the top class is clear-cut
        for head in (student.head, student.head_dist):
            head.weight.normal_(0.0, 1.0)
    args, _ = parse_arguments(["--input-size", str(IMAGE_SIZE), "--epochs", "1"])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = TrainingState(args, 1, student, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      torch.optim.lr_scheduler.ConstantLR(optimizer), None, class_names=list(CLASSES))
    folder = tmp_path_factory.mktemp("students")
    ours, released = str(folder / "latest.pth.tar"), str(folder / "released.pth.tar")
    torch.save(trainer.checkpoint(epoch=0, loss=1.0), ours)
    torch.save({"student": add_ddp_prefix(student.state_dict())}, released)
    return SimpleNamespace(ours=ours, released=released, student=student.eval())
