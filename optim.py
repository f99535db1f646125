"""Optimisation: parameter groups (with the projector weight-decay choice), the optimizer, the per-iteration
LR schedule."""

import torch
import torch.nn as nn
from timm.scheduler import create_scheduler_v2

REFERENCE_BATCH = 512  # lr = --lr x global batch / 512 (DeiT's linear scaling rule)


def effective_lr(args, world_size: int) -> float:
    return args.lr if args.unscale_lr else args.lr * args.batch_size * world_size / REFERENCE_BATCH


def parameter_groups(model: nn.Module, weight_decay: float, decay_projector: bool = True):
    """No weight decay on 1-D parameters, biases and the model's ``no_weight_decay()`` names (the original's
    rule), nor on ``projector.*`` unless ``decay_projector``.

    Why the projector option: torch's Householder map takes each column's sign from int() of the
    diagonal of ``original``, which receives no gradient; decay moves it off -1 and int() turns it
    to 0, so the original recipe trains with a zero projector after its first step (README).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt_projector = not decay_projector and name.startswith("projector.")
        if parameter.ndim <= 1 or name.endswith(".bias") or name in skip or exempt_projector:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args, model: nn.Module, lr: float, decay_projector: bool) -> torch.optim.Optimizer:
    groups = parameter_groups(model, args.weight_decay, decay_projector)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, eps=args.opt_eps, betas=tuple(args.opt_betas or (0.9, 0.999)))


def build_lr_scheduler(args, optimizer, steps_per_epoch: int):
    """timm's scheduler stepped per iteration; returns it and the total epoch count (with cooldown)."""
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
