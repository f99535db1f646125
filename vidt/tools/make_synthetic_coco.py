"""Write a small COCO-format detection set of coloured shapes, for tests and a CPU demo.

Layout: <root>/train2017/*.jpg, <root>/val2017/*.jpg, <root>/annotations/instances_{train,val}2017.json.
Each image has a random background colour and 1-3 filled shapes (rectangle, ellipse, triangle) with
COCO category ids 1, 2, 3. Usage: python tools/make_synthetic_coco.py OUT_DIR [--train N --val N].
"""
import argparse
import json
import random
from pathlib import Path
from typing import Tuple

from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "rectangle", "supercategory": "shape"},
              {"id": 2, "name": "ellipse", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"}]


def _random_colour(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _draw_shape(draw: ImageDraw.ImageDraw, category_id: int, box, colour) -> None:
    x0, y0, x1, y1 = box
    if category_id == 1:
        draw.rectangle(box, fill=colour)
    elif category_id == 2:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _make_split(root: Path, split: str, num_images: int, size: Tuple[int, int], rng: random.Random,
                first_annotation_id: int) -> int:
    width, height = size
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    annotation_id = first_annotation_id
    for index in range(num_images):
        image_id = index + 1
        image = Image.new("RGB", (width, height), _random_colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            category_id = rng.choice(CATEGORIES)["id"]
            box_w = rng.randint(width // 6, width // 2)
            box_h = rng.randint(height // 6, height // 2)
            x0, y0 = rng.randint(0, width - box_w), rng.randint(0, height - box_h)
            _draw_shape(draw, category_id, (x0, y0, x0 + box_w, y0 + box_h), _random_colour(rng))
            annotations.append({"id": annotation_id, "image_id": image_id, "category_id": category_id,
                                "bbox": [x0, y0, box_w, box_h], "area": box_w * box_h, "iscrowd": 0})
            annotation_id += 1
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return annotation_id


def make_synthetic_coco(root, num_train: int = 8, num_val: int = 4, size: Tuple[int, int] = (160, 128),
                        seed: int = 0) -> Path:
    """Create the dataset under ``root`` (width, height = size) and return root as a Path."""
    root = Path(root)
    rng = random.Random(seed)
    next_id = _make_split(root, "train", num_train, size, rng, first_annotation_id=1)
    _make_split(root, "val", num_val, size, rng, first_annotation_id=next_id)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder (used as --coco_path)")
    parser.add_argument("--train", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--val", type=int, default=4, help="validation images (default 4)")
    parser.add_argument("--size", type=int, nargs=2, default=(160, 128), metavar=("W", "H"),
                        help="image width and height (default 160 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = make_synthetic_coco(args.root, args.train, args.val, tuple(args.size), args.seed)
    print(f"wrote {args.train} train and {args.val} val images under {root}")


if __name__ == "__main__":
    main()
