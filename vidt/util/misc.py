"""Padded image batches and the few torch.distributed helpers the training loop needs."""
import os
import subprocess
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


class BadInput(SystemExit):
    """Bad input (a flag, a path, the launcher's environment): ``str()`` is one line naming the problem
    and the fix; uncaught, the process exits with code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NestedTensor:
    """A zero-padded image batch [B,3,H,W] with its padding mask [B,H,W] (True = padding)."""

    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))


def nested_tensor_from_images(images: List[torch.Tensor]) -> NestedTensor:
    """Pad to the per-batch maximum height and width (no extra multiple-of-32 padding, as ViDT)."""
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=images[0].device)
    for img, padded, pad_mask in zip(images, batch, mask):
        padded[:, :img.shape[1], :img.shape[2]].copy_(img)
        pad_mask[:img.shape[1], :img.shape[2]] = False
    return NestedTensor(batch, mask)


def collate_fn(batch):
    images, targets = zip(*batch)
    return nested_tensor_from_images(list(images)), list(targets)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_object(obj) -> list:
    """Every process's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(values: dict, average: bool = True) -> dict:
    """All-reduce a dict of scalar tensors (same keys on every process) for logging."""
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


DEFAULT_MASTER_PORT = "29500"  # the original's port for Slurm runs without MASTER_PORT


def _first_slurm_node() -> str:
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, KeyError, subprocess.CalledProcessError):
        hosts = []
    if not hosts:
        raise BadInput("Slurm run without MASTER_ADDR, and `scontrol show hostnames $SLURM_NODELIST` "
                       "gave no node; export MASTER_ADDR (the first node's address) before srun")
    return hosts[0]


def launcher_ranks(local_rank: int = 0) -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) announced by the launcher, or None for a plain ``python main.py``.
    ``local_rank`` (--local_rank, passed by torch.distributed.launch without --use_env) is used only where
    LOCAL_RANK is not exported.

    torchrun and ``torch.distributed.launch --use_env`` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. Under Slurm (SLURM_PROCID with more than one task) the same variables are exported here,
    as the original does: MASTER_ADDR is the first node of the job and MASTER_PORT 29500, unless already set.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", local_rank))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
        env.setdefault("MASTER_ADDR", _first_slurm_node())
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        return rank, world_size, local_rank
    return None


def init_distributed_mode(args) -> None:
    """Join the process group announced by torchrun / torch.distributed.launch --use_env / Slurm.

    Sets args.distributed, args.rank, args.world_size, args.gpu and args.dist_backend (gloo unless the
    device is CUDA). The group is initialised from ``--dist-url``, by default ``env://``: the launcher's
    MASTER_ADDR and MASTER_PORT, so runs span nodes and two jobs on one node do not clash.
    """
    if not args.device.startswith("cuda"):
        args.dist_backend = "gloo"  # nccl needs CUDA
    launched = launcher_ranks(getattr(args, "local_rank", 0))
    if launched is None:
        if args.distributed:
            raise BadInput("--distributed needs a launcher: torchrun --nproc_per_node=N main.py ..., "
                           "python -m torch.distributed.launch --use_env ..., or srun")
        if args.rank != 0 or args.world_size != 1:
            raise BadInput("--rank/--world_size are set by the launcher; start the run with torchrun or srun")
        args.distributed, args.gpu = False, 0
        return
    rank, world_size, local_rank = launched
    if args.world_size not in (1, world_size):
        raise BadInput(f"--world_size {args.world_size} but the launcher started {world_size} processes")
    args.rank, args.world_size, args.gpu, args.distributed = rank, world_size, local_rank, True
    if args.device == "cuda":
        torch.cuda.set_device(args.gpu)
    print(f"| distributed init (rank {rank} of {world_size}, {args.dist_backend}): {args.dist_url}", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=world_size, rank=rank)
    dist.barrier()


def setup_for_distributed_printing(is_master: bool) -> None:
    """Silence print() on every process but rank 0 (force=True still prints)."""
    import builtins
    builtin_print = builtins.print

    def rank_aware_print(*args, **kwargs):
        if kwargs.pop("force", False) or is_master:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean [B,H,W] padding mask."""
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def device_of(args) -> torch.device:
    """The torch device for this process; a clear error when CUDA is asked for but missing."""
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput("--device cuda but CUDA is not available; pass --device cpu")
        return torch.device("cuda", args.gpu) if args.device == "cuda" else torch.device(args.device)
    return torch.device(args.device)
