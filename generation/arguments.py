"""The command line of ``python -m generation.main``: every flag with its default (``build_parser``), YAML
configs under it (``vkd.config``), and the impossible values refused before any work (``check_arguments``)."""
import argparse
import os
from typing import Dict, Optional

from generation import data as gan_data
from generation import diffaug
from generation.distillation import PAIRINGS
from generation.fid import FID_EXTRACTORS
from generation.teachers import CLIP_INPUT_SIZE, CLIP_MODEL
from vkd.checkpoints import file_sha256
from vkd.config import OneLineErrorParser, config_origins, flag_name, parse_with_config
from vkd.data.subsets import SUBSET_FRACTIONS
from vkd.distributed import DEFAULT_TIMEOUT_MINUTES
from vkd.errors import BadInput
from vkd.norms import NORMALISATIONS, WHITENINGS, build_normalisation
from vkd.orthogonal_maps import ORTHOGONAL_MAPS

TEACHERS = ("none", "clip", "timm")
PROJECTOR_OWNERS = ("D", "G")
# What defines the run a checkpoint belongs to, as spelled on the command line: a resume that changed one of them
# would train another run than the one it continues, and is refused (``vkd.runs.refuse_a_different_run``). The
# other flags say where the files are, how often to print, save, sample and evaluate, and how to evaluate; none
# of them changes the weights. --iterations may grow (``checkpointing.refuse_another_run``).
RUN_DEFINING_FLAGS = (
    "--dataset", "--data-fraction", "--subset-draw", "--subset-seed", "--hflip", "--g-ch", "--d-ch", "--dim-z",
    "--batch-size", "--num-d-steps", "--g-lr", "--d-lr", "--adam-betas", "--adam-eps", "--ema-decay", "--ema-start",
    "--diffaug", "--lecam-weight", "--lecam-decay", "--lecam-start", "--teacher", "--teacher-model",
    "--teacher-input-size", "--clip-normalise", "--vkd-weight", "--normalisation", "--whitening", "--whiten-eps",
    "--real-fake-normalisation", "--kd-dim", "--projector-optimizer", "--train-projector", "--orthogonal-map", "--seed",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("BigGAN + DiffAugment (+ LeCam) (+ VkD) for 32x32 images")
    add = parser.add_argument
    flag = dict(action=argparse.BooleanOptionalAction)
    add("--config", default=None, metavar="FILE.yaml", help="YAML file of defaults; the command line overrides it")
    # Data
    add("--dataset", default="C10", choices=gan_data.DATASETS, help="(default: C10)")
    add("--data-path", default=None, help="dataset folder (DIGITS: export folder, default data/digits)")
    add("--download", action="store_true", help="C10 / C100: torchvision downloads it into --data-path when missing")
    add("--data-fraction", default=1.0, type=float, help="fraction of the training split kept (default: 1.0)")
    add("--subset", dest="data_fraction", type=subset_fraction, default=argparse.SUPPRESS,
        metavar="{FULL," + ",".join(SUBSET_FRACTIONS) + "}",
        help="classification's spelling of --data-fraction (10PERCENT: 0.1); the draw stays --subset-draw's")
    add("--subset-draw", default="uniform", choices=gan_data.SUBSET_DRAWS,
        help="uniform without replacement as KD-DLGAN, or class-balanced (default: uniform)")
    add("--subset-seed", default=0, type=int, help="seed of the subset draw, fixed across runs (default: 0)")
    add("--hflip", default=True, help="random horizontal flip of real images (default: on, as KD-DLGAN)", **flag)
    # Networks
    add("--g-ch", default=64, type=int, help="generator width: blocks have 4 x ch channels (default: 64)")
    add("--d-ch", default=64, type=int, help="discriminator width: blocks have 4 x ch channels (default: 64)")
    add("--dim-z", default=128, type=int, help="latent size (default: 128)")
    # Optimisation
    add("--iterations", default=125000, type=int, help="G iterations (default: 125000 = CIFAR 10%%, 5000 epochs)")
    add("--batch-size", default=50, type=int, help="per-process batch of every D and G step (default: 50)")
    add("--num-d-steps", default=4, type=int, help="D steps per G step (default: 4)")
    add("--g-lr", default=2e-4, type=float, help="(default: 2e-4)")
    add("--d-lr", default=2e-4, type=float, help="(default: 2e-4)")
    add("--adam-betas", default=[0.0, 0.999], type=float, nargs=2, help="(default: 0 0.999)")
    add("--adam-eps", default=1e-8, type=float, help="(default: 1e-8)")
    add("--ema-decay", default=0.9999, type=float, help="EMA decay of G (default: 0.9999)")
    add("--ema-start", default=1000, type=int, help="iteration from which G_ema averages; a copy before (default: 1000)")
    add("--diffaug", default="translation,cutout", help="DiffAugment policy: translation,cutout[,color] or none")
    add("--lecam-weight", default=0.0, type=float, help="LeCam weight; KD-DLGAN's lc- scripts use 0.3 (default: 0, off)")
    add("--lecam-decay", default=0.9, type=float, help="(default: 0.9)")
    add("--lecam-start", default=1000, type=int, help="iteration after which LeCam applies (default: 1000)")
    # VkD
    add("--teacher", default="none", choices=TEACHERS, help="distillation teacher (default: none = DA only)")
    add("--teacher-model", default=None, help=f"CLIP architecture in open_clip (default {CLIP_MODEL}) or timm name")
    add("--teacher-path", default=None,
        help="local teacher weights (timm: required; CLIP: without it open_clip downloads OpenAI's weights)")
    add("--teacher-input-size", default=0, type=int,
        help=f"teacher input side, nearest upsampling (default: {CLIP_INPUT_SIZE} for CLIP, else the image size)")
    add("--clip-normalise", default=False, help="CLIP mean/std on the teacher input (KD-DLGAN: off)", **flag)
    add("--vkd-weight", default=1.0, type=float, help="lambda of the VkD term (default: 1)")
    add("--normalisation", default="whiten", choices=tuple(NORMALISATIONS),
        help="teacher normalisation (default: whiten)")
    add("--whitening", default="cholesky", choices=WHITENINGS, help="whitening variant (default: cholesky, as htdt)")
    add("--whiten-eps", default=1e-4, type=float, help="whitening shrinkage eps > 0 (default: 1e-4)")
    add("--real-fake-normalisation", default="separate", choices=PAIRINGS,
        help="normalise real and fake teacher features separately or as one batch (default: separate)")
    add("--kd-dim", default=0, type=int, help="D's KD-head width (default: 0 = the teacher's feature width)")
    add("--projector-optimizer", default="D", choices=PROJECTOR_OWNERS,
        help="optimizer owning the projector; with G it is frozen in the D steps like the rest of G (default: D)")
    add("--train-projector", default=True, help="train the projector (default: on)", **flag)
    add("--orthogonal-map", default=None, choices=ORTHOGONAL_MAPS, help="(default: torch's choice for the shape)")
    # Evaluation
    add("--fid-extractor", default="inception", choices=FID_EXTRACTORS,
        help="inception (the paper's protocol), a local timm classifier, or none (default: inception)")
    add("--fid-weights", default=None,
        help="local weights of the FID network (timm: required; inception: without it torch-fidelity's are downloaded)")
    add("--fid-model", default=None, help="timm name of the FID network with --fid-extractor timm")
    add("--fid-input-size", default=32, type=int, help="input side of a timm FID network (default: 32)")
    add("--fid-reference", default="test", choices=("test", "train"), help="real images of FID (default: test split)")
    add("--eval-samples", default=10000, type=int, help="generated samples per FID (default: 10000)")
    add("--eval-every", default=4000, type=int, help="iterations between FIDs; 0: at the end only (default: 4000)")
    add("--is-splits", default=10, type=int, help="Inception Score splits (default: 10)")
    add("--eval-checkpoint", default=None, help="only evaluate the G_ema of this checkpoint")
    add("--eval-repeats", default=1, type=int, help="with --eval-checkpoint: FIDs with fresh samples (default: 1)")
    # Run
    add("--output-dir", "--output_dir", default="", help="where to write; empty for nothing")
    add("--resume", default="", help="checkpoint to resume, or 'auto' for output-dir/latest.pth")
    add("--overwrite", action="store_true",
        help="start a new run in an --output-dir that holds one: the old run is moved aside, never deleted")
    add("--seed", default=0, type=int, help="each process uses seed + rank (default: 0)")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--print-freq", default=100, type=int, help="iterations between progress lines (default: 100)")
    add("--save-every", default=1000, type=int, help="iterations between latest.pth saves (default: 1000)")
    add("--sample-every", default=4000, type=int, help="iterations between sample grids (default: 4000)")
    add("--local-rank", "--local_rank", default=0, type=int, dest="local_rank", help="set by the launchers")
    add("--dist-url", default="env://", help="process group init method")
    add("--dist-timeout", default=DEFAULT_TIMEOUT_MINUTES, type=float, metavar="MINUTES",
        help=f"a collective that waits this long (a dead rank) stops the run (default: {DEFAULT_TIMEOUT_MINUTES:g})")
    return parser


def subset_fraction(name: str) -> float:
    """A --subset name as its --data-fraction."""
    if name != "FULL" and name not in SUBSET_FRACTIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: '{name}' (choose from FULL, {', '.join(SUBSET_FRACTIONS)})")
    return SUBSET_FRACTIONS.get(name, 1.0)


def parse_arguments(argv) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)[0]


def checked_arguments(argv) -> argparse.Namespace:
    """The arguments of ``argv`` (``--config``'s defaults under the command line), checked: a value that cannot work
    is one line naming its flag, or the config file and key that set it."""
    args, explicit, _ = parse_with_config(build_parser(), argv)
    check_arguments(args, config_origins(args.config, explicit))
    return args


def check_arguments(args, origins: Optional[Dict[str, str]] = None) -> None:
    """Impossible values: one line and exit code 2, before any work. ``origins``: the config file that set
    each value (``vkd.config.config_origins``), named instead of the flag."""
    origins = origins or {}
    for name in ("iterations", "batch_size", "num_d_steps", "print_freq", "save_every", "sample_every", "g_ch",
                 "d_ch", "dim_z", "eval_samples", "is_splits", "eval_repeats"):
        if getattr(args, name) < 1:
            raise BadInput(f"{flag_name(name, origins)} must be at least 1, got {getattr(args, name)}")
    if args.eval_every < 0:
        raise BadInput(f"{flag_name('eval_every', origins)} must be >= 0, got {args.eval_every}")
    if not args.dist_timeout > 0:
        raise BadInput(f"{flag_name('dist_timeout', origins)} must be > 0 minutes, got {args.dist_timeout:g}")
    try:
        diffaug.parse_policy(args.diffaug)
        if args.teacher != "none":
            build_normalisation(args.normalisation, args.whitening, args.whiten_eps)
    except ValueError as error:
        raise BadInput(str(error)) from None
    if args.download and args.dataset not in gan_data.DOWNLOADABLE:
        raise BadInput(f"--download fetches {' or '.join(gan_data.DOWNLOADABLE)}; {args.dataset} is read from local files")
    if args.teacher == "timm" and not args.teacher_model:
        raise BadInput("--teacher timm needs --teacher-model NAME (a timm model name)")
    if args.fid_extractor == "timm" and not args.fid_model:
        raise BadInput("--fid-extractor timm needs --fid-model NAME (a timm model name)")
    if args.resume == "auto" and not args.output_dir:
        raise BadInput("--resume auto looks for output-dir/latest.pth: pass --output-dir")
    if args.data_path and os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise BadInput(f"--data-path {args.data_path} is a file: pass the folder that holds the {args.dataset} data")
    if args.fid_extractor != "none" and args.teacher != "none" and args.teacher_path and args.fid_weights \
            and same_file(args.teacher_path, args.fid_weights):
        raise BadInput("the FID network must not be the distillation teacher: --fid-weights and --teacher-path hold the same file")


def same_file(first: str, second: str) -> bool:
    """One file, or two files with the same bytes (a copy of the teacher is still the teacher)."""
    if not (os.path.isfile(first) and os.path.isfile(second)):
        return False
    if os.path.samefile(first, second):
        return True
    if os.path.getsize(first) != os.path.getsize(second):
        return False
    return file_sha256(first) == file_sha256(second)
