"""VkD entry point: distil a student (any timm architecture or a DeiT student; ``--distiller`` picks the method),
train a teacher, or evaluate a checkpoint, on 1..N processes.

    torchrun --nproc_per_node=N main_distributed.py --data-path DATA --output_dir OUT ...
    python main_distributed.py --config configs/deit_ti_vkd.yaml ...

The story in five steps: parse the flags (``config.py``), join the processes (``distributed.py``), build
the data (``datasets.py``), the model and its criterion (``models/build.py``; the criterion, a distiller of
``distillers/``, owns the teacher), then run the epochs (``engine.py``), saving and resuming through ``checkpoint.py``.
"""
import os
import sys

import torch
import torch.nn as nn

import datasets
from checkpoint import LATEST, TEACHER_FILE, TrainingState, checkpoint_saver
from config import AMP_DTYPES, check_arguments, parse_arguments
from engine import evaluate, train_one_epoch
from models import has_distillation_head
from models.build import build, build_student, build_teacher_to_train
from models.loading import load_student_checkpoint, saved_run_args
from models.students import TrainingView
from optim import build_lr_scheduler, build_optimizer, effective_lr
from runtime import init_runtime
from vkd.checkpoints import safe_torch_load, save_atomically
from vkd.cli import entry_point, fail
from vkd.config import NoEffect, refuse_flags_without_effect
from vkd.distributed import Runtime, ending_the_process_group, every_rank, reduce_over_ranks
from vkd.ema import ModelEMA, linear_momentum
from vkd.preemption import Preempted, StopRequest, preempted_line
from vkd.progress import tensorboard_writer
from vkd.reproducibility import epoch_seed, seed_everything
from vkd.runs import LOG, git_state, prepare_output_dir, record_invocation, resolve_resume, trim_log, write_json


def warn_unreadable(runtime: Runtime, count: int, what: str) -> None:
    if count and runtime.is_main:
        print(f"warning: {count} unreadable {what} were skipped (--strict-data makes them an error)",
              file=sys.stderr, flush=True)


def run_evaluation(args, runtime: Runtime, checkpoint_path: str, subject: str, explicit) -> None:
    """Evaluate a checkpoint (released layout or ours) on the validation set; no teacher is built. Without
    --eval-head, a distilled student is evaluated on the head its training run evaluated on."""
    content = safe_torch_load(checkpoint_path)
    eval_head = args.eval_head
    if "eval_head" not in explicit and not args.train_teacher:
        eval_head = saved_run_args(content).get("eval_head", args.eval_head)
    data = datasets.data_args_from(args, pin_memory=runtime.pin_memory)
    dataset_val, num_classes = datasets.build_dataset(False, data)
    model = (build_teacher_to_train(args, num_classes) if args.train_teacher
             else build_student(args, num_classes, eval_head=eval_head))
    load_student_checkpoint(model, checkpoint_path, content)
    model.to(runtime.device)
    loader = datasets.build_val_loader(data, dataset_val, args.dist_eval and runtime.distributed, runtime.rank,
                                       runtime.world_size)
    results = evaluate(model, loader, runtime.device, AMP_DTYPES[runtime.amp], args.print_freq, runtime.is_main,
                       sharded=args.dist_eval)
    warn_unreadable(runtime, results["unreadable_images"], "validation images")
    runtime.log(f"Accuracy of {subject} on the {results['images']} test images: {results['acc1']:.1f}%")
    if args.output_dir and runtime.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "eval_results.json"),
                   dict(results, checkpoint=os.path.abspath(checkpoint_path), model=model.__class__.__name__,
                        eval_head=None if args.train_teacher else eval_head, amp=runtime.amp, args=vars(args),
                        processes=runtime.world_size, **git_state()))


def run_training(args, runtime: Runtime, argv) -> None:
    moved_to = prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                  is_main=runtime.is_main)
    if moved_to:
        runtime.log(f"The previous run in {args.output_dir} was moved to {moved_to}")
    seed_everything(args.seed + runtime.rank)
    data = datasets.data_args_from(args, pin_memory=runtime.pin_memory)
    dataset_train, num_classes = datasets.build_dataset(True, data)
    dataset_val, _ = datasets.build_dataset(False, data)
    train_loader, val_loader = datasets.build_loaders(data, dataset_train, dataset_val, runtime.distributed,
                                                      runtime.rank, runtime.world_size, sharded_val=args.dist_eval)
    steps_per_epoch = len(train_loader)
    mixup_fn = datasets.build_mixup(data, num_classes)

    model, criterion, _ = build(args, num_classes, amp=runtime.amp, log=runtime.log)
    model.to(runtime.device)
    criterion.to(runtime.device)
    runtime.log(f"number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    trained = TrainingView(model, with_features=criterion.projector(args) is not None)
    if runtime.distributed:
        # A distilled student's dist head gets no gradient from a method that does not train it.
        unused_head = has_distillation_head(model) and not criterion.trains_distillation_head(args)
        # broadcast_buffers (DDP's default, on purpose): the conv stem's BatchNorm running statistics follow rank
        # 0's, as in DeiT; without it they would differ between ranks (--dist-eval, the EMA). The projector's
        # constant base (36.6 MB at 3024 wide) is broadcast with them at each step.
        trained = nn.parallel.DistributedDataParallel(
            trained, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=unused_head, broadcast_buffers=True)

    lr = effective_lr(args, runtime.world_size)
    optimizer = build_optimizer(args, model, lr, decay_projector=criterion.decays_projector(args))
    lr_scheduler, total_epochs = build_lr_scheduler(args, optimizer, steps_per_epoch)
    ema = None
    if args.student_ema:
        ema_device = torch.device("cpu") if args.student_ema_force_cpu else runtime.device
        ema = ModelEMA(model, linear_momentum(args.student_ema_decay, steps_per_epoch * total_epochs), ema_device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == "fp16")
    state = TrainingState(args, runtime.world_size, model, optimizer, scaler, lr_scheduler, ema,
                      start_epoch=args.start_epoch, class_names=list(dataset_train.classes))
    if args.student_ckpt:
        # The original's fine-tuning start: weights only. A checkpoint found by --resume overrides them.
        load_student_checkpoint(model, args.student_ckpt)
        runtime.log(f"Student initialised from {args.student_ckpt}")
    resume_path = resolve_resume(args, LATEST)
    if resume_path:
        state.restore(resume_path)
        runtime.log(f"Resumed from {resume_path}: continuing at epoch {state.start_epoch}")
        if state.epochs_changed:
            runtime.log(f"--epochs {args.epochs}: the run was planned for {state.epochs_changed['from']} epochs; "
                        f"from epoch {state.start_epoch} on, the LR follows the {args.sched} schedule of a "
                        f"{args.epochs}-epoch run")
    elif args.resume == "auto":
        runtime.log(f"No {LATEST} in {args.output_dir}: starting from scratch")
    if state.start_epoch >= total_epochs:
        runtime.log(f"Nothing to train: the run has finished its {total_epochs} epochs")
        return

    if args.output_dir:
        checkpoint_saver(args, runtime.is_main).require_room(state.checkpoint_bytes())
    tb_writer = None
    if args.output_dir and runtime.is_main:
        teacher = getattr(criterion, "teacher", None)
        record_invocation(args, argv, runtime.world_size, state.start_epoch, lr_effective=lr,
                          global_batch=args.batch_size * runtime.world_size,
                          teacher_weights=getattr(teacher, "weights", None),
                          changes={"epochs": state.epochs_changed} if state.epochs_changed else None)
        trim_log(os.path.join(args.output_dir, LOG), state.start_epoch)
        tb_writer = tensorboard_writer(args.output_dir)
    runtime.log(f"Start training for {total_epochs} epochs ({steps_per_epoch} iterations each, lr {lr:.3g})")
    try:
        with StopRequest() as stop:
            train_epochs(args, runtime, state, trained, criterion, train_loader, val_loader, mixup_fn,
                         total_epochs, tb_writer, stop)
        finish_training(args, runtime, state, val_loader)
    finally:
        if tb_writer is not None:
            tb_writer.close()


def train_epochs(args, runtime: Runtime, state: TrainingState, trained: nn.Module, criterion, train_loader, val_loader,
                 mixup_fn, total_epochs: int, tb_writer, stop: StopRequest) -> None:
    """The epochs from ``state.start_epoch``; a stop request ends them at a step boundary (``Preempted``)."""
    model, optimizer, ema = state.model, state.optimizer, state.ema
    for epoch in range(state.start_epoch, total_epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_everything(epoch_seed(args.seed, runtime.rank, epoch))
        resumed = state.resumed_mid_epoch[runtime.rank] if state.resumed_mid_epoch else None
        state.resumed_mid_epoch = None
        train_stats = train_one_epoch(
            trained, criterion, train_loader, optimizer, runtime.device, epoch, lr_scheduler=state.lr_scheduler,
            scaler=state.scaler, amp_dtype=AMP_DTYPES[runtime.amp], mixup_fn=mixup_fn, clip_grad=args.clip_grad,
            ema=ema, skips_allowed=args.skip_nonfinite - state.nonfinite_skipped, bce_targets=args.bce_loss,
            set_training_mode=args.train_mode, print_freq=args.print_freq, is_main=runtime.is_main,
            world_size=runtime.world_size, tb_writer=tb_writer, stop=stop, resumed=resumed, seed=args.seed,
            rank=runtime.rank)
        if "preempted_at" in train_stats:
            partials = every_rank(train_stats["partial"])
            if args.output_dir:
                state.save_preempted(epoch, partials, runtime.is_main)
            raise Preempted(preempted_line(f"epoch {epoch} step {train_stats['preempted_at']}"))
        state.nonfinite_skipped += train_stats["nonfinite_skipped"]
        train_stats.update(teacher_cache_counts(criterion, runtime))
        warn_unreadable(runtime, train_stats["unreadable_images"], f"training images in epoch {epoch}")
        val_stats = {}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == total_epochs:
            val_stats = evaluate(model, val_loader, runtime.device, AMP_DTYPES[runtime.amp], args.print_freq,
                                 runtime.is_main, sharded=args.dist_eval)
            warn_unreadable(runtime, val_stats["unreadable_images"], "validation images")
            runtime.log(f"Accuracy of the network on the {val_stats['images']} test images: {val_stats['acc1']:.1f}%")
        improved = bool(val_stats) and val_stats["acc1"] > state.best_acc1
        if val_stats:
            state.best_acc1 = max(state.best_acc1, val_stats["acc1"])
            runtime.log(f"Max accuracy: {state.best_acc1:.2f}%")
        if args.output_dir and runtime.is_main:
            record = dict(epoch=epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                          **{f"val_{k}": v for k, v in val_stats.items()}, best_acc1=state.best_acc1)
            state.save(epoch, train_stats["loss"], improved, record)
            for name in ("acc1", "acc5", "loss") if val_stats else ():
                tb_writer.add_scalar(f"val/{name}", val_stats[name], epoch)
            tb_writer.flush()
        if epoch + 1 < total_epochs and stop.requested(runtime.device):
            raise Preempted(preempted_line(f"the end of epoch {epoch}"))


def teacher_cache_counts(criterion, runtime: Runtime) -> dict:
    """The epoch's teacher cache counts, summed over ranks, with one line; empty without a cache."""
    cache = getattr(criterion, "teacher_cache", None)
    if cache is None:
        return {}
    counts = reduce_over_ranks(torch.tensor(cache.take_counts(), dtype=torch.float64, device=runtime.device))
    hits, misses, written = (int(value) for value in counts.tolist())
    runtime.log(f"Teacher cache {cache.folder}: {hits} hits, {misses} misses "
                f"({100 * hits / max(hits + misses, 1):.1f}% hit rate), {written / 2 ** 20:.1f} MiB written")
    return {"teacher_cache_hits": hits, "teacher_cache_misses": misses, "teacher_cache_bytes_written": written}


def finish_training(args, runtime: Runtime, state: TrainingState, val_loader) -> None:
    """After the last epoch: the EMA's accuracy and a trained teacher's file."""
    model, ema = state.model, state.ema

    if ema is not None:
        ema.model.to(runtime.device)
        ema_stats = evaluate(ema.model, val_loader, runtime.device, AMP_DTYPES[runtime.amp], args.print_freq,
                             runtime.is_main, sharded=args.dist_eval)
        runtime.log(f"Accuracy of the [ema] network on the {ema_stats['images']} test images: {ema_stats['acc1']:.1f}%")
        if args.output_dir and runtime.is_main:
            write_json(os.path.join(args.output_dir, "eval_ema.json"), ema_stats)
    if args.train_teacher and args.output_dir and runtime.is_main:
        teacher_path = os.path.join(args.output_dir, TEACHER_FILE)
        save_atomically({"model": model.state_dict()}, teacher_path)
        runtime.log(f"Teacher saved to {teacher_path}: distil with --teacher {args.teacher} --teacher-path {teacher_path}")


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_arguments(argv)
    check_arguments(args, explicit)
    runtime = init_runtime(args, explicit)
    # Known once the launcher has said how many processes there are.
    refuse_flags_without_effect(args, explicit, [NoEffect(lambda _: not runtime.distributed,
                                                          {"repeated_aug", "dist_eval"}, "", "{flag} has no effect "
                                                          "with a single process")])
    with ending_the_process_group(args.dist_timeout):
        if args.eval_student:
            run_evaluation(args, runtime, args.student_ckpt, "the student network", explicit)
        elif args.eval:
            path = resolve_resume(args, LATEST)
            if path is None:
                fail(f"--eval: no {LATEST} in {args.output_dir}")
            run_evaluation(args, runtime, path, "the network", explicit)
        else:
            run_training(args, runtime, argv)


if __name__ == "__main__":
    main()
