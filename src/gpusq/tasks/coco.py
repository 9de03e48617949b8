"""COCO-format instance data (``instances.json`` + an image folder) for torchvision detection models.

Each item is ``(image float [3, H, W] in [0, 1], target)`` with the target torchvision's
``MaskRCNN`` expects: ``boxes`` (float [N, 4], x0 y0 x1 y1), ``labels`` (int64 [N], 1..K),
``masks`` (uint8 [N, H, W]) plus ``image_id``. Category ids are mapped to contiguous labels
1..K in id order (0 is background); ``label_to_cat`` maps back for evaluation. Images keep their
own sizes: batch with ``collate_list``.

Bad input is found as early as it can be: a malformed json, an image the json names but the
folder lacks (at construction), a mask whose size differs from its image (when loaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gpusq.errors import GpusqError
from gpusq.tasks import rle


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GpusqError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GpusqError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise GpusqError(f"{path} is not a text (JSON) file") from None
    if not isinstance(data, dict):
        raise GpusqError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise GpusqError(f"{path}: missing or non-list '{key}' (not a COCO instances file)")
    return data


def decode_segmentation(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    """A COCO ``segmentation`` (uncompressed/compressed RLE or polygons) → bool [h, w] mask.

    Raises a GpusqError when the RLE's size is not the image's size.
    """
    if isinstance(seg, dict):
        size = list(seg.get("size", []))
        if size != [h, w]:
            raise GpusqError(f"{where}: mask size {size[0] if size else '?'}x{size[1] if len(size) > 1 else '?'} "
                             f"differs from the image size {h}x{w}")
        if isinstance(seg.get("counts"), list):
            try:
                return rle.decode(seg)
            except ValueError as e:
                raise GpusqError(f"{where}: {e}") from None
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise GpusqError(f"{where}: polygon / compressed-RLE masks need pycocotools "
                         "(pip install 'gpusq[dense]')") from None
    if isinstance(seg, dict):
        return mask_utils.decode(seg).astype(bool)
    if not isinstance(seg, list) or not seg:
        raise GpusqError(f"{where}: 'segmentation' is neither an RLE dict nor a list of polygons")
    rles = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances json + image folder → (image, target) pairs; see the module docstring."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path | None = None, masks: bool = True):
        self.ann_file = Path(ann_file)
        data = _load_json(self.ann_file)
        self.img_dir = Path(img_dir) if img_dir is not None else self.ann_file.parent / "images"
        if not self.img_dir.is_dir():
            raise GpusqError(f"image folder {self.img_dir} does not exist")
        self.masks = masks
        self.coco = data
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.class_names = {self.cat_to_label[int(c["id"])]: str(c.get("name", c["id"])) for c in data["categories"]}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        missing = [im["file_name"] for im in self.images if not (self.img_dir / im["file_name"]).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise GpusqError(f"{self.ann_file} refers to {len(missing)} image(s) missing from {self.img_dir}: "
                             f"{', '.join(missing[:3])}{more}")
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            where = f"{self.ann_file}: annotation {a.get('id')}"
            if a["image_id"] not in self.anns:
                raise GpusqError(f"{where} refers to unknown image_id {a['image_id']}")
            if int(a["category_id"]) not in self.cat_to_label:
                raise GpusqError(f"{where} has unknown category_id {a['category_id']}")
            self.anns[a["image_id"]].append(a)

    @property
    def num_classes(self) -> int:
        """Including the background class 0 (what torchvision's ``num_classes`` means)."""
        return len(self.cat_to_label) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[i]
        path = self.img_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                img = np.array(im.convert("RGB"))
        except OSError as e:
            raise GpusqError(f"cannot read image {path}: {e}") from None
        h, w = img.shape[:2]
        if (info.get("height"), info.get("width")) not in ((None, None), (h, w)):
            raise GpusqError(f"{path} is {h}x{w} but {self.ann_file.name} says "
                             f"{info.get('height')}x{info.get('width')}")
        boxes, labels, masks = [], [], []
        for a in self.anns[info["id"]]:
            if a.get("iscrowd", 0):
                continue  # crowd regions are for evaluation only
            x, y, bw, bh = (float(v) for v in a["bbox"])
            if bw <= 0 or bh <= 0:
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[int(a["category_id"])])
            if self.masks:
                masks.append(decode_segmentation(a["segmentation"], h, w, f"{path.name} annotation {a.get('id')}"))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool)).to(torch.uint8)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(255)
        return image, target


def collate_list(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Keep images of different sizes apart: torchvision detectors take a list of images."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def coco_folder(path: str | Path, masks: bool = True) -> CocoDetection:
    """A COCO-format folder (``instances.json`` + ``images/``, what ``gpusq.tasks.mnist_canvas`` writes)
    or an instances json itself. ``masks=False`` skips decoding instance masks (box-only detectors)."""
    p = Path(path)
    if not p.exists():
        raise GpusqError(f"data folder {p} does not exist")
    if p.is_file():
        return CocoDetection(p, masks=masks)
    return CocoDetection(p / "instances.json", p / "images", masks=masks)
