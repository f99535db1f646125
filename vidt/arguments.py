"""Command-line flags of ViDT/VkD, plus this tree's small-image flags, --student_ckpt and --config (YAML files of
defaults under the command line, their keys checked like the flags: ``vkd.config``).

Boolean flags take a value, as in the original (``--eval True``); only 'true'/'false' are accepted.
Flags that the original defines but never uses are kept so the paper's commands parse; setting one to
a non-default value is an error (``NO_EFFECT``, applied by ``check_supported``) instead of being silently ignored.
"""
import argparse
from typing import Dict, List, Optional, Set, Tuple

from vidt.models.build import TEACHER_BACKBONES
from vidt.models.swin_ram import SWIN_VARIANTS
from vkd.config import (
    REFUSED,
    NoEffect,
    OneLineErrorParser,
    always,
    config_origins,
    option_spellings,
    parse_with_config,
    refuse_flags_without_effect,
)
from vkd.distributed import DEFAULT_TIMEOUT_MINUTES
from vkd.errors import BadInput
from vkd.runs import refuse_a_different_run

DEFAULT_TRAIN_SIZES = list(range(480, 801, 16))
MIN_IMAGE_SIDE = 32


def true_or_false(value) -> bool:
    text = str(value).lower()
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")
    return text == "true"


def get_args_parser() -> OneLineErrorParser:
    """The flags of vidt/main.py; a bad flag or value is one ``BadInput`` line."""
    parser = OneLineErrorParser("ViDT + VkD training and evaluation")
    add = parser.add_argument

    # Optimisation and schedule
    add("--lr", default=1e-4, type=float, help="lr of every parameter group (default 1e-4)")
    add("--lr_backbone", default=1e-5, type=float, help="unused by ViDT (the backbone trains at --lr); default 1e-5")
    add("--lr_drop", default=40, type=int,
        help="StepLR period with --sched step; also names extra checkpoints (default 40)")
    add("--batch_size", default=16, type=int, help="images per process (default 16)")
    add("--weight_decay", default=1e-4, type=float, help="AdamW weight decay (default 1e-4)")
    add("--epochs", default=50, type=int, help="training epochs and cosine period (default 50)")
    add("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm, 0 disables (default 0.1)")
    add("--sched", default="warmupcos", choices=["warmupcos", "step"], help="lr schedule (default warmupcos)")
    add("--lr-noise", type=float, nargs="+", default=None, help="cosine lr noise on/off epoch fractions (default off)")
    add("--lr-noise-pct", type=float, default=0.67, help="lr noise limit percent (default 0.67)")
    add("--lr-noise-std", type=float, default=1.0, help="lr noise std-dev (default 1.0)")
    add("--warmup-lr", type=float, default=1e-6, help="warmup start lr (default 1e-6)")
    add("--min-lr", type=float, default=1e-7, help="cosine floor (default 1e-7)")
    add("--warmup-epochs", type=int, default=0, help="warmup epochs (default 0)")
    add("--decay-rate", "--dr", type=float, default=0.1,
        help="cosine cycle decay; unused with ViDT's single cycle (default 0.1)")
    add("--n_iter_to_acc", default=1, type=int,
        help="gradient accumulation steps; must divide --batch_size (default 1)")

    # Model
    add("--method", default="vidt", choices=["vidt", "vidt_wo_neck"], help="detector (default vidt)")
    add("--backbone_name", default="swin_tiny", type=str, help="swin_nano, swin_tiny, swin_small, swin_base_win7_22k")
    add("--pre_trained", default="imagenet", type=str,
        help="'imagenet' (file under ckpts/backbones/), 'none', or a backbone checkpoint path (default imagenet)")
    add("--position_embedding", default="sine", type=str, help="unused by ViDT (default sine)")
    add("--pos_dim", default=256, type=int,
        help="unused by ViDT: --reduced_dim is the [DET] position width (default 256)")
    add("--reduced_dim", default=256, type=int,
        help="neck width, [DET] position width, last backbone level (default 256)")
    add("--dec_layers", default=6, type=int, help="decoder layers (default 6)")
    add("--dim_feedforward", default=1024, type=int, help="decoder FFN width; ViDT fixes it at 1024")
    add("--dropout", default=0.1, type=float, help="decoder dropout (default 0.1)")
    add("--nheads", default=8, type=int, help="decoder heads (default 8)")
    add("--dec_n_points", default=4, type=int, help="deformable sampling points per head and level (default 4)")
    add("--num_feature_levels", default=4, type=int, help="feature levels fed to the neck; ViDT uses 4")
    add("--det_token_num", default=100, type=int, help="number of [DET] tokens / queries (default 100)")
    add("--cross_indices", default=[3], type=int, nargs="+", help="stages with [DET x PATCH] attention (default 3)")
    add("--aux_loss", default=False, type=true_or_false, help="auxiliary per-layer losses (default False)")
    add("--with_box_refine", default=False, type=true_or_false, help="iterative box refinement (default False)")
    add("--cross_scale_fusion", default=False, type=true_or_false,
        help="FPN fusion instead of input_proj: not supported")
    add("--iou_aware", default=False, type=true_or_false, help="IoU-aware head: not supported")
    add("--iouaware_loss_coef", default=2, type=float, help="weight of the IoU-aware loss (needs --iou_aware)")
    add("--token_label", default=False, type=true_or_false, help="token labelling loss: not supported")
    add("--token_loss_coef", default=2, type=float, help="weight of the token-label loss (needs --token_label)")

    # Matcher and losses
    add("--set_cost_class", default=2, type=float, help="matching cost weight of the class term (default 2)")
    add("--set_cost_bbox", default=5, type=float, help="matching cost weight of the L1 term (default 5)")
    add("--set_cost_giou", default=2, type=float, help="matching cost weight of the GIoU term (default 2)")
    add("--cls_loss_coef", default=2, type=float, help="focal class loss weight (default 2)")
    add("--bbox_loss_coef", default=5, type=float, help="L1 box loss weight (default 5)")
    add("--giou_loss_coef", default=2, type=float, help="GIoU loss weight (default 2)")
    add("--focal_alpha", default=0.25, type=float, help="focal alpha of the class loss (default 0.25)")
    add("--dice_loss_coef", default=1, type=float, help="unused (no masks); default 1")
    add("--mask_loss_coef", default=1, type=float, help="unused (no masks); default 1")
    add("--eos_coef", default=0.1, type=float, help="unused with the focal loss; default 0.1")
    add("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str, nargs="+",
        help="unused by ViDT (no reduced lr for offsets)")
    add("--lr_linear_proj_mult", default=0.1, type=float, help="unused by ViDT (default 0.1)")

    # VkD distillation
    add("--distil_model", default=None, type=str,
        help="teacher: vidt_nano, vidt_tiny, vidt_small or vidt_base (default none)")
    add("--distil_model_path", default=None, type=str, help="teacher checkpoint (DETR form, loaded strictly)")
    add("--distil_loss_coef", default=4.0, type=float, help="weight of loss_distil (default 4.0)")

    # Data
    add("--dataset_file", default="coco", choices=["coco", "voc"], help="dataset (only coco is supported)")
    add("--coco_path", default=None, type=str,
        help="COCO 2017 root with train2017/, val2017/ and annotations/ (needed; no default)")
    add("--coco_panoptic_path", default=None, type=str, help="unused")
    add("--remove_difficult", default=False, type=true_or_false, nargs="?", const=True,
        help="unused (VOC only); a bare switch as in the original, or True/False")
    add("--eval_size", default=800, type=int, help="validation short side (default 800)")
    add("--train_sizes", default=DEFAULT_TRAIN_SIZES, type=int, nargs="+",
        help="training short sides (default 480..800 step 16)")
    add("--max_size", default=1333, type=int,
        help="training long-side cap; validation caps at eval_size*max_size//max(train_sizes) (default 1333)")
    add("--num_workers", default=2, type=int, help="data loader workers per process (default 2)")

    # Run control
    add("--config", default=None, metavar="FILE.yaml",
        help="YAML file of defaults (keys are flag names, '-' or '_'); the command line overrides it")
    add("--output_dir", "--output-dir", default="",
        help="run folder under logs/ (default, as in the original: <method>-<BACKBONE>-batch-<b>-epoch-<e>)")
    add("--device", default="cuda", help="cuda or cpu (default cuda)")
    add("--seed", default=42, type=int, help="base seed; each process uses seed + rank (default 42)")
    add("--resume", default="",
        help="checkpoint to resume from or to evaluate (loaded strictly); 'auto': the run folder's checkpoint.pth "
             "if there is one")
    add("--start_epoch", default=0, type=int, help="first epoch (overwritten on resume)")
    add("--student_ckpt", default=None, type=str,
        help="start a new run from these student weights only (loaded strictly; a plain ViDT file's projectors "
             "start fresh), with a new optimizer and schedule: e.g. a run's checkpoint.pth to train on with "
             "other settings, which --resume refuses")
    add("--overwrite", action="store_true",
        help="start a new run in a run folder that holds one: the old run is moved aside to "
             "<folder>.previous-<time>, never deleted (without it such a folder is refused)")
    add("--eval", default=False, type=true_or_false, help="evaluate only (default False)")
    add("--print_freq", default=100, type=int, help="log every N iterations (default 100)")

    # Distributed (rank and world size come from torchrun / torch.distributed.launch --use_env / Slurm)
    add("--dist-url", default="env://",
        help="process group init method (default env://: the launcher's MASTER_ADDR and MASTER_PORT)")
    add("--dist_timeout", "--dist-timeout", default=DEFAULT_TIMEOUT_MINUTES, type=float, metavar="MINUTES",
        help=f"a collective that waits this long (a dead rank) stops the run (default {DEFAULT_TIMEOUT_MINUTES:g})")
    # Accepted for the original's commands: the backend follows the device (nccl on CUDA, gloo on the CPU).
    add("--dist-backend", default="nccl", help=argparse.SUPPRESS)
    add("--rank", default=0, type=int, help="set by the launcher")
    add("--world_size", default=1, type=int, help="set by the launcher; a different value stops the run")
    add("--distributed", default=False, type=true_or_false, nargs="?", const=True,
        help="set by the launcher; given without one, the run stops (a bare switch as in the original)")
    add("--local_rank", "--local-rank", default=0, type=int,
        help="passed by torch.distributed.launch without --use_env; the rank is read from the environment")
    return parser


# Flags accepted for the original's commands (``vkd.config.NoEffect`` rules): a value other than the default is
# refused, since it could not take effect (the paper's commands pass some of these flags at their defaults).
LEAVE_AT_DEFAULT = "{flag} has no effect here: {reason}; leave it at its default"
NO_EFFECT = (
    *(NoEffect(always, {name}, reason, LEAVE_AT_DEFAULT) for name, reason in (
        ("lr_backbone", "the backbone trains at --lr in ViDT"),
        ("decay_rate", "the cosine runs one cycle and --sched step decays by 0.1, as in the original"),
        ("position_embedding", "ViDT has no configurable position embedding"),
        ("pos_dim", "ViDT uses --reduced_dim as the [DET] position width"),
        ("dim_feedforward", "ViDT fixes the decoder FFN at 1024"),
        ("dice_loss_coef", "there are no mask losses"),
        ("mask_loss_coef", "there are no mask losses"),
        ("eos_coef", "the focal loss has no no-object weight"),
        ("lr_linear_proj_names", "ViDT applies no reduced lr"),
        ("lr_linear_proj_mult", "ViDT applies no reduced lr"),
        ("coco_panoptic_path", "panoptic data is not used"),
        ("remove_difficult", "it only applies to VOC"),
        ("iouaware_loss_coef", "--iou_aware is not supported"),
        ("token_loss_coef", "--token_label is not supported"),
        ("dist_backend", "the process group uses nccl on CUDA and gloo on the CPU"),
    )),
    *(NoEffect(always, {name}, reason, REFUSED) for name, reason in (
        ("method", "vidt_wo_neck is not supported; use --method vidt"),
        ("dataset_file", "voc is not supported; use coco"),
        ("cross_scale_fusion", "is not supported (it also crashes in the original teacher builder)"),
        ("iou_aware", "is not supported"),
        ("token_label", "is not supported"),
        ("num_feature_levels", "must be 4 (the four Swin levels)"),
    )),
)


# What defines the optimisation a checkpoint belongs to, as spelled on the command line: a resume that
# changed one of them would log one run and train another. --epochs alone may change (see resumed_epochs).
RUN_DEFINING_FLAGS = (
    "--lr", "--lr_backbone", "--weight_decay", "--batch_size", "--n_iter_to_acc", "--clip_max_norm", "--sched",
    "--lr_drop", "--min-lr", "--warmup-lr", "--warmup-epochs", "--decay-rate", "--lr-noise", "--lr-noise-pct",
    "--lr-noise-std", "--seed", "--cls_loss_coef", "--bbox_loss_coef", "--giou_loss_coef", "--focal_alpha",
    "--set_cost_class", "--set_cost_bbox", "--set_cost_giou", "--aux_loss", "--distil_model", "--distil_loss_coef",
    "--train_sizes", "--max_size",
)


def resumed_epochs(args, checkpoint: dict, world_size: int, path: str):
    """Refuse to continue ``path`` (``checkpoint``, its arguments a dict) with other settings or another number of
    processes, in one line naming the flag, both values and how to start a new run from its weights instead.
    Returns the end of the run the checkpoint was planned for when --epochs moved it, else None.

    The processes that trained it are the file's 'world_size'; files written before it was kept there have the
    launcher's count in their arguments' world_size instead (main.py then overwrote the flag with it)."""
    saved = checkpoint["args"]
    saved_processes = checkpoint.get("world_size", saved.get("world_size"))
    refuse_a_different_run(args, saved, RUN_DEFINING_FLAGS, saved_processes, world_size, path,
                           f"to train its weights with other settings, start a new run: --student_ckpt {path} "
                           f"--output_dir NEW")
    return saved["epochs"] if saved.get("epochs", args.epochs) != args.epochs else None


def parse_arguments(argv: List[str]) -> Tuple[argparse.Namespace, Dict[str, str]]:
    """The arguments, with ``--config``'s defaults under the command line, and the config file that set each value
    not given on the command line (``vkd.config.config_origins``: what an error names)."""
    args, explicit, _ = parse_with_config(get_args_parser(), argv)
    return args, config_origins(args.config, explicit)


def changed_from_default(args, parser: argparse.ArgumentParser) -> Set[str]:
    """The destinations whose value is not ``parser``'s default: what detection's rules look at."""
    defaults = vars(parser.parse_args([]))
    return {dest for dest, value in vars(args).items() if dest in defaults and value != defaults[dest]}


def check_supported(args, origins: Optional[Dict[str, str]] = None) -> None:
    """Stop with one clear line for options that cannot take effect here; ``origins``: the config file that set
    each value (``vkd.config.config_origins``), named instead of the flag."""
    parser = get_args_parser()
    refuse_flags_without_effect(args, changed_from_default(args, parser), NO_EFFECT, origins, option_spellings(parser))
    if args.backbone_name not in SWIN_VARIANTS:
        raise BadInput(f"--backbone_name {args.backbone_name} is not supported; "
                       f"choose from {sorted(SWIN_VARIANTS)}")
    if args.distil_model is not None and args.distil_model not in TEACHER_BACKBONES:
        raise BadInput(f"--distil_model {args.distil_model} is not supported; "
                       f"choose from {sorted(TEACHER_BACKBONES)}")
    if args.batch_size % args.n_iter_to_acc:
        raise BadInput(f"--n_iter_to_acc {args.n_iter_to_acc} must divide --batch_size {args.batch_size}")
    if args.distil_model is not None and not args.distil_model_path:
        raise BadInput("--distil_model needs --distil_model_path")
    # --resume auto may join it: a requeued run then continues its own checkpoint.pth once it has one.
    if args.student_ckpt and (args.eval or args.resume not in ("", "auto")):
        raise BadInput("--student_ckpt starts a new training run from its weights; --resume FILE continues a run "
                       "or, with --eval True, names the file to evaluate: give one of them")
    if args.coco_path is None:
        raise BadInput("--coco_path is needed: the COCO 2017 root with train2017/, val2017/ and annotations/")
    if min(args.train_sizes) < MIN_IMAGE_SIDE or args.eval_size < MIN_IMAGE_SIDE:
        raise BadInput(f"--train_sizes and --eval_size must be at least {MIN_IMAGE_SIDE} "
                       f"(the [DET x PATCH] mask has stride 32)")
