"""The paper's published numbers (VkD, CVPR 2024), in one place, and the tables the reports print them in.

They come from full-scale runs (ImageNet-1k, 300 epochs, RegNetY-160 teacher; COCO, 50 epochs, ViDT-base
teacher; BigGAN on CIFAR, CLIP ViT-B/32 teacher) and are never re-run here: the reports set them beside
the small-scale results for the direction only.
"""
from typing import List

# ImageNet-1k val, (top-1, top-5): the paper's table and the authors' single-GPU re-run.
IMAGENET = {
    "VkD DeiT-Ti": {"paper": (78.3, 94.1), "single_gpu_rerun": (79.2, 94.6), "params": "6M"},
    "VkD DeiT-S": {"paper": (82.3, 96.0), "single_gpu_rerun": (82.9, 96.2), "params": "22M"},
}
# ImageNet-1k val top-1 of the references the paper compares with.
IMAGENET_REFERENCES_TOP1 = {
    "DeiT-Ti / DeiT-Ti distilled": (72.2, 74.5),
    "DeiT-S / DeiT-S distilled": (79.8, 81.2),
    "RegNetY-160 teacher": (82.6,),
}
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCO val2017, ViDT trained 50 epochs.
COCO = {
    "VkD Swin-nano": {"AP": 43.0, "AP50": 62.3, "AP75": 46.2, "APs": 24.8, "APm": 45.3, "APl": 60.1, "params": "16M"},
    "VkD Swin-tiny": {"AP": 46.9, "AP50": 66.6, "AP75": 50.9, "APs": 27.8, "APm": 49.8, "APl": 64.6, "params": "38M"},
}
# COCO val2017 AP of the references, (nano, tiny).
COCO_REFERENCES_AP = {
    "ViDT undistilled nano / tiny": (40.4, 44.9),
    "ViDT token-matching KD nano / tiny": (41.9, 46.6),
}
# FID of BigGAN + DiffAugment trained on 10% of the data, (CIFAR-10, CIFAR-100); lower is better.
GENERATION_FID_10_PERCENT = {
    "DiffAugment only": (23.34, 35.39),
    "KD-DLGAN (CLIP teacher, its own losses; not implemented here)": (14.20, 18.03),
    "VkD, LayerNorm teacher": (16.47, 24.92),
    "VkD, whitened teacher": (13.16, 16.87),
}


def _slash(values, decimals: int = 1) -> str:
    return " / ".join(f"{value:.{decimals}f}" for value in values)


def imagenet_table() -> List[str]:
    lines = ["| ImageNet-1k val (top-1 / top-5) | paper | single-GPU re-run (authors) | params |", "|---|---|---|---|"]
    lines += [f"| {name} | {_slash(row['paper'])} | {_slash(row['single_gpu_rerun'])} | {row['params']} |"
              for name, row in IMAGENET.items()]
    lines += [f"| {name} (top-1) | {_slash(top1)} | | |" for name, top1 in IMAGENET_REFERENCES_TOP1.items()]
    return lines


def coco_table() -> List[str]:
    lines = [f"| COCO val2017, ViDT 50 epochs | {' | '.join(COCO_METRICS)} | params |",
             "|" + "---|" * (len(COCO_METRICS) + 2)]
    lines += [f"| {name} | {' | '.join(f'{row[metric]:.1f}' for metric in COCO_METRICS)} | {row['params']} |"
              for name, row in COCO.items()]
    lines += [f"| {name} | {_slash(ap)} |" + " |" * len(COCO_METRICS) for name, ap in COCO_REFERENCES_AP.items()]
    return lines


def generation_table() -> List[str]:
    """The 10%-data FIDs, the best of each column in bold."""
    best = [min(fids[column] for fids in GENERATION_FID_10_PERCENT.values()) for column in (0, 1)]
    lines = ["| FID, BigGAN + DiffAugment, 10% data | CIFAR-10 | CIFAR-100 |", "|---|---|---|"]
    for name, fids in GENERATION_FID_10_PERCENT.items():
        cells = [f"**{fid:.2f}**" if fid == best[column] else f"{fid:.2f}" for column, fid in enumerate(fids)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def generation_sentence() -> str:
    """The 10%-data FIDs of the rows this repository implements, in one sentence."""
    fids = {name: _slash(values, decimals=2) for name, values in GENERATION_FID_10_PERCENT.items()}
    return (f"Generation (BigGAN+DA, FID at 10% data, CIFAR-10 / CIFAR-100): baseline {fids['DiffAugment only']}, "
            f"VkD with LayerNorm {fids['VkD, LayerNorm teacher']}, VkD with whitening {fids['VkD, whitened teacher']} "
            "(the normalisation must fit the task).")
