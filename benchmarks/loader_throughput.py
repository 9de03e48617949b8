"""Images/s of gpusq's streaming data loader (ImageFolder of JPEGs → uint8 batches) vs worker count.

Generates N JPEGs (smooth random images, ImageNet-like file sizes) in a temporary ImageFolder,
then iterates ``data.Batches`` over ``data.build_dataset`` (file names only, decoded in workers;
no in-memory cache) with 0, 1, 2… worker processes, and prints images/s for each.

    python benchmarks/loader_throughput.py --n 2000 --src-size 256 --size 224 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gpusq.data import Batches, build_dataset


def make_folder(root: Path, n: int, src: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, (src // 16, src // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((src, src), Image.BICUBIC)
        noise = rng.normal(0, 8, (src, src, 3))
        arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:06d}.jpg", quality=90)


def measure(root: Path, size: int, workers: int, batch_size: int, epochs: int = 2) -> float:
    ds, _ = build_dataset(str(root), "train", (3, size, size))
    b = Batches(ds, batch_size, shuffle=True, workers=workers)
    best = 0.0
    for e in range(epochs):  # best of epochs: the first pays worker start-up and a cold page cache
        b.epoch = e
        t0 = time.perf_counter()
        n = sum(len(y) for _, y, _ in b)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--src-size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--size", type=int, default=224, help="model input side (images are resized to it)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    import os

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_folder(root, a.n, a.src_size)
        mb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / 1e6
        print(f"generated {a.n} JPEGs {a.src_size}x{a.src_size} ({mb:.1f} MB) in {time.perf_counter() - t0:.1f}s; "
              f"{os.cpu_count()} CPU cores")
        res = {}
        for w in a.workers:
            res[w] = measure(root, a.size, w, a.batch_size)
            print(f"workers={w}: {res[w]:.0f} images/s (decode + resize to {a.size}x{a.size}, batch {a.batch_size})",
                  flush=True)
        print(json.dumps({"images_per_s": res, "n": a.n, "src_size": a.src_size, "size": a.size}))


if __name__ == "__main__":
    main()
