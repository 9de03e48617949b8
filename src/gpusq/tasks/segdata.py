"""ADE20K-style semantic segmentation data: ``images/NAME.(png|jpg)`` + ``labels/NAME.png``.

Label PNGs hold one class index per pixel (``0`` background ... ``K-1``, ``255`` ignored), as the
MNIST-canvas builder writes them. Images keep their own sizes (batch with ``collate_list``); a label
map whose size differs from its image is a one-line GpusqError. An optional ``classes.txt`` (one
class name per line, line ``i`` naming label ``i``, background included) names the classes; models
record them and are checked against them (``gpusq.classes``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gpusq.errors import GpusqError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


class SegmentationFolder(torch.utils.data.Dataset):
    """(image float [3, H, W] in [0, 1], label int64 [H, W]) pairs from ``root/images`` + ``root/labels``."""

    def __init__(self, root: str | Path, images: str = "images", labels: str = "labels"):
        root = Path(root)
        self.img_dir, self.lab_dir = root / images, root / labels
        names = root / "classes.txt"
        self.classes: list[str] | None = None  # the class names in label order, when the folder names them
        if names.is_file():
            self.classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
            if not self.classes:
                raise GpusqError(f"{names} names no class (one class name per line, label order)")
        for d in (self.img_dir, self.lab_dir):
            if not d.is_dir():
                raise GpusqError(f"{d} does not exist (expected {root}/{images} and {root}/{labels})")
        self.files = sorted(p for p in self.img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise GpusqError(f"no images in {self.img_dir}")
        missing = [p.name for p in self.files if not (self.lab_dir / f"{p.stem}.png").is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise GpusqError(f"{len(missing)} image(s) in {self.img_dir} have no label PNG in {self.lab_dir}: "
                             f"{', '.join(missing[:3])}{more}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.files[i]
        lp = self.lab_dir / f"{p.stem}.png"
        try:
            with Image.open(p) as im:
                img = np.array(im.convert("RGB"))
            with Image.open(lp) as lab_im:
                if lab_im.mode not in ("L", "P", "I", "I;16"):
                    raise GpusqError(f"label {lp} has mode {lab_im.mode}; expected a single-channel class-index PNG")
                lab = np.array(lab_im).astype(np.int64)
        except OSError as e:
            raise GpusqError(f"cannot read {p.name} or its label: {e}") from None
        if lab.shape != img.shape[:2]:
            raise GpusqError(f"label {lp.name} is {lab.shape[0]}x{lab.shape[1]} but image {p.name} is "
                             f"{img.shape[0]}x{img.shape[1]}")
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255), torch.from_numpy(lab)
