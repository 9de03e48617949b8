"""Training augmentation from ``timm.data``, seeded so that runs stay exactly reproducible.

What runs where (``AugmentConfig``, the recipe's ``augment:`` section):

* per image, in the loader: timm's ``transforms_imagenet_train`` pieces — for models of >= 128 px
  input RandomResizedCrop + horizontal flip (``hflip``) + RandAugment / AutoAugment / AugMix
  (``auto_augment``) or colour jitter; for smaller (CIFAR-size) images only RandAugment / colour
  jitter (crop and flip stay batched on the device, ``data.random_crop_flip``);
* per batch, in the training loop (``BatchAugment``): timm's ``RandomErasing`` on the normalized
  batch, then timm's ``Mixup`` (Mixup / CutMix, label smoothing → soft targets).

timm and torchvision draw from the global RNGs (Python's ``random``, numpy, torch). gpusq seeds them
for every image from (seed, epoch, dataset index) and for every batch from (seed, step, position in
the global batch), and restores them afterwards. So an image's augmentation depends neither on the
loader worker that decodes it, nor on the number of torchrun processes, nor on where a run was
resumed: resume stays bit-exact and N processes augment exactly as one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpusq.errors import InternalError

RE_MODES = ("const", "rand", "pixel")


@dataclass
class AugmentConfig:
    """Training augmentation (timm's names and meanings; defaults: what gpusq always did).

    ``hflip``: horizontal-flip probability; ``None`` (default) is the dataset's own: 0.5 for image
    folders, 0 for ``mnist5k`` (digits must not be flipped). ``auto_augment``: a timm policy string,
    e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment, DeiT's), ``augmix-m5``, ``original``.
    ``color_jitter``: brightness/contrast/saturation factor (timm turns it off under RandAugment).
    ``re_prob`` / ``re_mode`` / ``re_count``: random erasing. ``mixup`` / ``cutmix``: Beta alphas
    (0: off), applied with probability ``mixup_prob``, CutMix instead of Mixup with
    ``mixup_switch_prob`` when both are on; targets become soft, smoothed by the stage's
    ``label_smoothing``.
    """

    hflip: float | None = None
    auto_augment: str | None = None
    color_jitter: float = 0.0
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for k in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{k} must be in [0, 1], got {v}")
        for k in ("color_jitter", "mixup", "cutmix"):
            if getattr(self, k) < 0:
                raise ValueError(f"augment.{k} must be >= 0, got {getattr(self, k)}")
        if self.re_mode not in RE_MODES:
            raise ValueError(f"augment.re_mode must be one of {', '.join(RE_MODES)}, got {self.re_mode!r}")
        if self.re_count < 1:
            raise ValueError(f"augment.re_count must be >= 1, got {self.re_count}")
        if self.auto_augment:
            try:
                _policy(self.auto_augment, {})
            except Exception as e:  # noqa: BLE001 - timm's parsers raise assertions, KeyErrors, ValueErrors
                raise ValueError(f"augment.auto_augment {self.auto_augment!r} is not a timm policy "
                                 f"({type(e).__name__}: {e}); e.g. rand-m9-mstd0.5-inc1, augmix-m5, original") from None

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def flip_prob(self, dataset_default: float) -> float:
        return dataset_default if self.hflip is None else float(self.hflip)

    def changed(self, names: Sequence[str] | None = None) -> list[str]:
        """The fields (of ``names``; default all) set away from their defaults: what a recipe asks for."""
        default = AugmentConfig()
        return [n for n in (names or [f.name for f in dataclasses.fields(self)])
                if getattr(self, n) != getattr(default, n)]


# -- seeding ------------------------------------------------------------------------------------
_M64 = 2**64 - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (e.g. seed, epoch, index): neighbouring keys give
    unrelated streams."""
    h = 0
    for k in keys:
        h = _splitmix(h ^ _splitmix(int(k) & _M64))
    return h >> 1


def reseed(seed: int, numpy: bool = True) -> None:
    """Seed the generators timm / torchvision transforms draw from: Python, numpy (only where asked:
    its state costs ~80 us to save and restore), torch (CPU only: the GPU generators, which dropout
    uses, are left alone)."""
    random.seed(seed)
    if numpy:
        np.random.seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)


class GlobalRng:
    """Saves the global Python / numpy / torch-CPU RNG states on enter and restores them on exit, so
    seeded augmentation leaves the training's own random stream untouched."""

    def __init__(self, numpy: bool = True):
        self.numpy = numpy

    def __enter__(self) -> GlobalRng:
        self._s = (random.getstate(), np.random.get_state() if self.numpy else None,
                   torch.default_generator.get_state())
        return self

    def __exit__(self, *exc) -> None:
        py, npy, tc = self._s
        random.setstate(py)
        if npy is not None:
            np.random.set_state(npy)
        torch.default_generator.set_state(tc)


# -- per-image transforms (loader) ------------------------------------------------------------
def _policy(text: str, hparams: dict):
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    if text.startswith("rand"):
        return rand_augment_transform(text, hparams)
    if text.startswith("augmix"):
        return augment_and_mix_transform(text, hparams)
    return auto_augment_transform(text, hparams)


def _posterize_compat(img, bits_to_keep, **_):
    """timm's posterize for Pillow >= 12: 0 bits (RandAugment's ``inc1`` at magnitude 10) is an
    all-black image, as in older Pillow, instead of Pillow's ValueError."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return posterize(img, bits_to_keep)


def _pillow_compat_(tf) -> None:
    """Point every posterize op of timm's AutoAugment / RandAugment / AugMix in ``tf`` to
    ``_posterize_compat`` (only these transform objects; timm itself is not patched)."""
    from timm.data.auto_augment import AugmentOp, posterize

    stack = [tf]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp):
            if t.aug_fn is posterize:
                t.aug_fn = _posterize_compat
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            for attr in ("transforms", "ops", "policy"):
                if isinstance(getattr(t, attr, None), (list, tuple)):
                    stack.extend(getattr(t, attr))


def train_transforms(cfg: AugmentConfig, size: tuple[int, int, int], crop: bool, flip: float,
                     mean: tuple[float, ...]) -> tuple[Callable | None, Callable | None]:
    """PIL → PIL training transforms from timm's ``transforms_imagenet_train``: (geometry, colour),
    each None when empty.

    geometry: RandomResizedCrop (scale 0.08–1, bicubic) + ``flip``, only with ``crop`` (models of
    >= 128 px; the device crops and flips CIFAR-size batches). colour: RandAugment / AutoAugment /
    AugMix or colour jitter, at the model size; left out of calibration batches. Normalization and
    random erasing are left to the device (``use_prefetcher``), so the loader still yields uint8.
    """
    from timm.data.transforms_factory import transforms_imagenet_train
    from torchvision import transforms as T

    _, h, w = size
    primary, secondary, _final = transforms_imagenet_train(
        (h, w), hflip=flip if crop else 0.0, color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment or None, interpolation="bicubic", mean=mean, use_prefetcher=True,
        separate=True)
    geometry = T.Compose(primary.transforms) if crop and primary.transforms else None
    colour = T.Compose(secondary.transforms) if secondary.transforms else None
    if geometry is not None:
        geometry.gpusq_numpy = False  # timm's crop draws from Python's random, the flip from torch
    if colour is not None:
        _pillow_compat_(colour)
        colour.gpusq_numpy = bool(cfg.auto_augment)  # RandAugment / AugMix draw from numpy
    return geometry, colour


def split_key(key) -> tuple[int, tuple | None, bool]:
    """A dataset key → (index, seed, augment): ``data.Batches`` passes ``(index, seed, epoch, augment)``
    to datasets with ``seeded_transform``; a plain index means unseeded and augmented."""
    if isinstance(key, tuple):
        return key[0], key[1:3], bool(key[3]) if len(key) > 3 else True
    return key, None, True


class AugmentedImages(torch.utils.data.Dataset):
    """uint8 ``[C, H, W]`` images of a ``TensorDataset`` (decoded once) through a PIL transform, seeded
    per image from the ``(index, seed, epoch, augment)`` keys ``data.Batches`` passes
    (``seeded_transform``); ``augment`` False: the image as decoded (calibration)."""

    seeded_transform = True
    random_transform = True

    def __init__(self, base: torch.utils.data.TensorDataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        i, seed, aug = split_key(key)
        x, y = self.base[i]
        return (apply_seeded(self.transform, x, seed, (i, 1)) if aug else x), y  # ImageFiles.post's key


def apply_seeded(transform: Callable, x: torch.Tensor, seed: tuple | None, index: tuple) -> torch.Tensor:
    """``transform`` (PIL → PIL) on a uint8 CHW tensor, with the global RNGs seeded from
    ``(*seed, *index)``; ``seed`` None: unseeded (direct indexing)."""
    from PIL import Image

    arr = x.numpy()
    im = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    im = run_seeded(transform, im, seed, index)
    out = np.asarray(im, dtype=np.uint8)
    chw = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return torch.from_numpy(np.array(chw, order="C"))


def run_seeded(transform: Callable, im, seed: tuple | None, index: tuple):
    """``transform(im)`` with the global RNGs seeded from ``(*seed, *index)`` (restored afterwards in
    the main process; a loader worker's own RNGs serve nothing else)."""
    if seed is None:
        return transform(im)
    use_np = getattr(transform, "gpusq_numpy", True)
    if torch.utils.data.get_worker_info() is not None:
        reseed(mix_seed(*seed, *index), use_np)
        return transform(im)
    with GlobalRng(use_np):
        reseed(mix_seed(*seed, *index), use_np)
        return transform(im)


# -- per-batch augmentation (training loop) -------------------------------------------------------
class BatchAugment:
    """Random erasing then Mixup / CutMix of a normalized training batch: ``x, y = aug(x, y, step)``.

    ``y`` comes back as soft targets ``[B, num_classes]`` (rows sum to 1) when mixing is on, else
    unchanged. Draws depend only on ``(seed, step)`` and each image's position in the global batch:
    erasing is seeded per image; Mixup / CutMix pairs global position ``p`` with ``G - 1 - p`` (timm's
    batch flip), whose image lives on rank ``world - 1 - rank`` under torchrun, reversed, so ranks
    swap batches (one all-gather) and mix exactly as one process with the global batch would.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int, seed: int, label_smoothing: float = 0.0,
                 shard: tuple[int, int] = (0, 1)):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.seed, self.shard = seed, shard
        # noise made on the CPU (the generator seeded per image), copied into the batch: the same
        # erasing on every device
        self.erase = (RandomErasing(cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device="cpu")
                      if cfg.re_prob > 0 else None)
        self.mix = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=label_smoothing,
                          num_classes=num_classes) if cfg.mixing else None)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        with GlobalRng():
            if self.erase is not None:
                self._erase(x, step)
            if self.mix is not None:
                x, y = self._mix(x, y, step)
        return x, y

    def _erase(self, x: torch.Tensor, step: int) -> None:
        """timm's erasing of each image, seeded per image, drawn on the CPU (``_Boxes`` records what timm
        writes), then the boxes' pixels go to ``x``'s device in one copy: a per-image write from the CPU
        into a GPU batch is a synchronizing copy each (the loop cannot run ahead of the GPU); numpy, which
        timm's erasing does not use, is not reseeded."""
        rk, ws = self.shard
        boxes = _Boxes(x.shape[1:], x.dtype)
        for j in range(len(x)):
            reseed(mix_seed(self.seed, step, 1, j * ws + rk), numpy=False)
            boxes.image = j
            self.erase(boxes)
        if not boxes.writes:
            return
        flat = torch.cat([v.reshape(-1) for _, _, v in boxes.writes])
        if x.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(x.device, non_blocking=True)
        at = 0
        for j, key, v in boxes.writes:
            x[j][key] = flat[at:at + v.numel()].view(v.shape)
            at += v.numel()

    def _mix(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rk, ws = self.shard
        b = len(x)
        reseed(mix_seed(self.seed, step, 2))
        if ws == 1 and b % 2 == 0:
            return self.mix(x, y)
        # timm mixes x[j] with x.flip(0)[j]; with z = [x, P] that is P[b-1-j], the global partner
        xp, yp = (x, y) if ws == 1 else partner_batch(x, y, ws - 1 - rk)
        z, t = self.mix(torch.cat([x, xp]), torch.cat([y, yp]))
        return z[:b], t[:b]


class _Boxes:
    """Stands in for one image (C, H, W) in timm's ``RandomErasing``: records the boxes it writes and their
    values (drawn on the CPU) for ``BatchAugment._erase``."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        self.shape, self.dtype, self.image = shape, dtype, 0
        self.writes: list[tuple[int, tuple, torch.Tensor]] = []

    def size(self) -> torch.Size:
        return self.shape

    def __setitem__(self, key: tuple, value: torch.Tensor) -> None:
        self.writes.append((self.image, key, value))


def partner_batch(x: torch.Tensor, y: torch.Tensor, partner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``partner``'s (x, y) under torchrun (an all-gather; ranks may hold different counts)."""
    import torch.distributed as dist

    from gpusq import distributed as D

    if not D.enabled():
        raise InternalError("BatchAugment with world > 1 needs the torchrun process group")
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(D.world())]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))

    def gather(t: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
        pad[: len(t)] = t
        parts = [torch.empty_like(pad) for _ in range(D.world())]
        dist.all_gather(parts, pad.contiguous())
        return parts[partner][: int(sizes[partner])]

    return gather(x), gather(y)


def batch_augment(cfg: AugmentConfig | None, num_classes: int, seed: int, label_smoothing: float = 0.0,
                  shard: tuple[int, int] = (0, 1)) -> BatchAugment | None:
    """The training loop's batch augmentation for ``cfg``, or None when it has none (erasing, mixing)."""
    if cfg is None or (cfg.re_prob <= 0 and not cfg.mixing):
        return None
    return BatchAugment(cfg, num_classes, seed, label_smoothing, shard)
