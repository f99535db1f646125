"""Training and evaluation loops (DeiT's ``engine.py`` layout): ``train_one_epoch`` and ``evaluate``.

The loops are the same for every distillation method, for the undistilled baseline and for training a
teacher: ``model`` is the student's training view (``models.students.TrainingView``, DDP-wrapped when
distributed), whose forward gives ``distillers.StudentOutputs``, and the criterion (a ``distillers.Distiller``)
owns the frozen teacher and returns its already-weighted terms, which are logged by name.
"""
import math
import resource
import sys
import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vkd.distributed import is_distributed, reduce_over_ranks
from vkd.errors import RunFailed
from vkd.preemption import StopRequest, rng_states, set_rng_states
from vkd.progress import Progress
from vkd.reproducibility import model_random_stream

TOP_K = 5


class NonFiniteLossError(RunFailed):
    """A non-finite loss once ``--skip-nonfinite`` is used up; the message holds every loss term's value."""


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _binary_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    # DeiT III's --bce-loss: every class present in the (possibly mixed) target is a positive.
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes)
    return targets.gt(0.0).float()


def _any_rank_empty(batch: int, device: torch.device) -> bool:
    """Whether some rank's batch lost every image (all unreadable). The step is then skipped on all
    ranks together: a DDP step that one rank leaves out would hang the others."""
    if not is_distributed():
        return batch == 0
    empty = torch.tensor([1.0 if batch == 0 else 0.0], device=device)
    return reduce_over_ranks(empty).item() > 0


def _step_decisions(loss: torch.Tensor, stop: Optional[StopRequest]) -> Tuple[bool, bool]:
    """(the loss is finite on every rank, some rank was asked to stop): one all-reduce and one host read per step.
    Every rank must take the same decisions, or DDP's next gradient all-reduce would hang."""
    stop_here = stop is not None and stop.received is not None
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(stop_here)).float()])
    reduce_over_ranks(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop_anywhere = flags.tolist()
    return nonfinite == 0, stop_anywhere > 0


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, *, lr_scheduler, scaler: torch.amp.GradScaler,
                    amp_dtype: Optional[torch.dtype] = None, mixup_fn=None, clip_grad: Optional[float] = None,
                    ema=None, skips_allowed: int = 0, bce_targets: bool = False, set_training_mode: bool = True,
                    print_freq: int = 10, is_main: bool = True, world_size: int = 1, tb_writer=None,
                    stop: Optional[StopRequest] = None, resumed: Optional[dict] = None, seed: int = 0,
                    rank: int = 0) -> Dict[str, float]:
    """One pass over ``data_loader``; returns the epoch's mean loss terms (over all ranks) and counters.

    ``stop``: when it is requested, the epoch ends at the next step boundary and returns
    ``{"preempted_at": step, "partial": ...}`` instead, ``partial`` being this rank's running sums and random
    generators. ``resumed``: that ``partial`` with its ``step``, from a preempted run's checkpoint: the first
    ``step`` batches are drawn and dropped (the loader workers' augmentation streams then match the
    uninterrupted run), then the sums and this process's generators are restored, so the epoch goes on
    exactly as if it had never stopped.

    The LR is set from the global iteration before every step, so the curve depends on the
    iteration index alone (a resumed run follows the uninterrupted one). A non-finite loss skips
    the step while fewer than ``skips_allowed`` were skipped this epoch, else raises
    ``NonFiniteLossError`` before any weight changes. ``seed`` and ``rank`` seed the model's own random
    stream at each step (``vkd.reproducibility.model_random_stream``).
    """
    model.train(set_training_mode)
    criterion.train()
    terms_logged = criterion.terms_logged
    steps = len(data_loader)
    sums = torch.zeros(len(terms_logged), dtype=torch.float64, device=device)
    seen = unreadable = skipped = first = 0
    iterator = iter(data_loader)
    if resumed is not None:
        first = resumed["step"]
        for _ in range(first):
            next(iterator)
        sums = resumed["sums"].to(device)
        seen, unreadable, skipped = resumed["seen"], resumed["unreadable"], resumed["skipped"]
        set_rng_states(resumed["rng"])
    progress = Progress(f"Epoch: [{epoch}]", steps, print_freq, is_main, first=first)
    start = time.time() - (resumed["seconds"] if resumed is not None else 0.0)
    for index in range(first, steps):
        samples, targets, num_unreadable = next(iterator)
        global_step = epoch * steps + index
        lr_scheduler.step_update(global_step)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        unreadable += int(num_unreadable)
        batch = samples.shape[0]
        if _any_rank_empty(batch, device):
            continue
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        # Backward draws nothing: dropout and drop-path keep their masks from the forward.
        with model_random_stream(seed, rank, global_step, device), \
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(samples)
            if bce_targets:
                targets = _binary_targets(targets, outputs.logits.shape[-1])
            terms = criterion(samples, outputs, targets)
        loss = terms["loss"]
        finite, stop_requested = _step_decisions(loss, stop)
        if not finite and skipped >= skips_allowed:
            values = ", ".join(f"{name}={terms[name].item():.6g}" for name in terms_logged)
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {index} (global step {global_step}): {values}; "
                f"{skipped} step(s) already skipped of --skip-nonfinite {skips_allowed}")
        # Backward runs even for a skipped step so that DDP's reducer stays in step on every rank.
        scaler.scale(loss).backward()
        if not finite:
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if is_main:
                print(f"warning: non-finite loss at epoch {epoch}, iteration {index}: step skipped "
                      f"({skipped}/{skips_allowed})", file=sys.stderr, flush=True)
        else:
            seen += batch
            sums += torch.stack([terms[name].detach().double() for name in terms_logged]) * batch
            _optimizer_step(model, optimizer, scaler, clip_grad, ema, global_step)
        fields = None
        if progress.due(index + 1):
            fields = _progress_fields(optimizer, terms_logged, sums, seen, world_size, start, device, tb_writer,
                                      global_step)
        progress.update(index + 1, fields)
        # The step boundary, before the next batch is drawn (with no workers, drawing it uses this
        # process's random generators, which the checkpoint must hold as they are here). The last step's
        # request is answered after the epoch is saved.
        if stop_requested and index + 1 < steps:
            progress.close()
            return {"preempted_at": index + 1, "partial": dict(
                step=index + 1, sums=sums.cpu(), seen=seen, unreadable=unreadable, skipped=skipped,
                seconds=time.time() - start, rng=rng_states())}
    progress.close()

    totals = reduce_over_ranks(torch.cat([sums, torch.tensor([seen, unreadable], dtype=torch.float64, device=device)]))
    images = totals[-2].item()
    stats = {name: (totals[i].item() / images if images else math.nan) for i, name in enumerate(terms_logged)}
    stats.update(lr=optimizer.param_groups[0]["lr"], images=int(images), unreadable_images=int(totals[-1].item()),
                 nonfinite_skipped=skipped, seconds=time.time() - start)
    return stats


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip_grad: Optional[float], ema, global_step: int) -> None:
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(global_step)


def _progress_fields(optimizer, terms_logged, sums: torch.Tensor, seen: int, world_size: int, start: float,
                     device: torch.device, tb_writer, global_step: int) -> Dict[str, str]:
    """The progress line's fields, also written to tensorboard: the epoch's running means so far. Read on print
    steps only, since reading them waits for the device."""
    lr = optimizer.param_groups[0]["lr"]
    means = (sums / max(seen, 1)).tolist()
    fields = {"lr": f"{lr:.3e}"}
    fields.update({name: f"{value:.4f}" for name, value in zip(terms_logged, means)})
    fields["img/s"] = f"{seen * world_size / (time.time() - start):.1f}"
    fields["mem"] = f"{_peak_memory_mb(device):.0f}MB"
    if tb_writer is not None:
        tb_writer.add_scalar("train/lr", lr, global_step)
        for name, value in zip(terms_logged, means):
            tb_writer.add_scalar(f"train/{name}", value, global_step)
    return fields


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             print_freq: int = 10, is_main: bool = True, sharded: bool = True) -> Dict[str, float]:
    """Top-1/top-5 accuracy and mean CE of ``model`` (not DDP-wrapped: its buffer broadcasts would
    hang ranks that hold fewer batches).

    ``sharded``: each rank holds an unpadded shard, and correct and total counts are summed over
    ranks once at the end, so every image counts exactly once and 1 or N processes give the same
    numbers; otherwise each rank evaluated the whole set itself. Prints the original's
    `` * Acc@1 X Acc@5 Y`` line on rank 0.
    """
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, CE sum, images, unreadable
    progress = Progress("Test:", len(data_loader), print_freq, is_main)
    for index, (images, targets, num_unreadable) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices.eq(targets[:, None])
        batch_totals = [hits[:, 0].sum(), hits.any(dim=-1).sum(), F.cross_entropy(logits, targets, reduction="sum")]
        totals += torch.tensor([value.item() for value in batch_totals] + [len(targets), int(num_unreadable)],
                               dtype=torch.float64, device=device)
        count = totals[3].item()
        progress.update(index + 1, {"acc1": f"{100 * totals[0].item() / count:.3f}",
                                "acc5": f"{100 * totals[1].item() / count:.3f}"})
    progress.close()
    if sharded:
        reduce_over_ranks(totals)
    top1, top5, loss_sum, count, unreadable = totals.tolist()
    if count == 0:
        raise ValueError("the validation set holds no readable image")
    results = {"acc1": 100 * top1 / count, "acc5": 100 * top5 / count, "loss": loss_sum / count,
               "images": int(count), "unreadable_images": int(unreadable)}
    if is_main:
        print(f" * Acc@1 {results['acc1']:.3f} Acc@5 {results['acc5']:.3f}", flush=True)
    return results
