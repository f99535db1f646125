"""Seeded training subsets: class-balanced (classification's ``--subset``, generation's ``balanced`` draw)
or uniform (KD-DLGAN's draw). Both return sorted indices, so a subset keeps the data's order."""
from typing import List, Sequence

import numpy as np

SUBSET_FRACTIONS = {"1PERCENT": 0.01, "10PERCENT": 0.10, "20PERCENT": 0.20}  # --subset's names; FULL keeps all


def balanced_subset_indices(targets: Sequence[int], fraction: float, seed: int) -> List[int]:
    """``fraction`` of every class (at least one image each), chosen with ``seed``; sorted."""
    targets = np.asarray(targets)
    generator = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(generator.permutation(members)[:keep])
    return sorted(np.concatenate(chosen).tolist())


def uniform_subset_indices(count: int, fraction: float, seed: int) -> List[int]:
    """``round(fraction * count)`` of ``range(count)`` drawn without replacement with ``seed``; sorted.

    KD-DLGAN's ``--num_samples``: ``np.random.seed(0); np.random.choice(N, num_samples, replace=False)``.
    """
    kept = int(round(fraction * count))
    return sorted(np.random.RandomState(seed).choice(count, kept, replace=False).tolist())


def restrict(dataset, indices: Sequence[int]) -> None:
    """Keeps only ``indices`` of a data set, in place, so it keeps its type and attributes.

    Folder data sets list their files in ``samples`` (and torchvision's alias ``imgs``); in-memory ones
    (CIFAR, IDX images) hold an array ``data``. Either way ``targets`` follows.
    """
    dataset.targets = [dataset.targets[i] for i in indices]
    if hasattr(dataset, "samples"):
        dataset.samples = [dataset.samples[i] for i in indices]
        dataset.imgs = dataset.samples
    else:
        dataset.data = dataset.data[indices]
