"""Processes and devices: which launcher started us, the device of this process, and the process group.

Launch forms, all equivalent (the local rank picks the device; the global rank 0 writes files):
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] main_distributed.py ...
    python -m torch.distributed.launch --nproc_per_node=N main_distributed.py ...   (the paper's form)
    srun python main_distributed.py ...      (Slurm: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
    python main_distributed.py ...           (one process, no process group)
"""
import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from utils import fail

DEFAULT_MASTER_PORT = "29500"
DEFAULT_TIMEOUT_MINUTES = 30.0  # torch's own default for gloo
# gloo names the source file of the transport that failed at the start of its errors (a peer that
# died: "Connection reset by peer"; a silent one: "Timed out waiting ... for recv"), and raises them
# as plain RuntimeErrors; nccl and the rendezvous store raise torch.distributed.DistError subclasses.
GLOO_TRANSPORT_SOURCE = "gloo/transport/"


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

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
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, KeyError, subprocess.CalledProcessError):
        fail("Slurm run without MASTER_ADDR, and its first node could not be found with scontrol: set MASTER_ADDR")
    return hosts[0]


def launcher_ranks(local_rank_flag: int) -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / torch.distributed.launch, Slurm, or a plain run.

    ``local_rank_flag`` is ``--local_rank``, which torch.distributed.launch passes without ``--use_env``;
    LOCAL_RANK wins when set.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", local_rank_flag))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, local_rank_flag


def select_device(requested: Optional[str], local_rank: int) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA device is visible")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if device.index >= torch.cuda.device_count():
        fail(f"local rank {local_rank} needs cuda:{device.index} but only {torch.cuda.device_count()} GPU(s) are visible")
    torch.cuda.set_device(device)
    return device


def configure_determinism(deterministic: bool, threads: Optional[int]) -> None:
    """Fixed thread count and deterministic kernels. Floating-point sums depend on how work is split
    across threads, and some kernels (CUDA atomics, cuBLAS workspaces) on scheduling."""
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at CUDA's first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def init_runtime(args, explicit) -> Runtime:
    """The rank, world size and device of this process; joins the process group when there are several.

    Fills in the device-dependent defaults: ``--amp`` (fp16 on cuda, none on cpu) and ``--pin-mem``.
    """
    configure_determinism(args.deterministic, args.threads)
    rank, world_size, local_rank = launcher_ranks(args.local_rank)
    if "world_size" in explicit and args.world_size != world_size:
        fail(f"--world_size {args.world_size} but the launcher started {world_size} process(es)")
    device = select_device(args.device, local_rank)
    if args.amp is None:
        args.amp = "fp16" if device.type == "cuda" else "none"
    if device.type != "cuda":
        args.pin_mem = False  # pinning only helps host-to-GPU copies (and warns without a GPU)
    if args.amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on the CPU")
    if world_size > 1:
        join_process_group(device, args.dist_url, world_size, rank, args.dist_timeout)
    return Runtime(rank, world_size, device)


def join_process_group(device: torch.device, init_method: str, world_size: int, rank: int,
                       timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """nccl on cuda, gloo on cpu; a collective waiting longer than the timeout (a dead rank) fails."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            world_size=world_size, rank=rank, timeout=datetime.timedelta(minutes=timeout_minutes))


def is_communication_failure(error: BaseException) -> bool:
    """A collective failed because a peer died or went silent (see ``GLOO_TRANSPORT_SOURCE``)."""
    return isinstance(error, dist.DistError) or GLOO_TRANSPORT_SOURCE in str(error).split("\n", 1)[0]
