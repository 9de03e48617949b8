"""Uncompressed COCO RLE (``{"size": [h, w], "counts": [...]}``), so that building and reading the
MNIST-canvas set needs no compiled extension. Runs alternate 0s and 1s, start with 0s, and walk the
mask in column-major (Fortran) order, exactly as pycocotools does (checked against it in the tests)."""

from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
    """Binary [H, W] mask → uncompressed RLE dict."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def decode(rle: dict) -> np.ndarray:
    """Uncompressed RLE dict → bool [H, W] mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, but size {h}x{w} has {h * w} pixels")
    vals = np.arange(len(counts)) % 2 == 1
    return np.repeat(vals, counts).reshape(w, h).T
