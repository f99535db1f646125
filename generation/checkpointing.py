"""A generation run's checkpoint (``latest.pth``: the networks, optimizers, data position, every rank's random
generators and LeCam averages), how it is saved, and how a resume restores it."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from generation.arguments import RUN_DEFINING_FLAGS
from generation.engine import GanStep
from vkd.distributed import Runtime, every_rank
from vkd.errors import BadInput, CheckpointError
from vkd.preemption import rng_states, set_rng_states
from vkd.runs import refuse_a_different_run
from vkd.saver import CheckpointSaver

LATEST, BEST = "latest.pth", "best.pth"
NEW_RUN = "to train with these settings, start a new run: another --output-dir, without --resume"


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


def checkpoint_saver(args, is_main: bool = True) -> CheckpointSaver:
    """Generation's files (``vkd.saver``): latest.pth every --save-every iterations and at a stop request, best.pth
    (G's EMA) at each new best FID."""
    return CheckpointSaver(args.output_dir, LATEST, BEST, unit="iteration", is_main=is_main)


def save_latest(args, runtime: Runtime, step: GanStep, generator_ema: nn.Module, real_batches, iteration: int,
                best: Dict[str, float], training_images: int, preempted: bool = False) -> None:
    """Every rank calls it (what each holds of its own is gathered); the main process writes. ``preempted``: a
    stop request ends the run here, and every rank waits for the file."""
    ranks = every_rank(rank_state(step))
    content = checkpoint_content(args, step, generator_ema, real_batches, iteration, best, training_images, ranks)
    weights = [step.generator.state_dict(), step.discriminator.state_dict()]
    saver = checkpoint_saver(args, runtime.is_main)
    if preempted:
        saver.save_preempted(content, weights, f"iteration {iteration}")
    else:
        saver.save(content, iteration, weights)


def rank_state(step: GanStep) -> dict:
    """What differs between ranks: the random generators (each rank draws its own z, labels and augmentations)
    and LeCam's averages (of each rank's own logits)."""
    return {"rng": rng_states(), "lecam": step.lecam.state_dict() if step.lecam else None}


def refuse_another_run(args, checkpoint: dict, path: str, processes: int) -> Optional[int]:
    """Refuses, in one line, a resume whose flags would train differently from the run that wrote ``path`` (a
    changed batch size, say, would read past the saved data position): the rule of the three trees,
    ``vkd.runs.refuse_a_different_run``, on ``RUN_DEFINING_FLAGS``. --iterations may grow: returns the checkpoint's
    --iterations when this resume extends it, else None."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not the latest.pth of a generation run")
    saved = checkpoint.get("args", {})
    refuse_a_different_run(args, saved, RUN_DEFINING_FLAGS, checkpoint.get("processes"), processes, path, NEW_RUN)
    planned = saved.get("iterations", args.iterations)
    if args.iterations < planned:
        raise BadInput(f"--iterations {args.iterations} but {path} was trained with {planned}: a resume continues the "
                       f"same run, and only --iterations may grow; {NEW_RUN}")
    return planned if args.iterations > planned else None


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
