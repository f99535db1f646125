"""AdamW parameter groups and the lr schedule of NAVER's ViDT."""
from typing import Dict, List

import torch
from timm.scheduler import CosineLRScheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Three groups, all at the same lr: head (no 'backbone' in the name, decayed, norms and biases
    included), backbone 1-D/bias/[DET] parameters without decay, and the remaining backbone weights."""
    no_decay = {f"backbone.{name}" for name in model.backbone.no_weight_decay()}
    head, backbone_no_decay, backbone_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "backbone" not in name:
            head.append(param)
        elif param.ndim == 1 or name.endswith(".bias") or name in no_decay:
            backbone_no_decay.append(param)
        else:
            backbone_decay.append(param)
    return [{"params": head, "weight_decay": weight_decay},
            {"params": backbone_no_decay, "weight_decay": 0.0},
            {"params": backbone_decay, "weight_decay": weight_decay}]


def build_scheduler(optimizer: torch.optim.Optimizer, args):
    if args.sched == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    noise_range = None
    if args.lr_noise is not None:
        noise_range = [fraction * args.epochs for fraction in args.lr_noise]
        noise_range = noise_range[0] if len(noise_range) == 1 else noise_range
    return CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_lr_init=args.warmup_lr,
                             warmup_t=args.warmup_epochs, cycle_decay=args.decay_rate, noise_range_t=noise_range,
                             noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)


def step_scheduler(scheduler, finished_epoch: int) -> None:
    """Called after each epoch with the finished epoch's index, as the original calls ``step(epoch)``.

    So the next epoch runs at the schedule's value for the finished one: with the cosine, epochs 0 and 1
    both run at the base lr and epoch e >= 1 at lr(e-1); with ``--sched step``, at
    lr * 0.1 ** ((e-1) // lr_drop), so the first drop comes at epoch lr_drop + 1 (the original's
    one-epoch lag; torch's closed form for ``StepLR.step(epoch)``, computed here without its deprecated call).
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
        factor = scheduler.gamma ** (finished_epoch // scheduler.step_size)
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor
        scheduler.last_epoch = finished_epoch
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    else:
        scheduler.step(finished_epoch)
