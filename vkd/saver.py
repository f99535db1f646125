"""One saver of a run's checkpoints for the three trees, in the shape of timm's ``CheckpointSaver``: ``latest``
after every epoch (or every N iterations), ``best`` when the run's metric improved, a kept copy every N epochs,
and ``latest`` again when the run is stopped in the middle of an epoch (preempted).

Each tree decides what a checkpoint holds and names its files (classification latest/best/ep{N}.pth.tar,
detection checkpoint.pth and checkpoint{NNNN}.pth, generation latest/best.pth); the saver decides how they are
written: never with non-finite weights, each atomically (``vkd.checkpoints.save_atomically``: a kill leaves the
previous file or the new one), ``latest`` last (what ``--resume auto`` continues), and only after the folder was
found to hold two checkpoints before the run started. Unlike timm's, it keeps no ranking of its own: the metric
and its best value live in each tree's checkpoint, so the tree says whether a save improved it.
"""
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch

from vkd.checkpoints import all_finite, require_room_for_checkpoints, save_atomically, tensor_bytes
from vkd.distributed import main_process_decides, wait_for_every_rank
from vkd.errors import RunFailed

Weights = Sequence[Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class CheckpointSaver:
    """``folder``: the run's output folder. ``latest`` / ``best``: file names (no best without one). ``kept``: the
    name of a kept copy, a format of ``done`` (epochs finished) and ``last`` (the index of the last one), written
    when ``done`` is a multiple of one of ``keep_every``. ``unit``: what ``done`` counts, for messages. Every process
    may call the saving methods: each checks the weights (the same on every rank, so every rank stops or none
    does), the main process writes."""
    folder: str
    latest: str
    best: Optional[str] = None
    kept: str = ""
    keep_every: Tuple[int, ...] = ()
    unit: str = "epoch"
    is_main: bool = True

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def require_room(self, checkpoint_bytes: int) -> None:
        """Before the run starts, on every process: the main process creates the folder and refuses a run that it
        cannot hold two checkpoints of (the atomic save writes the new file beside the old); all stop together."""
        def room() -> None:
            os.makedirs(self.folder, exist_ok=True)
            require_room_for_checkpoints(self.folder, checkpoint_bytes)
        main_process_decides(room, self.is_main)

    def _refuse_non_finite(self, weights: Weights, when: str) -> None:
        if not all(all_finite(state_dict) for state_dict in weights):
            raise RunFailed(f"the weights became non-finite {when}; {self.latest} was left as it was")

    def save(self, content: dict, done: int, weights: Weights, improved: bool = False,
             before: Optional[Callable[[], None]] = None) -> None:
        """The checkpoint ``content`` after ``done`` epochs (or iterations): ``best`` when ``improved`` (a saver with
        one), the kept copy when one is due, then ``latest``. ``weights``: the state dicts that must be finite.
        ``before``: what the run writes of this step ahead of its checkpoints (its log line), once the weights are
        known to be finite: a kill before ``latest`` is renamed leaves the previous step as the last finished one,
        which a resume redoes."""
        self._refuse_non_finite(weights, f"after {done} {self.unit}(s)")
        if not self.is_main:
            return
        if before is not None:
            before()
        if improved and self.best:
            self.save_best(content, weights)
        if self.kept and any(done % period == 0 for period in self.keep_every):
            save_atomically(content, self.path(self.kept.format(done=done, last=done - 1)))
        save_atomically(content, self.path(self.latest))

    def save_best(self, content: dict, weights: Weights) -> None:
        """``best`` alone, for a tree whose best file holds less than ``latest`` (generation keeps G's EMA)."""
        self._refuse_non_finite(weights, "before the best checkpoint")
        if self.is_main:
            save_atomically(content, self.path(self.best))

    def save_preempted(self, content: dict, weights: Weights, where: str) -> None:
        """``latest`` when a stop request ends the run at ``where`` (e.g. 'epoch 3 step 40'), on every process:
        each waits until the main process has written it, since a launcher stops every process once one has
        exited, and could stop the main one mid-save."""
        self._refuse_non_finite(weights, f"by {where}")
        if self.is_main:
            save_atomically(content, self.path(self.latest))
        wait_for_every_rank()


def estimated_checkpoint_bytes(optimizer: torch.optim.Optimizer, trained: Mapping[str, torch.Tensor],
                               *others: Mapping[str, torch.Tensor]) -> int:
    """What a checkpoint will hold, before the optimizer has any state: ``trained``'s tensors with the optimizer's
    moments of each (two for Adam and AdamW, one for SGD's momentum), and the tensors of ``others`` (an EMA)."""
    moments = 2 if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 1
    return tensor_bytes(trained) * (1 + moments) + tensor_bytes(*others)
