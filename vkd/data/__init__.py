"""Data sources shared by classification and generation, their subsets, transforms and loaders.

Import the submodule you need (``from vkd.data import fmnist``): this package imports nothing itself,
so a user of one light module (``vkd.data.mixup``) does not load torchvision and PIL.

- ``folders``: ImageFolder splits with their checks, skipping (or refusing) unreadable images;
- ``digits``: scikit-learn's digits, exported once as an ImageFolder;
- ``fmnist``: Fashion-MNIST's IDX files;
- ``cifar``: torchvision's CIFAR-10/100 layout, downloaded by torchvision only when asked;
- ``subsets``: class-balanced and uniform training subsets;
- ``transforms``: three-augment training and the evaluation transform;
- ``samplers``, ``loaders``: train samplers, the exact eval shard, loaders that drop unreadable images;
- ``mixup``: whether Mixup/CutMix is on.
"""
