"""Your own batches for ``gpusq.compress(teacher, recipe, train=..., val=..., calib=..., out=...)``.

A ``torch.utils.data.DataLoader`` (or any re-iterable with a length, e.g. a list) of ``(inputs,
labels)`` pairs: inputs are what the model takes (float, transformed and normalized by you), labels
class indices. ``UserBatches`` gives such a loader the interface the engine drives
``gpusq.data.Batches`` through — ``len`` (the steps of an epoch), ``epoch`` / ``skip`` (where a
resumed run continues), ``rank`` / ``world`` — and checks every batch, so that a wrong batch is a
one-line ``GpusqError`` naming it, not a shape error deep in a model.

What holds, and what cannot:

* **Re-iterable.** Every epoch, the calibration and the importance measurement iterate again: a
  generator or other one-shot iterator is refused. ``train`` needs a length (the schedule is counted
  in steps).
* **Resume** (``resume=True``) continues at the step it stopped, skipping the batches of the epoch
  already trained on. It is exact when the loader's batches are a function of the epoch: gpusq seeds
  the global RNG from (seed, epoch) when each epoch starts (a ``DataLoader``'s shuffle and worker
  seeds are drawn then) and calls ``set_epoch(epoch)`` on a sampler that has it
  (``DistributedSampler``). A loader with its own ``generator``, or random transforms drawn from
  the global RNG in the main process (``num_workers=0``), resumes with other draws than the
  uninterrupted run would have made. The number of batches must be the interrupted run's.
* **torchrun**: you shard (a ``DistributedSampler`` per rank; its ``drop_last`` or equal shards);
  every rank must see the same number of training batches per epoch (checked). Validation metrics
  are summed over ranks: give each rank its shard, or every rank the whole split.
* The recipe's per-image augmentation (``augment.hflip``, ``auto_augment``, ``color_jitter``) is
  gpusq's image loader's, so it is refused here (your transforms do that); erasing and Mixup /
  CutMix run on the batch and stay. The recipe's ``batch_size`` is not used: the loader's is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpusq import distributed as D
from gpusq.errors import GpusqError

if TYPE_CHECKING:
    from gpusq.recipes import Recipe

PER_IMAGE_AUGMENT = ("hflip", "auto_augment", "color_jitter")  # gpusq's image loader's, not a user loader's


def check_recipe_for_loaders(recipe: Recipe) -> None:
    """A one-line error for a recipe field a user's loader cannot take (the per-image augmentation)."""
    changed = recipe.augment.changed(PER_IMAGE_AUGMENT)
    if changed:
        raise GpusqError(f"augment.{changed[0]} is applied by gpusq's image loader; with train= your loader's "
                         "transforms augment (remove it from the recipe)")


def _describe(src: Any) -> str:
    return type(src).__name__


class UserBatches:
    """``(x, y, 0)`` batches of a user's re-iterable of ``(inputs, labels)``, resumable by epoch/skip."""

    ready = True  # inputs are what the model takes: no gpusq normalization or device augmentation

    def __init__(self, src: Any, what: str, num_classes: int | None, *, seed: int = 0, need_len: bool = True):
        if isinstance(src, (str, Path)):
            raise GpusqError(f"{what}={str(src)!r} is a path; paths go through DataOptions(data=PATH) (or the "
                             f"CLI's --data); {what}= takes a DataLoader or a list of (inputs, labels) batches")
        if not isinstance(src, Iterable):
            raise GpusqError(f"{what}= must be an iterable of (inputs, labels) batches, got {_describe(src)}")
        if isinstance(src, Iterator):
            raise GpusqError(f"{what}= is a one-shot iterator ({_describe(src)}); gpusq iterates it once per epoch "
                             "and again for calibration: pass a re-iterable (a DataLoader, a list of batches)")
        self.src, self.what, self.num_classes, self.seed = src, what, num_classes, seed
        self.rank, self.world = D.rank(), D.world()
        self.epoch = 0
        self.skip = 0
        if need_len:
            try:
                n = len(src)
            except TypeError:
                raise GpusqError(f"{what}= ({_describe(src)}) has no length; the schedule is counted in steps: "
                                 "pass a DataLoader over a map-style dataset or a list of batches") from None
            if n == 0:
                raise GpusqError(f"{what}= has no batches")
            if D.enabled():  # DDP needs every rank in every step
                total, squares = D.sum_floats([float(n), float(n * n)])
                if squares * self.world != total * total:
                    raise GpusqError(f"under torchrun every rank's {what}= must have the same number of batches "
                                     f"(rank {self.rank} has {n}); shard with a DistributedSampler(drop_last=True)")

    def __len__(self) -> int:
        return len(self.src)

    def _seed_epoch(self, epoch: int) -> None:
        for s in (getattr(self.src, "sampler", None), getattr(self.src, "batch_sampler", None)):
            if callable(getattr(s, "set_epoch", None)):
                s.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0
        self._seed_epoch(epoch)
        # the loader's draws at the start of an epoch (shuffle order, worker seeds) come from a seed of
        # the epoch, and so do those of the batches a resumed run skips; the batch it continues with is
        # drawn from the restored global RNG, as in the uninterrupted run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100003 + epoch)
            it = iter(self.src)
            head = list(islice(it, max(skip, 1)))
        i = 0
        if skip == 0:
            for b in head:
                yield self._check(b, i)
                i += 1
        else:
            i = len(head)
        for b in it:
            yield self._check(b, i)
            i += 1

    def _check(self, b: Any, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        where = f"{self.what}= batch {i}"
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            got = f"{len(b)} items" if isinstance(b, (tuple, list)) else _describe(b)
            raise GpusqError(f"{where}: expected a pair (inputs, labels), got {got}")
        x, y = b
        if not torch.is_tensor(x) or not x.is_floating_point():
            got = f"{x.dtype} tensor" if torch.is_tensor(x) else _describe(x)
            raise GpusqError(f"{where}: inputs must be a float tensor (transformed and normalized as the model "
                             f"takes them), got {got}")
        if not torch.is_tensor(y) or y.is_floating_point() or y.ndim != 1 or len(y) != len(x):
            got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if torch.is_tensor(y) else _describe(y)
            raise GpusqError(f"{where}: labels must be {len(x)} class indices (an integer tensor), got {got}")
        if len(y) and self.num_classes is not None:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise GpusqError(f"{where}: label {bad} is outside [0, {self.num_classes - 1}] (the teacher "
                                 f"predicts {self.num_classes} classes)")
        return x, y, 0
