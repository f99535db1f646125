"""Train or evaluate ViDT with VkD feature distillation on COCO.

Run from inside vidt/: ``python main.py ...``, ``torchrun --nproc_per_node=N main.py ...``,
``python -m torch.distributed.launch --nproc_per_node=N --use_env main.py ...`` or ``srun python main.py ...``.
"""
import os
import sys

# Run as a script, Python puts vidt/ first on the path, where vidt/models would shadow the root's
# models/ package. Put the repository root there instead: `vidt` imports as a package and the shared
# losses.py is found.
_VIDT_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_VIDT_DIR)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _VIDT_DIR]
sys.path.insert(0, _REPO_ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler  # noqa: E402

from vidt.arguments import check_supported, get_args_parser  # noqa: E402
from vidt.datasets.coco import build_coco  # noqa: E402
from vidt.datasets.coco_eval import STAT_NAMES, eval_arrays  # noqa: E402
from vidt.engine import evaluate, train_one_epoch  # noqa: E402
from vidt.models import build  # noqa: E402
from vidt.models.build import load_student_weights  # noqa: E402
from vidt.optim import build_scheduler, param_groups, step_scheduler  # noqa: E402
from vidt.util.checkpoint import CheckpointError, load_checkpoint, model_state_from  # noqa: E402
from vidt.util.misc import (  # noqa: E402
    BadInput,
    collate_fn,
    device_of,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    setup_for_distributed_printing,
)
from vkd.checkpoints import save_atomically  # noqa: E402
from vkd.reproducibility import seed_everything  # noqa: E402
from vkd.runs import git_state, prepare_output_dir, record_invocation, write_json  # noqa: E402

OPEN_FILES = 4096  # the original raises the soft limit for its data-loader workers
EVAL_SNAPSHOT_EVERY = 50  # epochs between kept copies of COCOeval's arrays, as in the original
EXTRA_CHECKPOINT_EVERY = 100  # besides every --lr_drop epochs, as in the original


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))




def run_folder(args) -> str:
    """logs/<--output_dir>, or the original's name for the run when it is empty."""
    name = args.output_dir or f"{args.method}-{args.backbone_name.upper()}-batch-{args.batch_size}-epoch-{args.epochs}"
    return os.path.join("logs", name)


def make_loaders(args, eval_only: bool):
    """(train loader or None, val loader, val dataset). With --n_iter_to_acc k both load batch_size / k
    images per process, as in the original (which divides --batch_size)."""
    batch_size = args.batch_size // args.n_iter_to_acc
    dataset_val = build_coco("val", args)
    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else SequentialSampler(dataset_val))
    loader_val = DataLoader(dataset_val, batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers)
    if eval_only:
        return None, loader_val, dataset_val
    dataset_train = build_coco("train", args)
    sampler_train = DistributedSampler(dataset_train) if args.distributed else RandomSampler(dataset_train)
    batch_sampler = BatchSampler(sampler_train, batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise BadInput(f"{len(dataset_train)} training images are fewer than one batch of "
                       f"{batch_size} per process; lower --batch_size or add images")
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=args.num_workers)
    return loader_train, loader_val, dataset_val


def resume(args, model, optimizer, lr_scheduler) -> None:
    """Strict load of the model; optimizer, scheduler and epoch too when training on from our own file."""
    checkpoint = load_checkpoint(args.resume)
    plain_vidt = load_student_weights(model, model_state_from(checkpoint, args.resume), f"--resume {args.resume}")
    if args.eval:
        pass
    elif plain_vidt:
        print(f"| fine-tuning from the plain ViDT weights: new optimizer and schedule from epoch {args.start_epoch}")
    elif all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
    print(f"| resumed from {args.resume}")


def named_stats(stats):
    return dict(zip(STAT_NAMES, stats))


def main(args) -> None:
    # Set up
    check_supported(args)
    raise_open_file_limit()
    init_distributed_mode(args)
    setup_for_distributed_printing(is_main_process())
    device = device_of(args)
    seed_everything(args.seed + get_rank())
    args.output_dir = run_folder(args)
    moved_to = prepare_output_dir(args.output_dir, continuing=bool(args.resume) or args.eval, overwrite=args.overwrite,
                                  is_main=is_main_process())
    if moved_to:
        print(f"| the previous run in {args.output_dir} was moved to {moved_to}")
    if is_main_process():
        record_invocation(args, sys.argv[1:], get_world_size(), args.start_epoch)
    print(f"| git commit {git_state()['git_commit']}; run folder {args.output_dir}")

    # Build
    model, criterion, postprocessors = build(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    if args.distributed:
        # Some parameters never get gradients (level_embed, the unused merge/norm layers, the
        # projectors without a teacher), hence find_unused_parameters. The teacher is not wrapped.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=True)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr,
                                  weight_decay=args.weight_decay)
    lr_scheduler = build_scheduler(optimizer, args)
    loader_train, loader_val, dataset_val = make_loaders(args, eval_only=args.eval)
    if args.resume:
        resume(args, model_without_ddp, optimizer, lr_scheduler)

    # Run
    if args.eval:
        _, coco_eval = evaluate(model, criterion, postprocessors, loader_val, dataset_val.coco, device,
                                args.print_freq)
        if is_main_process():
            save_atomically(eval_arrays(coco_eval), os.path.join(args.output_dir, "eval.pth"))
            write_json(os.path.join(args.output_dir, "eval_stats.json"),
                      {"checkpoint": args.resume, "stats": named_stats(coco_eval.stats.tolist())})
        return
    train(args, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler, loader_train,
          loader_val, dataset_val, device, n_parameters)


def train(args, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler, loader_train,
          loader_val, dataset_val, device, n_parameters) -> None:
    """The epoch loop: train, step the schedule, save, evaluate on val, log (log.txt, tensorboard)."""
    output_dir = args.output_dir
    tb_writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used
        tb_writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        os.makedirs(os.path.join(output_dir, "eval"), exist_ok=True)
    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            loader_train.batch_sampler.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      args.n_iter_to_acc, args.print_freq, tb_writer=tb_writer)
        step_scheduler(lr_scheduler, epoch)
        if is_main_process():
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args)}
            save_atomically(checkpoint, os.path.join(output_dir, "checkpoint.pth"))
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % EXTRA_CHECKPOINT_EVERY == 0:
                save_atomically(checkpoint, os.path.join(output_dir, f"checkpoint{epoch:04}.pth"))
        test_stats, coco_eval = evaluate(model, criterion, postprocessors, loader_val, dataset_val.coco, device,
                                         args.print_freq)
        if is_main_process():
            record_epoch(output_dir, epoch, train_stats, test_stats, coco_eval, n_parameters, tb_writer)
    if tb_writer is not None:
        tb_writer.close()
    print(f"Training time {time.time() - start_time:.0f}s")


def record_epoch(output_dir: str, epoch: int, train_stats, test_stats, coco_eval, n_parameters: int,
                 tb_writer) -> None:
    """log.txt (the original's keys), COCOeval's arrays under eval/, eval_stats.json and tensorboard."""
    log = {**{f"train_{k}": v for k, v in train_stats.items()},
           **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch, "n_parameters": n_parameters}
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(log) + "\n")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser("ViDT + VkD training and evaluation", parents=[get_args_parser()])
    try:
        main(parser.parse_args())
    except (BadInput, CheckpointError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")  # on every rank: print() is silenced on all but rank 0
        sys.exit(2)
