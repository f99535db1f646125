"""Data-limited class-conditional BigGAN with VkD (paper: image generation on CIFAR-10/100 with 10%, 20%
and 100% of the training data), on 1..N processes.

    python -m generation.main --config configs/generation/c10_10pct_vkd_whiten.yaml --data-path DATA --download \\
        --output-dir OUT                                      (CIFAR, CLIP and Inception weights downloaded once)
    ... --teacher-path open_clip_pytorch_model.bin --fid-weights weights-inception-2015-12-05-6726825d.pth
                                                              (without a network: local files, nothing downloaded)
    torchrun --nproc_per_node=N -m generation.main ...          (gradients averaged over processes)
    python -m generation.main --eval-checkpoint OUT/best.pth ...  (FID of a saved generator, no training)

Writes args.json, log.txt (JSON lines), tensorboard scalars, samples/iter_N.png grids, latest.pth
(atomically, every --save-every iterations), best.pth (best FID) and results.json to --output-dir;
``--resume auto`` continues an interrupted run exactly where it stopped, with the flags it was started with.
SIGTERM or SIGUSR1 stop the run at the next iteration boundary with latest.pth written and exit code 124.
"""
import argparse
import contextlib
import copy
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from generation import data as gan_data
from generation import diffaug
from generation.biggan import Discriminator, Generator
from generation.engine import GanStep, LeCam
from generation.fid import FID_EXTRACTORS, GeneratorEvaluator, build_fid_network
from generation.teachers import CLIP_INPUT_SIZE, CLIP_MODEL, FrozenImageNetwork, load_clip, load_timm_network
from generation.vkd import NORMALISATIONS, PAIRINGS, GanVkDLoss
from vkd.checkpoints import all_finite, file_sha256, safe_torch_load, save_atomically
from vkd.cli import entry_point
from vkd.config import OneLineErrorParser, config_origins, flag_name, parse_with_config
from vkd.distributed import Runtime, every_rank, start_processes
from vkd.ema import ModelEMA, after_start
from vkd.errors import BadInput, CheckpointError, RunFailed
from vkd.norms import WHITENINGS, build_normalisation
from vkd.orthogonal_maps import ORTHOGONAL_MAPS
from vkd.preemption import Preempted, StopRequest, preempted_line, rng_states, set_rng_states
from vkd.progress import Progress, RunningMeans, append_json_line, tensorboard_writer
from vkd.projector import OrthogonalProjector
from vkd.reproducibility import configure_cuda_kernels, seed_everything
from vkd.runs import ARGS_FILE, LOG, prepare_output_dir, record_invocation, resolve_resume, trim_log, write_json

LATEST, BEST, RESULTS = "latest.pth", "best.pth", "results.json"
TEACHERS = ("none", "clip", "timm")
PROJECTOR_OWNERS = ("D", "G")
GRID_COLUMNS = 10
EVAL_SEED_OFFSET = 7919  # evaluation draws its own latents, so evaluating never shifts training randomness
# What a resume may change: where the files are, how often to print, save, sample and evaluate, and the
# evaluation itself; none of it changes the weights. Every other flag must be the checkpoint's (--iterations
# may grow), so a resumed run is the run it continues.
MAY_CHANGE_ON_RESUME = frozenset({
    "config", "data_path", "teacher_path", "device", "output_dir", "resume", "overwrite", "print_freq", "save_every",
    "sample_every", "local_rank", "dist_url", "fid_extractor", "fid_weights", "fid_model", "fid_input_size",
    "fid_reference", "eval_samples", "eval_every", "is_splits", "eval_checkpoint", "eval_repeats"})


# ============================================================================ command line

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
    add("--normalisation", default="whiten", choices=NORMALISATIONS, help="teacher normalisation (default: whiten)")
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
    add("--output-dir", default="", help="where to write; empty for nothing")
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
    return parser


def parse_arguments(argv) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)[0]


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


# ============================================================================ building

def init_runtime(args) -> Runtime:
    configure_cuda_kernels(fixed_shapes=True)  # every batch is batch-size x 3 x 32 x 32
    return start_processes(args.device, args.local_rank, args.dist_url)


def build_teacher(args, device: torch.device) -> Optional[FrozenImageNetwork]:
    if args.teacher == "none":
        return None
    if args.teacher == "clip":
        return load_clip(args.teacher_path, args.teacher_model or CLIP_MODEL,
                         args.teacher_input_size or CLIP_INPUT_SIZE, args.clip_normalise, device)
    return load_timm_network(args.teacher_model, args.teacher_path, args.teacher_input_size or gan_data.IMAGE_SIZE,
                             "--teacher-path").to(device)


def build_networks(args, num_classes: int, teacher: Optional[FrozenImageNetwork]):
    """G, D (with KD head and projector when distilling) and G_ema; identical on every process."""
    torch.manual_seed(args.seed)
    generator = Generator(args.g_ch, args.dim_z, num_classes)
    kd_dim = (args.kd_dim or teacher.feature_dim) if teacher is not None else 0
    discriminator = Discriminator(args.d_ch, num_classes, kd_dim)
    if teacher is not None:
        if kd_dim > teacher.feature_dim:
            raise BadInput(f"--kd-dim {kd_dim} exceeds the teacher's {teacher.feature_dim} features: an orthogonal "
                 f"projector needs out >= in")
        discriminator.projector = OrthogonalProjector(kd_dim, teacher.feature_dim, orthogonal_map=args.orthogonal_map)
        discriminator.projector.requires_grad_(args.train_projector)
    return generator, discriminator, copy.deepcopy(generator)


def parameter_split(args, generator: nn.Module, discriminator: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(G's optimizer parameters, D's): the projector joins its owner's list, or none when frozen."""
    projector = list(discriminator.projector.parameters()) if discriminator.projector is not None else []
    projector_ids = {id(parameter) for parameter in projector}
    d_parameters = [p for p in discriminator.parameters() if id(p) not in projector_ids]
    g_parameters = list(generator.parameters())
    if args.train_projector:
        (d_parameters if args.projector_optimizer == "D" else g_parameters).extend(projector)
    return g_parameters, d_parameters


def build_evaluator(args, data: gan_data.ImageData, runtime: Runtime) -> Optional[GeneratorEvaluator]:
    if args.fid_extractor == "none" or not runtime.is_main:
        return None
    network = build_fid_network(args.fid_extractor, args.fid_weights, args.fid_model, args.fid_input_size)
    runtime.log(f"FID network: {network.name}, weights: {network.source}")
    reference = data.test_images if args.fid_reference == "test" else data.train_images
    return GeneratorEvaluator(network, gan_data.to_model_range(reference), args.batch_size, runtime.device,
                              args.is_splits)


@contextlib.contextmanager
def unchanged(module: nn.Module):
    """Run ``module`` in train mode and put its state back: BigGAN samples with batch statistics, which
    (like spectral norm's power iteration) update buffers that sampling must not change."""
    state = copy.deepcopy(module.state_dict())
    module.train()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.load_state_dict(state)


def sample_function(generator: nn.Module, batch_size: int, device: torch.device, seed: int):
    """``sample(n)``: n images from ``generator`` with uniform labels, drawn in full batches (batch norm
    then always sees the training batch size)."""
    rng = torch.Generator().manual_seed(seed)

    def sample(count: int) -> torch.Tensor:
        z = torch.randn(batch_size, generator.dim_z, generator=rng)
        labels = torch.randint(0, generator.num_classes, (batch_size,), generator=rng)
        return generator(z.to(device), labels.to(device))[:count]

    return sample


def evaluate(evaluator: GeneratorEvaluator, generator_ema: nn.Module, args, device, seed: int) -> Dict[str, float]:
    with unchanged(generator_ema):
        return evaluator.evaluate(sample_function(generator_ema, args.batch_size, device, seed), args.eval_samples)


def save_sample_grid(generator_ema: nn.Module, path: str, seed: int, batch_size: int, device: torch.device) -> None:
    """GRID_COLUMNS samples of every class, one class per row, from fixed latents (in training-size batches)."""
    from torchvision.utils import save_image
    rng = torch.Generator().manual_seed(seed)
    num_classes = generator_ema.num_classes
    z = torch.randn(num_classes * GRID_COLUMNS, generator_ema.dim_z, generator=rng)
    labels = torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    with unchanged(generator_ema):
        images = torch.cat([generator_ema(z_chunk.to(device), y_chunk.to(device)).cpu()
                            for z_chunk, y_chunk in zip(z.split(batch_size), labels.split(batch_size))])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image((images + 1) / 2, path, nrow=GRID_COLUMNS, padding=1)


# ============================================================================ checkpoints

def checkpoint_content(args, step: GanStep, generator_ema: nn.Module, real_batches, iteration: int,
                       best: Dict[str, float], training_images: int, ranks: List[dict]) -> dict:
    """``ranks``: what each rank holds of its own (``rank_state``), in rank order."""
    return {
        "G": step.generator.state_dict(), "D": step.discriminator.state_dict(), "G_ema": generator_ema.state_dict(),
        "g_optimizer": step.g_optimizer.state_dict(), "d_optimizer": step.d_optimizer.state_dict(),
        "real_batches": real_batches.state_dict(),
        "lecam": [rank["lecam"] for rank in ranks] if step.lecam else None,
        "iteration": iteration, "best": dict(best), "rng": [rank["rng"] for rank in ranks],
        "args": dict(vars(args)), "processes": step.world_size, "training_images": training_images,
    }


def save_latest(args, runtime: Runtime, step: GanStep, generator_ema: nn.Module, real_batches, iteration: int,
                best: Dict[str, float], training_images: int) -> None:
    """Every rank calls it (what each holds of its own is gathered); the main process writes."""
    # The weights are the same on every rank, so every rank stops here or none does.
    if not all_finite(step.generator.state_dict()) or not all_finite(step.discriminator.state_dict()):
        raise RunFailed(f"the weights became non-finite by iteration {iteration}; {LATEST} was left as it was")
    ranks = every_rank(rank_state(step))
    if runtime.is_main:
        save_atomically(checkpoint_content(args, step, generator_ema, real_batches, iteration, best, training_images,
                                           ranks), os.path.join(args.output_dir, LATEST))


def rank_state(step: GanStep) -> dict:
    """What differs between ranks: the random generators (each rank draws its own z, labels and augmentations)
    and LeCam's averages (of each rank's own logits)."""
    return {"rng": rng_states(), "lecam": step.lecam.state_dict() if step.lecam else None}


def option_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """Each destination's long flag, as a person types it."""
    return {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}


def shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "unset" if value is None else str(value)


def check_same_run(args, checkpoint: dict, path: str, processes: int) -> Optional[int]:
    """Refuses, in one line, a resume whose flags would train differently from the run that wrote ``path``
    (a changed batch size, say, would read past the saved data position). Returns the checkpoint's
    --iterations when this resume only extends it, else None."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not the latest.pth of a generation run")
    saved = checkpoint.get("args", {})
    flags = option_names(build_parser())
    extends = "iterations" in saved and args.iterations > saved["iterations"]
    differences = [f"{flags[name]} {shown(getattr(args, name))} here, {shown(saved[name])} in the checkpoint"
                   for name in sorted(vars(args))
                   if name in saved and name not in MAY_CHANGE_ON_RESUME and getattr(args, name) != saved[name]
                   and not (name == "iterations" and extends)]
    if checkpoint.get("processes", processes) != processes:
        differences.append(f"{processes} process(es) here, {checkpoint['processes']} in the checkpoint")
    if differences:
        raise BadInput(f"cannot resume {path}: {'; '.join(differences)}. A resume continues that run as it was "
                       f"(only --iterations may grow); to train with these settings start a new run, e.g. "
                       f"with another --output-dir and without --resume")
    return saved["iterations"] if extends else None


def restore(checkpoint: dict, path: str, step: GanStep, generator_ema: nn.Module, real_batches,
            training_images: int, rank: int) -> Tuple[int, Dict[str, float]]:
    if checkpoint.get("training_images", training_images) != training_images:
        raise CheckpointError(f"{path} was trained on {checkpoint['training_images']} images, the data here gives "
                              f"{training_images}: is --data-path the run's data?")
    try:
        step.generator.load_state_dict(checkpoint["G"])
        step.discriminator.load_state_dict(checkpoint["D"])
        generator_ema.load_state_dict(checkpoint["G_ema"])
        step.g_optimizer.load_state_dict(checkpoint["g_optimizer"])
        step.d_optimizer.load_state_dict(checkpoint["d_optimizer"])
        real_batches.load_state_dict(checkpoint["real_batches"])
        if step.lecam is not None and checkpoint.get("lecam"):
            saved = checkpoint["lecam"]  # one dict, rank 0's, in checkpoints written before each rank's was
            step.lecam.load_state_dict(saved[rank] if isinstance(saved, list) else saved)
        restore_rng(checkpoint, rank)
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} does not fit this run: {str(error).splitlines()[0]}") from None
    return int(checkpoint["iteration"]), dict(checkpoint.get("best", {}))


def restore_rng(checkpoint: dict, rank: int) -> None:
    """This rank's random generators. A checkpoint written before every rank's were saved holds rank 0's alone:
    the other ranks then keep those of their own seed, so that no two ranks draw the same numbers."""
    saved = checkpoint["rng"]
    if isinstance(saved, list):
        set_rng_states(saved[rank])
    elif rank == 0:
        torch.set_rng_state(saved)
        if checkpoint.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], torch.cuda.current_device())


# ============================================================================ runs

def run_training(args, runtime: Runtime, argv) -> None:
    moved_to = prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                  is_main=runtime.is_main)
    if moved_to:
        runtime.log(f"The previous run in {args.output_dir} was moved to {moved_to}")
    resume_path = resolve_resume(args, LATEST)
    checkpoint = safe_torch_load(resume_path) if resume_path else None
    extended_from = check_same_run(args, checkpoint, resume_path, runtime.world_size) if resume_path else None
    data = gan_data.load_image_data(args.dataset, args.data_path, args.download)
    kept = gan_data.subset_indices(data.train_labels, args.data_fraction, args.subset_draw, args.subset_seed)
    teacher = build_teacher(args, runtime.device)
    if teacher is not None:
        runtime.log(f"Teacher: {teacher.name}, weights: {teacher.source}")
    generator, discriminator, generator_ema = build_networks(args, data.num_classes, teacher)
    evaluator = build_evaluator(args, data, runtime)
    for module in (generator, discriminator, generator_ema):
        module.to(runtime.device)
    g_parameters, d_parameters = parameter_split(args, generator, discriminator)
    betas = tuple(args.adam_betas)
    step = GanStep(
        generator=generator, discriminator=discriminator,
        g_optimizer=torch.optim.Adam(g_parameters, lr=args.g_lr, betas=betas, eps=args.adam_eps),
        d_optimizer=torch.optim.Adam(d_parameters, lr=args.d_lr, betas=betas, eps=args.adam_eps),
        g_parameters=g_parameters, d_parameters=d_parameters,
        ema=ModelEMA(generator, after_start(args.ema_decay, args.ema_start), average_buffers=True,
                     average_model=generator_ema),
        batch_size=args.batch_size, num_d_steps=args.num_d_steps, policy=tuple(diffaug.parse_policy(args.diffaug)),
        vkd=(GanVkDLoss(teacher, build_normalisation(args.normalisation, args.whitening, args.whiten_eps),
                        args.vkd_weight, args.real_fake_normalisation) if teacher is not None else None),
        lecam=LeCam(args.lecam_weight, args.lecam_decay, args.lecam_start) if args.lecam_weight > 0 else None,
        world_size=runtime.world_size, device=runtime.device)
    seed_everything(args.seed + runtime.rank)
    real_batches = gan_data.RealBatches(data.train_images[kept], data.train_labels[kept], args.batch_size,
                                        args.seed, args.hflip, runtime.rank, runtime.world_size)
    sizes = [sum(p.numel() for p in network.parameters()) for network in (generator, discriminator)]
    runtime.log(f"{args.dataset}: {len(kept)} of {len(data.train_labels)} training images "
                f"({args.data_fraction:g}, {args.subset_draw}); teacher: {teacher.name if teacher else 'none'}; "
                f"G {sizes[0]} / D {sizes[1]} parameters")

    iteration, best = 0, {}
    if resume_path:
        iteration, best = restore(checkpoint, resume_path, step, generator_ema, real_batches, len(kept), runtime.rank)
        del checkpoint  # loading copied its tensors: do not hold a second copy of the run through training
        runtime.log(f"Resumed from {resume_path} at iteration {iteration}")
    if extended_from:
        runtime.log(f"--iterations {args.iterations} extends the run's {extended_from} iterations (only its end "
                    f"moves; recorded in {ARGS_FILE})")
    if iteration >= args.iterations:
        runtime.log(f"Nothing to train: the run has finished its {args.iterations} iterations")
        return
    writer = None
    if args.output_dir and runtime.is_main:
        record_invocation(args, argv, runtime.world_size, iteration, training_images=len(kept),
                          changes={"iterations": {"from": extended_from, "to": args.iterations}} if extended_from else None)
        trim_log(os.path.join(args.output_dir, LOG), iteration + 1, key="iteration")
        writer = tensorboard_writer(args.output_dir)
    try:
        with StopRequest() as stop:
            train_iterations(args, runtime, step, generator_ema, real_batches, evaluator, writer, iteration, best,
                             len(kept), {"teacher": teacher.name if teacher else None,
                                         "teacher_weights": teacher.source if teacher else None}, stop)
    finally:
        if writer is not None:
            writer.close()


def train_iterations(args, runtime: Runtime, step: GanStep, generator_ema: nn.Module, real_batches,
                     evaluator: Optional[GeneratorEvaluator], writer, iteration: int, best: Dict[str, float],
                     training_images: int, teacher_record: Dict[str, Optional[str]], stop: StopRequest) -> None:
    """The iterations from ``iteration`` on; a stop request ends them at an iteration boundary (``Preempted``)."""
    started = time.time()
    progress = Progress("Iteration", args.iterations, args.print_freq, runtime.is_main, first=iteration)
    running = RunningMeans()
    last_results: Dict[str, float] = {}
    while iteration < args.iterations:
        terms = step.iteration(real_batches, iteration)
        iteration += 1
        running.add(terms)
        if any(value != value or abs(value) == float("inf") for value in terms.values()):
            raise RunFailed(f"a loss became non-finite at iteration {iteration} ({terms}); {LATEST} was left as it was")
        finished = iteration == args.iterations
        if iteration % args.print_freq == 0 or finished:
            means = running.means()
            running.reset()
            progress.line(iteration, {name: f"{value:.4f}" for name, value in means.items()})
            if writer is not None:
                append_json_line(os.path.join(args.output_dir, LOG), dict(iteration=iteration, **means))
                for name, value in means.items():
                    writer.add_scalar(f"train/{name}", value, iteration)
        saves = bool(args.output_dir)
        if saves and runtime.is_main and (iteration % args.sample_every == 0 or finished):
            save_sample_grid(generator_ema, os.path.join(args.output_dir, "samples", f"iter_{iteration:06d}.png"),
                             args.seed, args.batch_size, runtime.device)
        if evaluator is not None and ((args.eval_every and iteration % args.eval_every == 0) or finished):
            last_results = evaluate(evaluator, generator_ema, args, runtime.device, args.seed + EVAL_SEED_OFFSET)
            improved = "fid" not in best or last_results["fid"] < best["fid"]
            if improved:
                best = {"fid": last_results["fid"], "iteration": iteration}
            runtime.log(f"it {iteration}: {evaluator.describe(last_results)}; best FID {best['fid']:.3f} "
                        f"at it {best['iteration']}")
            if writer is not None:
                append_json_line(os.path.join(args.output_dir, LOG), dict(iteration=iteration, **last_results))
                writer.add_scalar("eval/fid", last_results["fid"], iteration)
                if improved:
                    save_atomically({"G_ema": generator_ema.state_dict(), "iteration": iteration,
                                     "fid": last_results["fid"], "args": dict(vars(args))},
                                    os.path.join(args.output_dir, BEST))
        if saves and (iteration % args.save_every == 0 or finished):
            save_latest(args, runtime, step, generator_ema, real_batches, iteration, best, training_images)
        if not finished and stop.requested(runtime.device):
            if saves and iteration % args.save_every:
                save_latest(args, runtime, step, generator_ema, real_batches, iteration, best, training_images)
            if runtime.distributed:
                dist.barrier()  # a process that exits first could have the launcher kill rank 0 mid-save
            raise Preempted(preempted_line(f"iteration {iteration}") if args.output_dir else
                            f"preempted at iteration {iteration}; nothing was saved (no --output-dir)")
    if runtime.distributed:
        dist.barrier()
    if writer is not None:
        write_json(os.path.join(args.output_dir, RESULTS),
                   dict(final=last_results, best=best, iterations=iteration, training_images=training_images,
                        seconds_this_process=round(time.time() - started, 1), **teacher_record))


def run_evaluation(args, runtime: Runtime) -> None:
    """FID (and IS) of a checkpoint's G_ema, ``--eval-repeats`` times with fresh samples."""
    if not runtime.is_main:
        return
    checkpoint = safe_torch_load(args.eval_checkpoint)
    if not isinstance(checkpoint, dict) or "G_ema" not in checkpoint:
        raise CheckpointError(f"{args.eval_checkpoint} holds no 'G_ema' (expected latest.pth or best.pth of a run)")
    saved = checkpoint.get("args", {})
    data = gan_data.load_image_data(args.dataset, args.data_path, args.download)
    generator = Generator(saved.get("g_ch", args.g_ch), saved.get("dim_z", args.dim_z), data.num_classes)
    try:
        generator.load_state_dict(checkpoint["G_ema"])
    except RuntimeError as error:
        raise CheckpointError(f"{args.eval_checkpoint} does not fit the generator: {str(error).splitlines()[0]}") from None
    generator.to(runtime.device)
    evaluator = build_evaluator(args, data, runtime)
    if evaluator is None:
        raise BadInput("--eval-checkpoint needs an FID network: --fid-extractor inception or timm")
    runs = []
    for repeat in range(args.eval_repeats):
        runs.append(evaluate(evaluator, generator, args, runtime.device, args.seed + EVAL_SEED_OFFSET + repeat))
        runtime.log(f"repeat {repeat + 1}/{args.eval_repeats}: {evaluator.describe(runs[-1])}")
    fids = torch.tensor([run["fid"] for run in runs])
    spread = f" +- {fids.std().item():.3f}" if len(runs) > 1 else ""
    runtime.log(f"FID {fids.mean().item():.3f}{spread} over {len(runs)} evaluation(s) of {args.eval_checkpoint}"
                + ("" if evaluator.comparable else " (local features: not comparable with Inception FIDs)"))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "eval_results.json"),
                   dict(checkpoint=os.path.abspath(args.eval_checkpoint), runs=runs, fid_mean=fids.mean().item(),
                        args=vars(args)))


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit, _ = parse_with_config(build_parser(), argv)
    check_arguments(args, config_origins(args.config, explicit))
    runtime = init_runtime(args)
    try:
        if args.eval_checkpoint:
            run_evaluation(args, runtime)
        else:
            run_training(args, runtime, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
