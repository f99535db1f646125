"""Preemption as an event of the loop, for the three trees. SIGTERM (what Slurm and Kubernetes send before a
preemption or at a time limit) and SIGUSR1 (Slurm's ``--signal=USR1@SECONDS``) ask the loop to stop at its
next step boundary; every rank agrees on that step, the run writes a resumable checkpoint and exits with
``EXIT_PREEMPTED`` after one line. ``--resume auto`` then continues from that very step."""
import os
import random
import signal
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from vkd.distributed import is_distributed, reduce_over_ranks
from vkd.errors import VkDError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Not 0 (nothing finished) nor 1/2 (errors): a scheduler's requeue hook or a wrapper script can tell a
# preempted run, which only needs to be started again with the same command, from a failed one.
EXIT_PREEMPTED = 124


class Preempted(VkDError):
    """The run stopped at a step boundary on request and saved everything needed to continue."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"


class StopRequest:
    """While active (a context manager), the stop signals set a flag instead of ending the process.

    ``requested()`` is True on every rank as soon as any rank received a signal: with several processes it
    costs one tiny all-reduce per call, so call it once per step, at the same point on every rank.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.received, self.previous = tuple(signals), None, {}

    def __enter__(self) -> "StopRequest":
        for number in self.signals:
            self.previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def requested(self, device: Optional[torch.device] = None) -> bool:
        local = self.received is not None
        if not is_distributed():
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        return bool(reduce_over_ranks(flag, op=dist.ReduceOp.MAX).item())


def rng_states() -> Dict[str, object]:
    """Every random generator of this process, as tensors and plain values (a ``weights_only`` checkpoint
    holds them), to continue a run mid-epoch exactly where it stopped. On a GPU: the generator of this process's
    own device (the current one, which ``vkd.distributed`` sets), not every visible device's, so that a resumed
    run restores it whichever GPUs it sees."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
              "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return states


def set_rng_states(states: Dict[str, object]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate((3, tuple(states["python"]), states["python_gauss"]))
    cuda_state = _own_cuda_state(states.get("cuda"))
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, torch.cuda.current_device())


def _own_cuda_state(saved) -> Optional[torch.Tensor]:
    """This device's generator state in ``saved``: one state, or the list of every visible device's that
    checkpoints written before held (``get_rng_state_all``), of which this device's entry if it has one."""
    if saved is None or not torch.cuda.is_available():
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    device = torch.cuda.current_device()
    return saved[device] if device < len(saved) else None


def preempted_line(where: str) -> str:
    return f"preempted at {where} (pid {os.getpid()}); resume with the same command and --resume auto"
