"""What a GPU run needs, checked on the CPU: CPU autocast (fp16, bf16) stands in for CUDA autocast, the ``meta``
device or a patched ``torch.cuda`` for a GPU, a patched device count for a scheduler's per-task binding. The
tests marked ``gpu`` run the same checks on a real device (``VKD_GPU_TESTS=1 pytest -m gpu``)."""
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import REPO

from examples.own_loop import distil
from generation import checkpointing as gan_checkpointing
from generation import engine as gan_engine
from generation import teachers
from vkd import distributed, preemption
from vkd.errors import BadInput
from vkd.norms import whiten, whiten_cholesky
from vkd.precision import full_fp32
from vkd.projector import OrthogonalProjector

AUTOCAST_DTYPES = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- the default tier is the CPU's

def test_the_tests_and_the_processes_they_start_see_no_gpu():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    probe = "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), torch.cuda.device_count())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["''", "0"]


# ----------------------------------------------------------------------------- whitening under AMP

@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("width", [256, 512])
def test_zca_whitening_under_autocast_computes_what_fp32_computes(dtype, width):
    torch.manual_seed(0)
    x = torch.randn(64, width)
    expected = whiten(x)
    with torch.autocast("cpu", dtype):
        whitened = whiten(x)
    # Before: fp16 relative errors of 0.15-0.22, bf16 of 1.2-1.8.
    assert whitened.dtype == torch.float32 and torch.equal(whitened, expected)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_cholesky_whitening_under_autocast_computes_what_fp32_computes(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    with torch.autocast("cpu", dtype):
        whitened = whiten_cholesky(x)
    assert torch.equal(whitened, whiten_cholesky(x))


def test_whitening_runs_its_matmuls_in_full_fp32_and_leaves_the_callers_precision():
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU
    try:
        with full_fp32("cpu"):
            inside = torch.get_float32_matmul_precision()
        torch.manual_seed(0)
        x = torch.randn(32, 64)
        whitened = whiten(x)
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert (inside, after) == ("highest", "high")
    assert torch.equal(whitened, whiten(x))


# ----------------------------------------------------------------------------- random states of a GPU run

class FakeCuda:
    """``torch.cuda`` of a process whose current device is ``current`` among ``count`` visible GPUs; each
    device's generator state is a tensor holding its index, and every state set is recorded."""

    def __init__(self, monkeypatch, current: int, count: int):
        self.current, self.count, self.set = current, count, []
        for name in ("is_available", "is_initialized"):
            monkeypatch.setattr(torch.cuda, name, lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get_rng_state(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_rng_state_all)

    def get_rng_state(self, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        return torch.tensor([index], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        if index >= self.count:
            raise IndexError(f"device {index} of {self.count}")
        self.set.append((int(state[0]), index))

    def set_rng_state_all(self, states):
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


def test_a_checkpoint_holds_the_generator_of_this_processs_own_gpu(monkeypatch):
    FakeCuda(monkeypatch, current=1, count=2)
    assert torch.equal(preemption.rng_states()["cuda"], torch.tensor([1], dtype=torch.uint8))


def test_a_run_resumed_on_fewer_gpus_restores_its_own_generator_there(monkeypatch):
    states = preemption.rng_states()
    states["cuda"] = torch.tensor([3], dtype=torch.uint8)  # saved by the rank on cuda:3 of 4
    cuda = FakeCuda(monkeypatch, current=0, count=1)  # now bound to one GPU per task
    preemption.set_rng_states(states)
    assert cuda.set == [(3, 0)]


@pytest.mark.parametrize("current, count, restored", [(1, 2, [(1, 1)]), (0, 1, [(0, 0)]), (2, 3, [])])
def test_an_older_checkpoint_with_every_devices_generator_restores_this_devices_entry(monkeypatch, current,
                                                                                       count, restored):
    states = preemption.rng_states()
    states["cuda"] = [torch.tensor([index], dtype=torch.uint8) for index in range(2)]  # get_rng_state_all, 2 GPUs
    cuda = FakeCuda(monkeypatch, current=current, count=count)
    preemption.set_rng_states(states)  # no IndexError on one GPU, nothing restored for a device it lacks
    assert cuda.set == restored


# ----------------------------------------------------------------------------- devices of the processes

@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: n GPUs visible; returns the list of devices ``torch.cuda.set_device`` was given."""
    chosen = []
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def visible(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return visible


def test_one_gpu_bound_per_task_serves_any_local_rank(gpus):
    chosen = gpus(1)  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    assert distributed.select_device("cuda", local_rank=3) == torch.device("cuda", 0)
    assert distributed.select_device(None, local_rank=3, world_size=4) == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 0)] * 2


def test_local_ranks_take_their_own_gpu_among_several(gpus):
    gpus(4)
    assert distributed.select_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 3)
    with pytest.raises(BadInput, match="local rank 3 needs cuda:3 but only 2 GPU"):
        gpus(2)
        distributed.select_device("cuda", local_rank=3, world_size=4)


def test_one_explicit_gpu_for_several_processes_is_refused_in_one_line(gpus):
    gpus(2)
    with pytest.raises(BadInput, match="--device cuda:1 with 2 processes puts every process of a node on that one "
                                       "GPU: pass --device cuda"):
        distributed.select_device("cuda:1", local_rank=0, world_size=2)
    assert distributed.select_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)
    gpus(1)  # one GPU bound per task: cuda:0 is that task's own
    assert distributed.select_device("cuda:0", local_rank=1, world_size=2) == torch.device("cuda", 0)


def test_more_processes_on_a_node_than_gpus_is_refused_in_one_line(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2 on a one-GPU machine
    with pytest.raises(BadInput, match="2 processes were started on this node but only 1 GPU"):
        distributed.select_device("cuda", local_rank=1, world_size=2)


# ----------------------------------------------------------------------------- generation

class TinyVisual(nn.Module):
    output_dim = 8

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, self.output_dim)

    def forward(self, images):
        return self.head(images.mean((2, 3)))


class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = TinyVisual()


def test_the_clip_teacher_is_wholly_on_its_device_normalisation_included(monkeypatch):
    monkeypatch.setattr(teachers, "_download_clip", lambda open_clip, name: (TinyClip(), "a tiny CLIP"))
    encoder = teachers.load_clip(None, normalise=True, device=torch.device("meta"))
    placed = {name: tensor.device.type for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]}
    assert set(placed) >= {"mean", "std", "visual.head.weight"} and set(placed.values()) == {"meta"}, placed


def test_each_rank_resumes_its_own_random_generators():
    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(preemption.rng_states())
    expected = torch.rand(3)  # what seed 2 draws next
    torch.manual_seed(0)
    gan_checkpointing.restore_rng({"rng": saved}, rank=1)
    assert torch.equal(torch.rand(3), expected)


def test_an_older_checkpoint_gives_rank_0s_generator_to_rank_0_alone():
    torch.manual_seed(5)
    saved = torch.get_rng_state()
    torch.manual_seed(6)
    own = torch.get_rng_state()
    gan_checkpointing.restore_rng({"rng": saved, "cuda_rng": None}, rank=1)
    assert torch.equal(torch.get_rng_state(), own)
    gan_checkpointing.restore_rng({"rng": saved, "cuda_rng": None}, rank=0)
    assert torch.equal(torch.get_rng_state(), saved)


def run_two_gan_processes(argv) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "generation.main", *map(str, argv)]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.multiprocess
def test_two_gan_processes_resumed_train_as_if_never_stopped(tmp_path):
    from test_generation_reliability import assert_same_training_state, flags, latest, write_fashion
    data = write_fashion(tmp_path / "fashion", 60)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_two_gan_processes(flags(data, straight, 4))
    run_two_gan_processes(flags(data, resumed, 2))
    rng = latest(resumed)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    run_two_gan_processes(flags(data, resumed, 4))  # --iterations may grow: the same run, continued
    # Each rank drew its own z, labels and augmentations after the resume, as it would have without the stop.
    assert_same_training_state(latest(straight), latest(resumed))


def test_gan_gradients_are_averaged_in_one_all_reduce(monkeypatch):
    calls = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):  # two ranks with the same gradients: the sum is twice each
        calls.append(tensor.numel())
        tensor.mul_(2)

    for module in (distributed, gan_engine):
        monkeypatch.setattr(module, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    parameters = [nn.Parameter(torch.zeros(shape)) for shape in [(3, 2), (4,), (2, 2, 2)]]
    for index, parameter in enumerate(parameters):
        parameter.grad = torch.arange(parameter.numel(), dtype=torch.float32).view(parameter.shape) + index
    expected = [parameter.grad.clone() for parameter in parameters]
    parameters.append(nn.Parameter(torch.zeros(5)))  # no gradient (frozen in this step): left out
    gan_engine.average_gradients(parameters)
    assert calls == [6 + 4 + 8]
    assert all(torch.equal(parameter.grad, grad) for parameter, grad in zip(parameters, expected))
    assert parameters[-1].grad is None


# ----------------------------------------------------------------------------- the own-loop example

def test_the_own_loop_example_puts_the_projector_on_the_students_device():
    student = timm.create_model("test_vit", num_classes=4, img_size=32).to("meta")
    teacher = timm.create_model("test_resnet", num_classes=4).to("meta")
    projector, losses = distil(student, teacher, loader=[])
    assert losses == [] and {tensor.device.type for tensor in [*projector.parameters(), *projector.buffers()]} == {
        "meta"}


# ----------------------------------------------------------------------------- classification's start-up

def test_bf16_on_a_gpu_without_bf16_is_refused_at_start_up(monkeypatch):
    import runtime
    from config import parse_arguments
    args, explicit = parse_arguments(["--amp", "bf16"])
    monkeypatch.setattr(runtime, "start_processes", lambda *a, **k: distributed.Runtime(0, 1, torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(BadInput, match="--amp bf16: Tesla V100-SXM2-32GB has no bf16 kernels .*; use --amp fp16"):
        runtime.init_runtime(args, explicit)


def test_the_teacher_cache_is_refused_on_a_gpu(monkeypatch):
    import runtime
    from config import parse_arguments
    args, explicit = parse_arguments(["--teacher-cache", "somewhere", "--amp", "fp16"])
    monkeypatch.setattr(runtime, "start_processes", lambda *a, **k: distributed.Runtime(0, 1, torch.device("cuda", 0)))
    with pytest.raises(BadInput, match="--teacher-cache hashes every input batch on the host"):
        runtime.init_runtime(args, explicit)


def test_the_orthogonal_map_computes_in_full_fp32_whatever_the_callers_precision(monkeypatch):
    from vkd import orthogonal_maps
    seen = []
    householder = orthogonal_maps.MAPS["householder"]
    monkeypatch.setitem(orthogonal_maps.MAPS, "householder",
                        lambda x: seen.append(torch.get_float32_matmul_precision()) or householder(x))
    projector = OrthogonalProjector(8, 16)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what enabling TF32 sets
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            projector(torch.randn(2, 8))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and set(seen) == {"highest"}


# ----------------------------------------------------------------------------- detection

@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(one_process_group):
    from test_vidt import FakeCriterion, ScaledSum

    from vidt.engine import train_one_epoch
    from vidt.util.nested_tensor import nested_tensor_from_images
    model = nn.parallel.DistributedDataParallel(ScaledSum())
    reduced = []

    def count_and_keep(state, bucket):
        reduced.append(bucket.buffer().clone())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, count_and_keep)
    loader = [(nested_tensor_from_images([torch.full((3, 2, 2), float(i + 1))]), [{}]) for i in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, FakeCriterion(), loader, optimizer, torch.device("cpu"), epoch=0, max_norm=0,
                    n_iter_to_acc=2, print_freq=100)
    # Micro-batches sum to 12 * (i + 1); a step's all-reduce carries the sum of its two halved gradients.
    assert [bucket.item() for bucket in reduced] == [(12 + 24) / 2, (36 + 48) / 2]


def test_vidt_leaves_no_process_group_behind(monkeypatch, tmp_path):
    from vidt import main as vidt_main

    def run(args, argv, origins):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(vidt_main, "run", run)
    try:
        vidt_main.main([])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_vidt_loaders_pin_batches_for_a_gpu(monkeypatch):
    from vidt import main as vidt_main
    from vidt.util.nested_tensor import NestedTensor
    built = []
    monkeypatch.setattr(vidt_main, "DataLoader", lambda *a, **kwargs: built.append(kwargs["pin_memory"]))
    monkeypatch.setattr(vidt_main, "build_coco", lambda split, args, num_classes: list(range(8)))
    from vidt.arguments import get_args_parser
    args = get_args_parser().parse_args(["--batch_size", "2"])
    vidt_main.make_loaders(args, eval_only=False, pin_memory=True)
    assert built == [True, True]
    assert callable(NestedTensor.pin_memory)  # what the loader calls on a batch of padded images


# ----------------------------------------------------------------------------- the device script

def test_the_gpu_check_stops_at_once_with_one_line_without_a_gpu(tmp_path):
    output, work = tmp_path / "gpu_check.json", tmp_path / "work"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--output", str(output), "--work", str(work)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert time.time() - started < 60
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-3000:]
    assert result.stderr.splitlines() == ["error: no CUDA device is visible (torch.cuda.is_available() is False): the "
                                          "GPU check runs on a machine with a GPU"]
    assert not output.exists() and not work.exists()


# ----------------------------------------------------------------------------- on a GPU (VKD_GPU_TESTS=1)

@pytest.mark.gpu
def test_gpu_projector_matches_the_cpu_and_fp16_autocast_stays_close():
    torch.manual_seed(0)
    projector, x = OrthogonalProjector(192, 3024), torch.randn(256, 192)
    expected = projector(x)
    on_gpu = projector.cuda()
    assert torch.allclose(on_gpu(x.cuda()).cpu(), expected, atol=1e-5)
    with torch.autocast("cuda", torch.float16):
        assert torch.allclose(on_gpu(x.cuda()).float().cpu(), expected, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_gpu_whitening_under_autocast_and_tf32_matches_fp32(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 512, device="cuda")
    expected = whiten(x)
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cuda", dtype):
            whitened = whiten(x)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert torch.equal(whitened, expected)


@pytest.mark.gpu
def test_gpu_random_generator_round_trip():
    torch.randn(1, device="cuda")  # initialises CUDA
    states = preemption.rng_states()
    drawn = torch.rand(4, device="cuda")
    preemption.set_rng_states(states)
    assert torch.equal(torch.rand(4, device="cuda"), drawn)
