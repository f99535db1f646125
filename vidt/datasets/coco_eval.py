"""Distributed COCO bbox evaluation: detections gathered from every process, scored by pycocotools."""
import contextlib
import io
from typing import Dict, List, Optional

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vkd.distributed import every_rank, is_main_process

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator:
    """Collects per-image predictions (xyxy boxes in original pixels) and runs COCOeval on rank 0."""

    def __init__(self, coco_gt: COCO):
        self.coco_gt = coco_gt
        self.detections: Dict[int, List[dict]] = {}

    def update(self, predictions: Dict[int, dict]) -> None:
        for image_id, prediction in predictions.items():
            boxes = prediction["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            # Keyed by image: the distributed sampler repeats images to even out the shards.
            rows = zip(boxes.tolist(), prediction["labels"].tolist(), prediction["scores"].tolist())
            self.detections[image_id] = [
                {"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)}
                for box, label, score in rows]

    def summarize(self) -> Optional[COCOeval]:
        """Prints pycocotools' 12-line summary and returns the COCOeval (``.stats``, ``.eval``) on rank 0;
        None elsewhere."""
        merged: Dict[int, List[dict]] = {}
        for part in every_rank(self.detections):
            merged.update(part)
        if not is_main_process():
            return None
        if not merged:
            raise RuntimeError("COCO evaluation got no images")
        detections = [d for image_dets in merged.values() for d in image_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(detections)
        evaluator = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(merged)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        print("IoU metric: bbox")
        evaluator.summarize()
        return evaluator


def eval_arrays(evaluator: COCOeval) -> dict:
    """COCOeval's accumulated ``eval`` dict (what the original saves as eval.pth), readable with
    ``torch.load(..., weights_only=True)``: the arrays as tensors and ``params`` as a plain dict instead of
    a pickled pycocotools object."""
    arrays = evaluator.eval
    params = {name: _plain(value) for name, value in vars(arrays["params"]).items()}
    return {"params": params, "counts": _plain(arrays["counts"]), "date": arrays["date"],
            **{name: torch.from_numpy(np.asarray(arrays[name])) for name in ("precision", "recall", "scores")}}


def _plain(value):
    """numpy arrays and scalars (also inside lists) as Python numbers and lists."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
