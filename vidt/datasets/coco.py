"""COCO detection through pycocotools: every image kept, crowd boxes dropped.

``build_coco`` checks a split before any training: the annotation file must be COCO JSON, every
``category_id`` a class of the model and every listed image on disk, each failure being one line. Found
later, they would be a traceback from the JSON parser, an index error in the loss after training started,
or a loader worker's traceback (for a validation image, only after a full epoch).
"""
import json
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO

from vidt.datasets.transforms import make_coco_transforms
from vkd.errors import DatasetError

ANNOTATION_FILES = {"train": ("train2017", "instances_train2017.json"),
                    "val": ("val2017", "instances_val2017.json")}
COCO_LISTS = ("images", "annotations", "categories")  # COCOeval needs all three


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


class CocoDetection(torch.utils.data.Dataset):
    """The images of ``coco`` (a pycocotools index) under ``img_folder``, with their targets transformed."""

    def __init__(self, img_folder: Path, coco: COCO, transforms):
        self.img_folder, self.coco, self._transforms = img_folder, coco, transforms
        self.ids = sorted(coco.imgs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = Image.open(self.img_folder / self.coco.imgs[image_id]["file_name"]).convert("RGB")
        target = coco_target(image, image_id, self.coco.loadAnns(self.coco.getAnnIds(image_id)))
        return self._transforms(image, target)


def read_annotations(ann_file: Path) -> COCO:
    """The pycocotools index of ``ann_file``, read once; a file that is not COCO JSON is one line."""
    try:
        with open(ann_file) as handle:
            content = json.load(handle)
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise DatasetError(f"{ann_file} is not valid JSON: {error}") from None
    for key in COCO_LISTS:
        if not isinstance(content, dict) or not isinstance(content.get(key), list):
            raise DatasetError(f"{ann_file} is not a COCO annotation file: it has no '{key}' list")
    coco = COCO()
    coco.dataset = content
    coco.createIndex()
    return coco


def check_split(coco: COCO, img_folder: Path, ann_file: Path, num_classes: int) -> None:
    """Every label is a class of the model (the loss indexes its logits with it) and every image exists."""
    for annotation in coco.anns.values():
        category_id = annotation.get("category_id")
        if not (type(category_id) is int and 0 <= category_id < num_classes):
            raise DatasetError(f"{ann_file}: category_id {category_id!r} (annotation {annotation.get('id')}) is not "
                               f"one of the model's {num_classes} classes (0 to {num_classes - 1})")
    missing = [image.get("file_name", "") for image in coco.imgs.values()
               if not (img_folder / image.get("file_name", "")).is_file()]
    if missing:
        raise DatasetError(f"{img_folder / missing[0]}, listed in {ann_file}, does not exist; {len(missing)} of its "
                           f"{len(coco.imgs)} images are missing")


def build_coco(image_set: str, args, num_classes: int) -> CocoDetection:
    root = Path(args.coco_path)
    folder, ann_name = ANNOTATION_FILES[image_set]
    img_folder, ann_file = root / folder, root / "annotations" / ann_name
    for path in (img_folder, ann_file):
        if not path.exists():
            raise DatasetError(f"--coco_path {root}: {path} does not exist (expected train2017/, val2017/, "
                               f"annotations/instances_{{train,val}}2017.json)")
    coco = read_annotations(ann_file)
    check_split(coco, img_folder, ann_file, num_classes)
    transforms = make_coco_transforms(image_set, args.train_sizes, args.max_size, args.eval_size)
    return CocoDetection(img_folder, coco, transforms)
