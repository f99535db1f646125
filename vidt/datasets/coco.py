"""COCO detection through pycocotools: every image kept, crowd boxes dropped."""
from pathlib import Path

import torch
import torchvision

from vidt.datasets.transforms import make_coco_transforms
from vkd.errors import DatasetError

ANNOTATION_FILES = {"train": ("train2017", "instances_train2017.json"),
                    "val": ("val2017", "instances_val2017.json")}


def coco_target(image, image_id: int, annotations) -> dict:
    """xyxy boxes clamped to the image, degenerate and crowd boxes removed; labels are category ids."""
    width, height = image.size
    annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {
        "boxes": boxes[keep],
        "labels": torch.as_tensor([a["category_id"] for a in annotations], dtype=torch.int64)[keep],
        "area": torch.as_tensor([a["area"] for a in annotations], dtype=torch.float32)[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        "image_id": torch.tensor([image_id]),
        "orig_size": torch.as_tensor([height, width]),
        "size": torch.as_tensor([height, width]),
    }


class CocoDetection(torchvision.datasets.CocoDetection):
    def __init__(self, img_folder: Path, ann_file: Path, transforms):
        super().__init__(str(img_folder), str(ann_file))
        self._transforms = transforms

    def __getitem__(self, index):
        image, annotations = super().__getitem__(index)
        target = coco_target(image, self.ids[index], annotations)
        return self._transforms(image, target)


def build_coco(image_set: str, args) -> CocoDetection:
    root = Path(args.coco_path)
    folder, ann_name = ANNOTATION_FILES[image_set]
    img_folder, ann_file = root / folder, root / "annotations" / ann_name
    for path in (img_folder, ann_file):
        if not path.exists():
            raise DatasetError(f"--coco_path {root}: {path} does not exist (expected train2017/, val2017/, "
                               f"annotations/instances_{{train,val}}2017.json)")
    transforms = make_coco_transforms(image_set, args.train_sizes, args.max_size, args.eval_size)
    return CocoDetection(img_folder, ann_file, transforms)
