"""Processes and devices, for the three trees: which launcher started us, this process's device, and the
process group (with a timeout, so a dead rank stops the others instead of hanging them).

Launch forms, all equivalent (the local rank picks the device; the global rank 0 writes files):
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] ENTRY ...
    python -m torch.distributed.launch --nproc_per_node=N [--use_env] ENTRY ...   (the papers' form)
    srun python ENTRY ...      (Slurm: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
    python ENTRY ...           (one process, no process group)
"""
import contextlib
import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from vkd.checkpoints import first_line
from vkd.errors import BadInput, RunFailed

DEFAULT_MASTER_PORT = "29500"  # the original's port for Slurm runs without MASTER_PORT
DEFAULT_TIMEOUT_MINUTES = 30.0  # torch's own default for gloo
# gloo names the source file of the transport that failed at the start of its errors (a peer that
# died: "Connection reset by peer"; a silent one: "Timed out waiting ... for recv"), and raises them
# as plain RuntimeErrors; nccl and the rendezvous store raise torch.distributed.DistError subclasses.
GLOO_TRANSPORT_SOURCE = "gloo/transport/"
Result = TypeVar("Result")


@dataclass
class Runtime:
    """What this process is and computes with, decided at start-up (the arguments record what was asked)."""
    rank: int
    world_size: int
    device: torch.device
    amp: str = "none"  # the mixed precision in use: none, fp16 or bf16
    pin_memory: bool = False  # loaders pin host memory (only worth it for a GPU)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes or ""], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = []
    if not nodes or not hosts:
        raise BadInput("Slurm run without MASTER_ADDR, and its first node could not be found with "
                       "`scontrol show hostnames $SLURM_JOB_NODELIST`: export MASTER_ADDR before srun")
    return hosts[0]


def launcher_ranks(local_rank_flag: int = 0) -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / torch.distributed.launch, Slurm, or a plain run.

    ``local_rank_flag`` is ``--local_rank``, which torch.distributed.launch passes without ``--use_env``;
    LOCAL_RANK wins when set. Under Slurm (more than one task) RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    (the job's first node) and MASTER_PORT are exported, so ``env://`` process groups work as under torchrun.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", local_rank_flag))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
        if "MASTER_ADDR" not in env:  # asked of scontrol only when needed
            env["MASTER_ADDR"] = _first_slurm_host()
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        return rank, world_size, local_rank
    return 0, 1, local_rank_flag


def select_device(requested: Optional[str], local_rank: int, world_size: int = 1) -> torch.device:
    """``requested`` (cpu, cuda, cuda:N), or cuda when a GPU is visible; ``cuda`` means this local rank's GPU.

    With one GPU visible (a scheduler that binds one GPU to each task, e.g. ``srun --gpus-per-task=1``) every
    local rank uses it; with several, local rank i uses cuda:i. Several processes started on one GPU, or all
    given one ``cuda:N`` among several GPUs, would share it: nccl would then fail at the first collective.
    """
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise BadInput(f"--device {name}: no CUDA device is visible; pass --device cpu")
    visible = torch.cuda.device_count()
    if name != "cuda" and world_size > 1 and visible > 1:
        raise BadInput(f"--device {name} with {world_size} processes puts every process of a node on that one GPU: "
                       f"pass --device cuda (each process takes its local rank's GPU)")
    _refuse_processes_sharing_a_gpu(visible)
    if name == "cuda":
        if visible > 1 and local_rank >= visible:
            raise BadInput(f"local rank {local_rank} needs cuda:{local_rank} but only {visible} GPU(s) are visible: "
                           f"start at most {visible} processes per node")
        device = torch.device("cuda", local_rank if visible > 1 else 0)
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise BadInput(f"--device {name}: expected cpu, cuda or cuda:N") from None
        if device.index is None or device.index >= visible:
            raise BadInput(f"--device {name}: only {visible} GPU(s) are visible (cuda:0 to cuda:{visible - 1})")
    torch.cuda.set_device(device)
    return device


def _refuse_processes_sharing_a_gpu(visible: int) -> None:
    """torchrun and torch.distributed.launch say how many processes they started on this node."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local_world_size > visible:
        raise BadInput(f"{local_world_size} processes were started on this node but only {visible} GPU(s) are "
                       f"visible: pass --nproc_per_node={visible} (or --device cpu)")


def join_process_group(device: torch.device, init_method: str, world_size: int, rank: int,
                       timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """nccl on cuda, gloo on cpu; a collective waiting longer than the timeout (a dead rank) fails."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            world_size=world_size, rank=rank, timeout=datetime.timedelta(minutes=timeout_minutes))


def start_processes(device: Optional[str], local_rank_flag: int = 0, init_method: str = "env://",
                    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, world_size_flag: Optional[int] = None) -> Runtime:
    """This process's rank and device, joining the process group when the launcher started several.

    ``world_size_flag`` is a ``--world_size`` given by hand: it must agree with the launcher.
    """
    rank, world_size, local_rank = launcher_ranks(local_rank_flag)
    if world_size_flag is not None and world_size_flag != world_size:
        raise BadInput(f"--world_size {world_size_flag} but the launcher started {world_size} process(es)")
    runtime = Runtime(rank, world_size, select_device(device, local_rank, world_size))
    if runtime.distributed:
        join_process_group(runtime.device, init_method, world_size, rank, timeout_minutes)
    return runtime


def is_distributed() -> bool:
    """Whether this process is in a process group (several processes train together)."""
    return dist.is_available() and dist.is_initialized()


def reduce_over_ranks(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``values`` combined over every process, in place (SUM by default; MAX for flags); itself alone."""
    if is_distributed():
        dist.all_reduce(values, op=op)
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over every process, in place (their sum divided by the number of processes); itself
    alone."""
    if is_distributed():
        reduce_over_ranks(values).div_(dist.get_world_size())
    return values


def is_main_process() -> bool:
    """Whether this process is rank 0 of its process group, or runs alone (the one that prints and writes)."""
    return not is_distributed() or dist.get_rank() == 0


def wait_for_every_rank() -> None:
    """Every process waits here until all have arrived (alone, nothing to wait for)."""
    if is_distributed():
        dist.barrier()


def every_rank(value: Result) -> List[Result]:
    """Every process's ``value`` (anything picklable), in rank order, on every process; ``[value]`` alone."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main_process_decides(check: Callable[[], Result], is_main: bool) -> Result:
    """``check()`` on the main process alone (it may look at files that the main process writes next); every
    process gets its result, or raises the same ``BadInput``, so all of them go on or stop together."""
    outcome = None
    if is_main:
        try:
            outcome = (True, check())
        except BadInput as error:
            outcome = (False, str(error))
    if is_distributed():
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    passed, value = outcome
    if not passed:
        raise BadInput(value)
    return value


def is_communication_failure(error: BaseException) -> bool:
    """A collective failed because a peer died or went silent (see ``GLOO_TRANSPORT_SOURCE``)."""
    return isinstance(error, dist.DistError) or GLOO_TRANSPORT_SOURCE in str(error).split("\n", 1)[0]


@contextlib.contextmanager
def ending_the_process_group(timeout_minutes: float) -> Iterator[None]:
    """What each entry point runs its work in. A collective that fails because another process died or went
    silent becomes one ``RunFailed`` line naming this rank and ``--dist-timeout``; on the way out, however the work
    ends, the process group is destroyed (nccl warns of a leak, and may hang at exit, without it)."""
    try:
        yield
    except RuntimeError as error:
        if not (is_distributed() and is_communication_failure(error)):
            raise
        raise RunFailed(f"rank {dist.get_rank()}: distributed communication failed, probably because another process "
                        f"died or hung (collectives give up after --dist-timeout {timeout_minutes:g} min): "
                        f"{first_line(error)}") from error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
