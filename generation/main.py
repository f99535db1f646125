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
import copy
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from generation import data as gan_data
from generation import diffaug
from generation.arguments import checked_arguments
from generation.biggan import Discriminator, Generator
from generation.checkpointing import LATEST, checkpoint_saver, refuse_another_run, restore, save_latest
from generation.distillation import GanVkDLoss
from generation.engine import GanStep, LeCam
from generation.fid import GeneratorEvaluator
from generation.sampling import EVAL_SEED_OFFSET, build_evaluator, evaluate, save_sample_grid
from generation.teachers import CLIP_INPUT_SIZE, CLIP_MODEL, FrozenImageNetwork, load_clip, load_timm_network
from vkd.checkpoints import safe_torch_load
from vkd.cli import entry_point
from vkd.distributed import Runtime, ending_the_process_group, start_processes, wait_for_every_rank
from vkd.ema import ModelEMA, after_start
from vkd.errors import BadInput, CheckpointError, RunFailed
from vkd.norms import build_normalisation
from vkd.preemption import Preempted, StopRequest, preempted_line
from vkd.progress import Progress, RunningMeans, append_json_line, tensorboard_writer
from vkd.projector import OrthogonalProjector
from vkd.reproducibility import configure_cuda_kernels, seed_everything
from vkd.runs import ARGS_FILE, LOG, prepare_output_dir, record_invocation, resolve_resume, trim_log, write_json
from vkd.saver import estimated_checkpoint_bytes

RESULTS = "results.json"


# ============================================================================ building

def init_runtime(args) -> Runtime:
    configure_cuda_kernels(fixed_shapes=True)  # every batch is batch-size x 3 x 32 x 32
    return start_processes(args.device, args.local_rank, args.dist_url, args.dist_timeout)


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


# ============================================================================ runs

def run_training(args, runtime: Runtime, argv) -> None:
    moved_to = prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                  is_main=runtime.is_main)
    if moved_to:
        runtime.log(f"The previous run in {args.output_dir} was moved to {moved_to}")
    resume_path = resolve_resume(args, LATEST)
    checkpoint = safe_torch_load(resume_path) if resume_path else None
    extended_from = refuse_another_run(args, checkpoint, resume_path, runtime.world_size) if resume_path else None
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
    if args.output_dir:
        checkpoint_saver(args, runtime.is_main).require_room(
            estimated_checkpoint_bytes(step.g_optimizer, generator.state_dict(), generator_ema.state_dict())
            + estimated_checkpoint_bytes(step.d_optimizer, discriminator.state_dict()))
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
                    checkpoint_saver(args).save_best({"G_ema": generator_ema.state_dict(), "iteration": iteration,
                                                      "fid": last_results["fid"], "args": dict(vars(args))},
                                                     [generator_ema.state_dict()])
        if saves and (iteration % args.save_every == 0 or finished):
            save_latest(args, runtime, step, generator_ema, real_batches, iteration, best, training_images)
        if not finished and stop.requested(runtime.device):
            if saves and iteration % args.save_every:  # not saved at this iteration yet
                save_latest(args, runtime, step, generator_ema, real_batches, iteration, best, training_images,
                            preempted=True)
            else:
                wait_for_every_rank()  # a process that exits first could have the launcher kill rank 0 mid-save
            raise Preempted(preempted_line(f"iteration {iteration}") if args.output_dir else
                            f"preempted at iteration {iteration}; nothing was saved (no --output-dir)")
    wait_for_every_rank()
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
    args = checked_arguments(argv)
    runtime = init_runtime(args)
    with ending_the_process_group(args.dist_timeout):
        if args.eval_checkpoint:
            run_evaluation(args, runtime)
        else:
            run_training(args, runtime, argv)


if __name__ == "__main__":
    main()
