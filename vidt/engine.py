"""train_one_epoch and evaluate (DETR's engine; the criterion owns the VkD teacher)."""
import contextlib
import math
import re
from typing import Dict, Iterable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from vidt.datasets.coco_eval import CocoEvaluator
from vkd.distributed import is_distributed, is_main_process, mean_over_ranks
from vkd.errors import RunFailed
from vkd.preemption import StopRequest, rng_states, set_rng_states
from vkd.progress import Progress, RunningMeans

AUX_SUFFIX = re.compile(r"_\d+$")


def _printed(name: str) -> bool:
    """Console lines show the final-level terms; unscaled and auxiliary terms go to log.txt only."""
    return not (name.endswith("_unscaled") or AUX_SUFFIX.search(name))


def _shown(means: Dict[str, float]) -> Dict[str, str]:
    return {name: f"{value:.4g}" for name, value in means.items() if _printed(name)}


def _weighted_sum(loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]) -> torch.Tensor:
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def _averaged_over_ranks(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Scalar tensors (the same names on every process) averaged over processes in one all-reduce."""
    if not is_distributed():
        return values
    names = sorted(values)
    return dict(zip(names, mean_over_ranks(torch.stack([values[name] for name in names]))))


def _log_values(loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]):
    """(total, scaled terms, unscaled terms plus class_error), averaged over processes, for logging."""
    reduced = _averaged_over_ranks({k: v.detach() for k, v in loss_dict.items()})
    scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
    unscaled = {f"{k}_unscaled": v for k, v in reduced.items() if k != "class_error"}
    return sum(scaled.values()), scaled, dict(unscaled, class_error=reduced["class_error"])


def _gradients_kept_local(model: torch.nn.Module, local: bool):
    """DDP's ``no_sync`` for a micro-batch that does not end an optimizer step: its gradients accumulate on this
    process, and the backward of the step's last micro-batch all-reduces the sum once."""
    if local and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, max_norm: float,
                    n_iter_to_acc: int = 1, print_freq: int = 100, tb_writer=None,
                    stop: Optional[StopRequest] = None, resumed: Optional[dict] = None) -> Dict[str, float]:
    """One epoch over ``data_loader``.

    With gradient accumulation the loader yields micro-batches of batch_size / n_iter_to_acc images, each
    padded on its own (the original divides --batch_size before building the loader), and the optimizer
    steps after every n_iter_to_acc of them. As in the original, gradients are cleared only after a step,
    so an epoch's leftover micro-batches count towards the next epoch's first step.

    ``stop``: once it is requested, the epoch ends at the next optimizer step boundary and returns
    ``{"preempted_at": iteration, "partial": ...}``, ``partial`` being this rank's running sums and random
    generators. ``resumed``: such a ``partial``, from a preempted run's checkpoint: its first ``step``
    micro-batches are drawn and dropped (loader workers then stand where they stood), then the sums and
    generators are restored, so the epoch goes on as if it had never stopped.
    """
    model.train()
    criterion.train()
    steps = len(data_loader)
    running = RunningMeans()
    iterator = iter(data_loader)
    first = 0
    if resumed is not None:
        first = resumed["step"]
        for _ in range(first):
            next(iterator)
        running.sums.update(resumed["sums"])
        running.counts.update(resumed["counts"])
        set_rng_states(resumed["rng"])
    progress = Progress(f"Epoch: [{epoch}]", steps, print_freq, is_main_process(), first=first)
    for iteration in range(first, steps):
        # Checked before the next batch is drawn (without loader workers, drawing uses this process's
        # generators, which the checkpoint holds as they are here), and never between the micro-batches of
        # one step, whose accumulated gradients a checkpoint does not hold.
        if stop is not None and iteration > first and iteration % n_iter_to_acc == 0 and stop.requested(device):
            progress.close()
            return {"preempted_at": iteration, "partial": dict(
                step=iteration, sums=dict(running.sums), counts=dict(running.counts), rng=rng_states())}
        samples, targets = next(iterator)
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        ends_step = (iteration + 1) % n_iter_to_acc == 0
        with _gradients_kept_local(model, not ends_step):
            outputs = model(samples)
            loss_dict = criterion(outputs, targets, samples)
            loss = _weighted_sum(loss_dict, criterion.weight_dict)
            total_loss, scaled, unscaled = _log_values(loss_dict, criterion.weight_dict)
            if not math.isfinite(total_loss.item()):
                terms = ", ".join(f"{name}={value.item():.6g}" for name, value in scaled.items())
                raise RunFailed(f"loss is {total_loss.item()} at epoch {epoch}, iteration {iteration}: stopping "
                                f"training; terms: {terms}")
            (loss / n_iter_to_acc).backward()
        stepped = {}
        if ends_step:
            if max_norm > 0:
                stepped["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        running.add(dict(loss=total_loss, **scaled, **unscaled, **stepped, lr=lr))
        progress.update(iteration + 1, _shown(running.means()))
        if tb_writer is not None:
            step = epoch * len(data_loader) + iteration
            for name, value in {"loss": total_loss, **scaled, **stepped, "lr": lr}.items():
                if _printed(name):
                    tb_writer.add_scalar(f"train/{name}", float(value), step)
    progress.close()
    return running.means()


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, postprocessors: Dict, data_loader: Iterable,
             coco_gt, device: torch.device, print_freq: int = 100):
    """(averaged loss terms plus, on rank 0, ``coco_eval_bbox``: the 12 COCO stats; the COCOeval on rank 0,
    None elsewhere)."""
    model.eval()
    criterion.eval()
    evaluator = CocoEvaluator(coco_gt)
    progress = Progress("Test:", len(data_loader), print_freq, is_main_process())
    running = RunningMeans()
    for iteration, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        outputs = model(samples)
        total_loss, scaled, unscaled = _log_values(criterion(outputs, targets), criterion.weight_dict)
        running.add(dict(loss=total_loss, **scaled, **unscaled))
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig_sizes)
        evaluator.update({int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)})
        progress.update(iteration + 1, _shown(running.means()))
    progress.close()
    stats = running.means()
    coco_eval = evaluator.summarize()
    if coco_eval is not None:
        stats["coco_eval_bbox"] = [float(s) for s in coco_eval.stats]
    return stats, coco_eval
