"""Loaders yielding ``(samples, targets, num_unreadable)`` and the choice of the training sampler.

- ``samples``: the collated transformed images, e.g. float [B, 3, H, W];
- ``targets``: int64 [B] class indices;
- ``num_unreadable``: int64 scalar tensor, how many images of this batch could not be read or decoded
  (returned as ``(None, target)`` by ``folders.ImageFolderSkippingUnreadable``) and were dropped.
So B can be below the batch size, and is 0 only if every image of a batch is unreadable; under DDP
the training step must then still run (e.g. a zero loss), as skipping it on one rank alone would
hang the others.
"""
import atexit
import functools
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Sized

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torch.utils.data.dataloader import default_collate

from vkd.data.samplers import DistributedEvalSampler, RASampler, SeededRandomSampler
from vkd.errors import DatasetError
from vkd.preemption import STOP_SIGNALS

REPEATED_AUG_REPEATS = 3
FD_SERVER_FILE = os.path.join("multiprocessing", "resource_sharer.py")


def collate_skipping_unreadable(batch, keep_even: bool = False):
    """Collates ``(sample, target)`` pairs into ``(samples, targets, num_unreadable)``, dropping the
    unreadable ones (sample None). ``keep_even`` drops one more image from an odd batch, for
    timm's Mixup, which asserts an even batch."""
    readable = [item for item in batch if item[0] is not None]
    num_unreadable = torch.tensor(len(batch) - len(readable), dtype=torch.int64)
    if keep_even and len(readable) % 2:
        readable = readable[:-1]
    if not readable:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), num_unreadable
    samples, targets = default_collate(readable)
    return samples, targets, num_unreadable


def init_worker(worker_id: int) -> None:
    """The ``worker_init_fn`` of every DataLoader of the three trees. A stop signal sent to the whole process
    group (a scheduler signalling each process of a job step, ``timeout``, ``kill -- -PGID``, Ctrl-C) must not
    kill a worker under the main process, which stops the run at a step boundary and then ends its workers; and
    the worker stays quiet when the main process leaves mid-batch (``_quiet_when_a_batch_receiver_leaves``)."""
    for number in STOP_SIGNALS + (signal.SIGINT,):
        signal.signal(number, signal.SIG_IGN)
    sys.excepthook = functools.partial(_quiet_when_a_batch_receiver_leaves, sys.excepthook)


def _quiet_when_a_batch_receiver_leaves(print_otherwise, error_type, error, error_traceback) -> None:
    """A worker hands each batch's shared memory to the main process over a connection that multiprocessing
    serves in a thread, which reports its failures through ``sys.excepthook`` and goes on serving. Ctrl-C can
    end the main process in the middle of that exchange; the thread then fails on the closed connection and
    would print a traceback under the run's one "stopped:" line. The receiving side raises its own error
    whenever such an exchange fails, so the worker's is dropped."""
    if (issubclass(error_type, (EOFError, ConnectionError))
            and any(frame.f_code.co_filename.endswith(FD_SERVER_FILE)
                    for frame, _ in traceback.walk_tb(error_traceback))):
        return
    print_otherwise(error_type, error, error_traceback)


@atexit.register
def _end_workers_at_exit() -> None:
    """At exit multiprocessing ends its daemonic children, the loaders' workers among them, with SIGTERM and waits
    for them; workers ignore it (``init_worker``), so a process leaving with a live one (an error's
    traceback still holding the loop that iterated) would wait forever. They are ended first, with SIGKILL.
    Registered after multiprocessing's own handler, so run before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            os.kill(child.pid, signal.SIGKILL)


def train_sampler(dataset: Sized, seed: int, distributed: bool, rank: int = 0, world_size: int = 1,
                  repeated_aug: bool = False) -> Sampler:
    """A sampler with ``set_epoch``, whose epoch ``e`` depends only on ``seed + e``.

    One process: a seeded shuffle. Distributed: DeiT's repeated augmentation (``repeated_aug``) or
    torch's DistributedSampler, dropping the tail so every rank has as many images.
    """
    if not distributed:
        # Repeated augmentation only makes sense across ranks (DeiT applies it only when distributed).
        return SeededRandomSampler(dataset, seed=seed)
    if repeated_aug:
        return RASampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                         num_repeats=REPEATED_AUG_REPEATS, seed=seed)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)


def train_loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, pin_memory: bool,
                 keep_even: bool) -> DataLoader:
    """Full batches only (drop_last); ``keep_even`` (under Mixup) keeps batches that lost an image even."""
    if len(sampler) < batch_size:
        raise DatasetError(f"the training set has {len(sampler)} images per process, fewer than one "
                           f"batch of {batch_size} (batches are full-size only)")
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=init_worker,
                      collate_fn=functools.partial(collate_skipping_unreadable, keep_even=keep_even))


def val_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool, sharded: bool,
               rank: int = 0, world_size: int = 1) -> DataLoader:
    """In order, keeping the last partial batch. ``sharded``: an unpadded shard per rank, so each image
    counts once over all ranks; otherwise every rank reads the whole set."""
    sampler = (DistributedEvalSampler(dataset, num_replicas=world_size, rank=rank) if sharded
               else SequentialSampler(dataset))
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=collate_skipping_unreadable,
                      worker_init_fn=init_worker)
