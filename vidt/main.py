"""Train or evaluate ViDT with VkD feature distillation on COCO.

From the repository root: ``python -m vidt.main ...`` or ``torchrun --nproc_per_node=N -m vidt.main ...``.
From inside vidt/, as the paper's commands: ``python main.py ...``, ``torchrun --nproc_per_node=N main.py ...``,
``python -m torch.distributed.launch --nproc_per_node=N --use_env main.py ...`` or ``srun python main.py ...``.
"""
import os
import sys

if not __package__:
    # Run as a script from inside vidt/ (the paper's form), Python puts vidt/ first on the path: `vidt` would
    # not import as a package and vidt/models would shadow the root's models/. Put the repository root there.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler  # noqa: E402

from vidt.arguments import check_supported, parse_arguments, resumed_epochs  # noqa: E402
from vidt.datasets.coco import build_coco  # noqa: E402
from vidt.datasets.coco_eval import STAT_NAMES, eval_arrays  # noqa: E402
from vidt.engine import evaluate, train_one_epoch  # noqa: E402
from vidt.models import build  # noqa: E402
from vidt.models.build import NUM_CLASSES, load_student_weights  # noqa: E402
from vidt.models.detector import is_projector_key  # noqa: E402
from vidt.optim import build_scheduler, param_groups, step_scheduler  # noqa: E402
from vidt.util.checkpoint import LATEST, checkpoint_saver, load_checkpoint, model_state_from, run_folder  # noqa: E402
from vidt.util.nested_tensor import collate_fn  # noqa: E402
from vidt.util.printing import setup_for_distributed_printing  # noqa: E402
from vkd.checkpoints import save_atomically  # noqa: E402
from vkd.cli import entry_point  # noqa: E402
from vkd.data.loaders import init_worker  # noqa: E402
from vkd.distributed import Runtime, ending_the_process_group, every_rank, start_processes  # noqa: E402
from vkd.errors import BadInput  # noqa: E402
from vkd.preemption import Preempted, StopRequest, preempted_line  # noqa: E402
from vkd.progress import append_json_line, tensorboard_writer  # noqa: E402
from vkd.reproducibility import configure_cuda_kernels, epoch_seed, seed_everything  # noqa: E402
from vkd.runs import LOG, git_state, prepare_output_dir, record_invocation, resolve_resume, trim_log, write_json  # noqa: E402
from vkd.saver import estimated_checkpoint_bytes  # noqa: E402

OPEN_FILES = 4096  # the original raises the soft limit for its data-loader workers
EVAL_SNAPSHOT_EVERY = 50  # epochs between kept copies of COCOeval's arrays, as in the original


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass(frozen=True)
class RunState:
    """Where this invocation's training starts, decided at start-up (``args`` keeps what was asked): the run folder,
    the first epoch to train and, when the run resumes inside that epoch, its checkpoint's ``mid_epoch`` record."""
    folder: str
    start_epoch: int
    mid_epoch: Optional[dict] = None


def make_loaders(args, eval_only: bool, pin_memory: bool = False, distributed: bool = False):
    """(train loader or None, val loader, val dataset), both splits checked (``build_coco``). With
    --n_iter_to_acc k both load batch_size / k images per process, as in the original (which divides
    --batch_size). ``pin_memory``: batches in page-locked memory, for faster copies to a GPU; ``distributed``:
    each process loads its shard."""
    batch_size = args.batch_size // args.n_iter_to_acc
    num_classes = NUM_CLASSES[args.dataset_file]
    dataset_val = build_coco("val", args, num_classes)
    sampler_val = DistributedSampler(dataset_val, shuffle=False) if distributed else SequentialSampler(dataset_val)
    loader_val = DataLoader(dataset_val, batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin_memory,
                            worker_init_fn=init_worker)
    if eval_only:
        return None, loader_val, dataset_val
    dataset_train = build_coco("train", args, num_classes)
    sampler_train = DistributedSampler(dataset_train) if distributed else RandomSampler(dataset_train)
    batch_sampler = BatchSampler(sampler_train, batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise BadInput(f"{len(dataset_train)} training images are fewer than one batch of "
                       f"{batch_size} per process; lower --batch_size or add images")
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=args.num_workers, pin_memory=pin_memory, worker_init_fn=init_worker)
    return loader_train, loader_val, dataset_val


def continues_a_run(checkpoint: dict) -> bool:
    """Whether training goes on from the file's optimizer and epoch. A plain ViDT file (no projector key) is
    fine-tuned instead, with a new optimizer and schedule, since its optimizer has no projector entries."""
    return (all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch"))
            and any(is_projector_key(k) for k in checkpoint.get("model") or {}))


def resume(args, path: str, model, optimizer, lr_scheduler, checkpoint: dict) -> Tuple[int, Optional[dict]]:
    """Strict load of the model from ``checkpoint`` (the file ``path``); when training on from the file, also its
    optimizer and where the run stands. Returns the first epoch to train (--start_epoch unless the run goes on) and
    the file's ``mid_epoch`` record when the run stopped inside an epoch, else None."""
    plain_vidt = load_student_weights(model, model_state_from(checkpoint, path), f"--resume {path}")
    start_epoch, mid_epoch = args.start_epoch, None
    if args.eval:
        pass
    elif plain_vidt:
        print(f"| fine-tuning from the plain ViDT weights: new optimizer and schedule from epoch {start_epoch}")
    elif continues_a_run(checkpoint):
        optimizer.load_state_dict(checkpoint["optimizer"])
        mid_epoch = checkpoint.get("mid_epoch")
        start_epoch = mid_epoch["epoch"] if mid_epoch else checkpoint["epoch"] + 1
        # The schedule is a function of the epoch alone, so it is not read from the file but rebuilt from the
        # flags (the same ones, or a new --epochs, whose curve then applies from here) and put where the run is.
        if start_epoch > 0:
            step_scheduler(lr_scheduler, start_epoch - 1)
    print(f"| resumed from {path}")
    return start_epoch, mid_epoch


def named_stats(stats):
    return dict(zip(STAT_NAMES, stats))


def process_group_backend(device: torch.device) -> str:
    """The backend ``vkd.distributed.join_process_group`` takes on ``device`` (--dist-backend is not read)."""
    return "nccl" if device.type == "cuda" else "gloo"


def start_runtime(args) -> Runtime:
    """This process's rank and device, joining the process group when the launcher started several; the
    arguments keep what was asked."""
    configure_cuda_kernels(fixed_shapes=False)  # each batch is padded to its own largest image
    # 1, the original's default, leaves the number of processes to the launcher.
    runtime = start_processes(args.device, args.local_rank, args.dist_url, args.dist_timeout,
                              world_size_flag=None if args.world_size == 1 else args.world_size)
    if args.distributed and not runtime.distributed:
        raise BadInput("--distributed needs a launcher that starts several processes: torchrun --nproc_per_node=N "
                       "main.py ..., python -m torch.distributed.launch --use_env ..., or srun")
    if args.rank != 0 and not runtime.distributed:
        raise BadInput("--rank is set by the launcher; start the run with torchrun or srun")
    if runtime.distributed:
        print(f"| distributed init (rank {runtime.rank} of {runtime.world_size}, "
              f"{process_group_backend(runtime.device)}): {args.dist_url}", flush=True)
    return runtime


def run(args, argv, origins: Optional[Dict[str, str]] = None) -> None:
    # Set up
    check_supported(args, origins)
    raise_open_file_limit()
    runtime = start_runtime(args)
    setup_for_distributed_printing(runtime.is_main)
    device = runtime.device
    seed_everything(args.seed + runtime.rank)
    folder = run_folder(args)
    # An evaluation writes no checkpoint, only its results (the paper's commands evaluate in the default run folder).
    moved_to = prepare_output_dir(folder, resume="auto" if args.eval else args.resume, overwrite=args.overwrite,
                                  is_main=runtime.is_main)
    if moved_to:
        print(f"| the previous run in {folder} was moved to {moved_to}")
    # vkd.runs reads the run folder from output_dir: it gets a copy of the arguments that names it.
    in_folder = argparse.Namespace(**{**vars(args), "output_dir": folder})
    resume_path = resolve_resume(in_folder, LATEST) or ""
    if args.eval and args.resume == "auto" and not resume_path:
        raise BadInput(f"--eval True --resume auto: no {LATEST} in {folder}")
    print(f"| git commit {git_state()['git_commit']}; run folder {folder}")
    # What could stop the run is checked before anything is built or written: the files to start from,
    # the resumed run's settings, then both data splits.
    checkpoint = load_checkpoint(resume_path, "--resume") if resume_path else None
    initial = (load_checkpoint(args.student_ckpt, "--student_ckpt") if args.student_ckpt and checkpoint is None
               else None)
    continuing = checkpoint is not None and not args.eval and continues_a_run(checkpoint)
    planned_epochs = None
    if continuing and isinstance(checkpoint.get("args"), dict):  # released files hold a Namespace: not compared
        planned_epochs = resumed_epochs(args, checkpoint, runtime.world_size, resume_path)
    loader_train, loader_val, dataset_val = make_loaders(args, eval_only=args.eval, pin_memory=device.type == "cuda",
                                                         distributed=runtime.distributed)

    # Build
    model, criterion, postprocessors = build(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    if runtime.distributed:
        # Some parameters never get gradients (level_embed, the unused merge/norm layers, the
        # projectors without a teacher), hence find_unused_parameters. The teacher is not wrapped.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr,
                                  weight_decay=args.weight_decay)
    lr_scheduler = build_scheduler(optimizer, args)
    start_epoch, mid_epoch = args.start_epoch, None
    if checkpoint is not None:
        start_epoch, mid_epoch = resume(args, resume_path, model_without_ddp, optimizer, lr_scheduler, checkpoint)
        del checkpoint  # its tensors are in the model and optimizer now
    elif initial is not None:
        load_student_weights(model_without_ddp, model_state_from(initial, args.student_ckpt),
                             f"--student_ckpt {args.student_ckpt}")
        del initial
        print(f"| a new run from the weights of {args.student_ckpt}: new optimizer and schedule from epoch "
              f"{start_epoch}")
    if planned_epochs is not None:
        print(f"| --epochs {args.epochs}: the run was planned for {planned_epochs} epochs; from epoch "
              f"{start_epoch} on, the lr follows the {args.sched} schedule of a {args.epochs}-epoch run "
              f"(epoch {start_epoch} at lr {optimizer.param_groups[0]['lr']:.3g})")
    if not args.eval:
        checkpoint_saver(args, runtime.is_main).require_room(
            estimated_checkpoint_bytes(optimizer, model_without_ddp.state_dict()))
    if runtime.is_main:
        changes = {"epochs": {"from": planned_epochs, "to": args.epochs}} if planned_epochs is not None else None
        record_invocation(in_folder, argv, runtime.world_size, start_epoch, changes=changes,
                          backend=process_group_backend(device))
        if not args.eval:
            # A run stopped between an epoch's log line and its checkpoint redoes that epoch: one line each.
            trim_log(os.path.join(folder, LOG), start_epoch)

    # Run
    if args.eval:
        _, coco_eval = evaluate(model, criterion, postprocessors, loader_val, dataset_val.coco, device,
                                args.print_freq)
        if runtime.is_main:
            save_atomically(eval_arrays(coco_eval), os.path.join(folder, "eval.pth"))
            write_json(os.path.join(folder, "eval_stats.json"),
                       {"checkpoint": resume_path, "stats": named_stats(coco_eval.stats.tolist())})
        return
    train(args, runtime, RunState(folder, start_epoch, mid_epoch), model, model_without_ddp, criterion, postprocessors,
          optimizer, lr_scheduler, loader_train, loader_val, dataset_val, n_parameters)


def train(args, runtime: Runtime, state: RunState, model, model_without_ddp, criterion, postprocessors, optimizer,
          lr_scheduler, loader_train, loader_val, dataset_val, n_parameters) -> None:
    """The epoch loop: train, step the schedule, evaluate on val, log (log.txt, tensorboard), save.

    SIGTERM or SIGUSR1 (``StopRequest``) stops the run with ``Preempted``: inside an epoch at the next step,
    with a mid-epoch checkpoint.pth; during evaluation once the epoch is logged and saved.
    """
    output_dir, device, mid_epoch = state.folder, runtime.device, state.mid_epoch
    tb_writer = None
    if runtime.is_main:
        tb_writer = tensorboard_writer(output_dir)
        os.makedirs(os.path.join(output_dir, "eval"), exist_ok=True)
    print("Start training")
    start_time = time.time()
    # An epoch that leaves micro-batches to the next one ends with accumulated gradients, which no checkpoint
    # holds: a stop request then waits for the next epoch's first step.
    may_stop_after_epoch = len(loader_train) % args.n_iter_to_acc == 0
    try:
        with StopRequest() as stop:
            for epoch in range(state.start_epoch, args.epochs):
                # The epoch's random numbers depend on (seed, rank, epoch) alone, so a resumed run draws those
                # of an uninterrupted one.
                seed_everything(epoch_seed(args.seed, runtime.rank, epoch))
                if runtime.distributed:
                    loader_train.batch_sampler.sampler.set_epoch(epoch)
                resumed = mid_epoch["ranks"][runtime.rank] if mid_epoch and epoch == mid_epoch["epoch"] else None
                train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                              args.clip_max_norm, args.n_iter_to_acc, args.print_freq,
                                              tb_writer=tb_writer, stop=stop, resumed=resumed)
                if "preempted_at" in train_stats:
                    save_preempted(args, runtime, epoch, train_stats["partial"], model_without_ddp, optimizer,
                                   lr_scheduler)
                    raise Preempted(preempted_line(f"epoch {epoch} step {train_stats['preempted_at']}"))
                step_scheduler(lr_scheduler, epoch)
                test_stats, coco_eval = evaluate(model, criterion, postprocessors, loader_val, dataset_val.coco,
                                                 device, args.print_freq)
                if runtime.is_main:
                    content = checkpoint_content(args, runtime, model_without_ddp, optimizer, lr_scheduler, epoch)
                    save_epoch(args, content,
                               lambda: record_epoch(output_dir, epoch, train_stats, test_stats, coco_eval,
                                                    n_parameters, tb_writer))
                if epoch + 1 < args.epochs and may_stop_after_epoch and stop.requested(device):
                    raise Preempted(preempted_line(f"the end of epoch {epoch}"))
    finally:
        if tb_writer is not None:
            tb_writer.close()
    print(f"Training time {time.time() - start_time:.0f}s")


def checkpoint_content(args, runtime: Runtime, model_without_ddp, optimizer, lr_scheduler, epoch: int) -> dict:
    """DETR's form, after ``epoch`` (the last finished one); our args as a plain dict (as asked), and the number of
    processes that trained it, which a resume compares (``resumed_epochs``)."""
    return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": dict(vars(args)),
            "world_size": runtime.world_size}


def save_epoch(args, content: dict, record: Callable[[], None]) -> None:
    """The epoch's records (``record``), then checkpoint.pth and its kept copies (``checkpoint_saver``).
    checkpoint.pth is what --resume auto continues, so it is written after the epoch's log line: a run stopped in
    between redoes the epoch (``trim_log`` drops the line) instead of losing its line. Weights that became
    non-finite stop the run with neither."""
    checkpoint_saver(args).save(content, content["epoch"] + 1, [content["model"]], before=record)


def save_preempted(args, runtime: Runtime, epoch: int, partial: dict, model_without_ddp, optimizer,
                   lr_scheduler) -> None:
    """checkpoint.pth in the middle of ``epoch``: the state after its last finished step, with every rank's
    running sums and random generators (``partial`` of each), so that --resume auto continues at that step."""
    partials = every_rank(partial)
    content = checkpoint_content(args, runtime, model_without_ddp, optimizer, lr_scheduler, epoch - 1)
    content["mid_epoch"] = {"epoch": epoch, "step": partial["step"], "ranks": partials}
    checkpoint_saver(args, runtime.is_main).save_preempted(content, [content["model"]],
                                                           f"epoch {epoch} step {partial['step']}")


def record_epoch(output_dir: str, epoch: int, train_stats, test_stats, coco_eval, n_parameters: int,
                 tb_writer) -> None:
    """log.txt (the original's keys), COCOeval's arrays under eval/, eval_stats.json and tensorboard."""
    log = {**{f"train_{k}": v for k, v in train_stats.items()},
           **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch, "n_parameters": n_parameters}
    append_json_line(os.path.join(output_dir, LOG), log)
    arrays = eval_arrays(coco_eval)
    save_atomically(arrays, os.path.join(output_dir, "eval", "latest.pth"))
    if epoch % EVAL_SNAPSHOT_EVERY == 0:
        save_atomically(arrays, os.path.join(output_dir, "eval", f"{epoch:03}.pth"))
    stats = named_stats(test_stats["coco_eval_bbox"])
    write_json(os.path.join(output_dir, "eval_stats.json"), {"epoch": epoch, "stats": stats})
    for name, value in stats.items():
        tb_writer.add_scalar(f"val/{name}", value, epoch)
    tb_writer.add_scalar("val/loss", test_stats["loss"], epoch)
    tb_writer.flush()


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, origins = parse_arguments(argv)
    with ending_the_process_group(args.dist_timeout):
        run(args, argv, origins)


if __name__ == "__main__":
    main()
