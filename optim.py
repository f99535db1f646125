"""Optimisation: its flags, parameter groups (with the projector weight-decay choice), the optimizer, the
per-iteration LR schedule."""
import argparse

import torch
import torch.nn as nn
from timm.scheduler import create_scheduler_v2

REFERENCE_BATCH = 512  # lr = --lr x global batch / 512 (DeiT's linear scaling rule)
SCHEDULES = ("cosine", "tanh", "step", "poly", "constant")
INFINITY = float("inf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimizer and the per-iteration learning-rate schedule (the original's flags and defaults)."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", default=300, type=int, help="(default: 300)")
    group.add_argument("--unscale-lr", action="store_true",
                       help="use --lr as given; by default lr = --lr x batch x processes / 512 (the original "
                            "computed that but always trained at --lr)")
    group.add_argument("--opt", default="adamw", choices=("adamw", "sgd"), help="(default: adamw)")
    group.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON", help="AdamW epsilon (default: 1e-8)")
    group.add_argument("--opt-betas", default=None, type=float, nargs=2, metavar="BETA",
                       help="AdamW betas (default: 0.9 0.999)")
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: off)")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.05, help="(default: 0.05; none on 1-D params)")
    group.add_argument("--sched", default="cosine", choices=SCHEDULES, help="(default: cosine)")
    group.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="(default: 5e-4)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct",
                       help="lr noise on/off points as fractions of the schedule")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT",
                       help="lr noise limit (default: 0.67)")
    group.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV", help="lr noise std (default: 1)")
    group.add_argument("--warmup-lr", type=float, default=5e-6, metavar="LR", help="(default: 5e-6)")
    group.add_argument("--min-lr", type=float, default=5e-6, metavar="LR", help="(default: 5e-6)")
    group.add_argument("--decay-epochs", type=float, default=30, metavar="N",
                       help="step schedule interval (default: 30)")
    group.add_argument("--warmup-epochs", type=int, default=0, metavar="N", help="(default: 0)")
    group.add_argument("--cooldown-epochs", type=int, default=0, metavar="N",
                       help="epochs at --min-lr added after the schedule (default: 0)")
    group.add_argument("--patience-epochs", type=int, default=10, metavar="N", help=argparse.SUPPRESS)
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE",
                       help="step decay factor, or the power of the poly schedule (default: 0.1)")


# dest: (low, high, low included, high included)
VALUE_RANGES = {
    "lr": (0.0, INFINITY, False, False), "min_lr": (0.0, INFINITY, True, False),
    "warmup_lr": (0.0, INFINITY, True, False), "weight_decay": (0.0, INFINITY, True, False),
    "clip_grad": (0.0, INFINITY, False, False), "momentum": (0.0, 1.0, True, False),
    "opt_eps": (0.0, INFINITY, False, False), "decay_epochs": (0.0, INFINITY, False, False),
    "decay_rate": (0.0, INFINITY, False, False),
}
# (applies when, flags that then have no effect, why).
NO_EFFECT = (
    (lambda a: a.opt != "adamw", {"opt_eps", "opt_betas"}, "they apply to --opt adamw"),
    (lambda a: a.opt != "sgd", {"momentum"}, "it applies to --opt sgd"),
    (lambda a: a.sched != "step", {"decay_epochs"}, "it applies to --sched step"),
    (lambda a: a.sched not in ("step", "poly"), {"decay_rate"}, "it applies to --sched step or poly"),
    (lambda a: a.lr_noise is None, {"lr_noise_pct", "lr_noise_std"}, "they apply with --lr-noise"),
    (lambda a: a.warmup_epochs == 0, {"warmup_lr"}, "it applies with --warmup-epochs > 0"),
    (lambda a: True, {"patience_epochs"}, "a plateau schedule cannot be stepped per iteration"),
)


def effective_lr(args, world_size: int) -> float:
    return args.lr if args.unscale_lr else args.lr * args.batch_size * world_size / REFERENCE_BATCH


def parameter_groups(model: nn.Module, weight_decay: float, decay_projector: bool = True):
    """No weight decay on 1-D parameters, biases and the model's ``no_weight_decay()`` names (the original's
    rule), nor on ``projector.*`` unless ``decay_projector``.

    Why the projector option: torch's Householder map takes each column's sign from int() of the
    diagonal of ``original``, which receives no gradient; decay moves it off -1 and int() turns it
    to 0, so the original recipe trains with a zero projector after its first step (docs/differences.md).
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
