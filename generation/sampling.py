"""Samples of a generator: the FID / IS evaluation of its EMA and the sample grids, drawn in train mode (BigGAN
samples with batch statistics) without changing its state."""
import contextlib
import copy
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from generation import data as gan_data
from generation.fid import GeneratorEvaluator, build_fid_network
from vkd.distributed import Runtime

GRID_COLUMNS = 10
EVAL_SEED_OFFSET = 7919  # evaluation draws its own latents, so evaluating never shifts training randomness


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
