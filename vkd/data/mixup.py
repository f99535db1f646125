"""Whether the arguments turn Mixup/CutMix on, for the three places that depend on it without building it.

The loaders then keep training batches even (timm's Mixup asserts it), the criterion takes soft targets,
and the command line refuses Mixup-only flags when it is off. Building the Mixup itself is classification's
(``datasets.build_mixup``).
"""


def mixup_active(args) -> bool:
    """``args`` needs ``mixup``, ``cutmix`` (alphas, on if > 0) and ``cutmix_minmax`` (on if set)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
