"""Training input pipeline throughput (img/s) for several worker counts; print one JSON line.

Uses the project's own pipeline (``datasets.build_dataset`` + ``build_loaders``: JPEG decode, the
original's effective train transform, collation) on an ImageFolder with ``train/`` and ``val/``.
Without ``--data-path`` it writes a temporary one of random smooth JPEGs (ImageNet-like 500x375;
smooth so that file sizes and decode cost resemble photos rather than noise).

    .venv/bin/python -m benchmarks.dataloader --workers 0,1,2
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from datasets import build_dataset, build_loaders, default_data_args

CLASSES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", default=None, help="ImageFolder root with train/ and val/ (default: generated)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count (default 8)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512, help="generated training images (default 512)")
    return parser.parse_args(argv)


def write_random_jpegs(root: str, images: int, seed: int = 0) -> None:
    generator = np.random.RandomState(seed)
    for split, count in (("train", images), ("val", CLASSES)):
        for index in range(count):
            folder = os.path.join(root, split, f"class{index % CLASSES}")
            os.makedirs(folder, exist_ok=True)
            coarse = Image.fromarray(generator.randint(0, 256, (24, 32, 3), dtype=np.uint8))
            coarse.resize((500, 375), Image.BILINEAR).save(os.path.join(folder, f"{index}.jpg"), quality=90)


def images_per_second(args, data_path: str, workers: int) -> float:
    data_args = default_data_args(data_set="FOLDER", data_path=data_path, input_size=args.input_size,
                                  batch_size=args.batch_size, num_workers=workers, pin_mem=False)
    train_set, _ = build_dataset(True, data_args)
    val_set, _ = build_dataset(False, data_args)
    loader, _ = build_loaders(data_args, train_set, val_set, distributed=False, rank=0, world_size=1)
    # Untimed: worker start-up, and the batches the workers prefetched meanwhile (prefetch_factor 2
    # each); timing starts once the queue is drained, so it measures the steady production rate.
    untimed = 1 + 2 * workers
    if len(loader) < untimed + args.batches:
        raise SystemExit(f"error: {len(loader)} batches per epoch, need {untimed + args.batches}: "
                         "add --images or lower --batch-size")
    batches = iter(loader)
    for _ in range(untimed):
        next(batches)
    start = time.perf_counter()
    seen = sum(len(next(batches)[0]) for _ in range(args.batches))
    return seen / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    worker_counts = [int(value) for value in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="vkd_dataloader_") as scratch:
        data_path = args.data_path
        if data_path is None:
            data_path = scratch
            write_random_jpegs(scratch, args.images)
        results = {str(workers): round(images_per_second(args, data_path, workers), 1) for workers in worker_counts}
    print(json.dumps({
        "img_per_s_by_workers": results,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **vars(args),
    }))


if __name__ == "__main__":
    sys.exit(main())
