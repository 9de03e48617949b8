"""MNIST-canvas: a small real-data detection + instance/semantic segmentation set.

Real MNIST-5k digits (``gpusq.data.load_mnist5k``) are pasted on larger black canvases, 1 to
``max_digits`` per canvas, with non-intersecting tight boxes (so instance masks are disjoint and
the semantic label of each pixel is unambiguous). Per digit: the box of its non-zero pixels
(after thresholding), its binary mask and its class (the digit). Written as

* ``DIR/images/NNNNN.png`` (8-bit grayscale) and ``DIR/instances.json`` (COCO format, category id
  = digit + 1, masks as uncompressed RLE);
* ``DIR/labels/NNNNN.png`` (ADE20K style: 0 background, 1 + digit on the digit's pixels) and
  ``DIR/classes.txt`` (the label names: ``background``, ``0`` ... ``9``).

Everything comes from one seed, so ``python -m gpusq.tasks.mnist_canvas --out DIR --n 500`` rebuilds
the same files anywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from gpusq.checkpoint import atomic_write_text
from gpusq.errors import GpusqError
from gpusq.tasks import rle

# A digit pixel belongs to the mask above this gray level (MNIST strokes have soft edges).
MASK_THRESHOLD = 64
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]


def _boxes_intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_canvas(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, size: int,
                max_digits: int, gap: int = 1, tries: int = 100):
    """One canvas: (uint8 image [size, size], list of (digit, bool mask [size, size], box x0,y0,x1,y1))."""
    canvas = np.zeros((size, size), np.uint8)
    placed: list[tuple[int, np.ndarray, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        i = int(rng.integers(len(digits)))
        d = digits[i]
        ys, xs = np.nonzero(d > MASK_THRESHOLD)
        crop = d[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
        h, w = crop.shape
        for _ in range(tries):
            y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = (x0, y0, x0 + w, y0 + h)  # exclusive x1, y1
            if not any(_boxes_intersect(box, p[2], gap) for p in placed):
                break
        else:
            continue  # no room left: fewer digits on this canvas
        canvas[y0: y0 + h, x0: x0 + w] = np.maximum(canvas[y0: y0 + h, x0: x0 + w], crop)
        mask = np.zeros((size, size), bool)
        mask[y0: y0 + h, x0: x0 + w] = crop > MASK_THRESHOLD
        placed.append((int(labels[i]), mask, box))
    return canvas, placed


DIGIT_SPLITS = ("all", "train", "test")


def build_mnist_canvas(out: str | Path, n: int = 500, size: int = 96, max_digits: int = 4, seed: int = 0,
                       digits: str = "all") -> dict:
    """Write ``n`` canvases to ``out`` (see the module docstring); returns a summary dict.

    ``digits``: which MNIST-5k images are pasted: ``all``, or the fixed ``train`` (4,000) / ``test``
    (1,000) split of ``gpusq.data.mnist5k_split``, so that a validation set built from ``test``
    shares no digit image with a training set built from ``train``."""
    if digits not in DIGIT_SPLITS:
        raise GpusqError(f"--digits must be one of {', '.join(DIGIT_SPLITS)}, got {digits!r}")
    if n < 1:
        raise GpusqError(f"--n must be >= 1, got {n}")
    if size < 28:
        raise GpusqError(f"--size must be >= 28 (an MNIST digit is 28x28), got {size}")
    if max_digits < 1:
        raise GpusqError(f"--max-digits must be >= 1, got {max_digits}")
    from gpusq.data import load_mnist5k, mnist5k_split

    if digits == "all":
        pool, labels = load_mnist5k()
    else:
        x, y = mnist5k_split(digits)
        pool, labels = x[:, 0].numpy(), y.numpy()
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for img_id in range(1, n + 1):
        canvas, placed = make_canvas(rng, pool, labels, size, max_digits)
        sem = np.zeros((size, size), np.uint8)
        fname = f"{img_id:05d}.png"
        for digit, mask, _box in placed:
            sem[mask] = digit + 1
            ys, xs = np.nonzero(mask)
            bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": digit + 1,
                "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": rle.encode(mask),
            })
        Image.fromarray(canvas, mode="L").save(out / "images" / fname)
        Image.fromarray(sem, mode="L").save(out / "labels" / fname)
        images.append({"id": img_id, "file_name": fname, "width": size, "height": size})
    desc = f"MNIST-canvas n={n} size={size} max_digits={max_digits} seed={seed} digits={digits}"
    coco = {"info": {"description": desc},
            "images": images, "annotations": anns, "categories": CATEGORIES}
    atomic_write_text(out / "instances.json", json.dumps(coco))
    atomic_write_text(out / "classes.txt", "\n".join(["background"] + [c["name"] for c in CATEGORIES]) + "\n")
    return {"images": n, "instances": len(anns), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpusq.tasks.mnist_canvas", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--max-digits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", default="all", choices=DIGIT_SPLITS,
                    help="MNIST-5k images used: all, or the fixed train (4,000) / test (1,000) split")
    a = ap.parse_args(argv)
    try:
        s = build_mnist_canvas(a.out, a.n, a.size, a.max_digits, a.seed, a.digits)
    except GpusqError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"{s['images']} images, {s['instances']} digit instances written to {s['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
