"""The training engine shared by dense training and both GPUSQ stages.

AdamW, linear warmup then cosine decay (per step), gradient clipping, bf16 autocast on GPU,
seeded, tqdm progress with loss/accuracy, step-exact resumable checkpoints written atomically
(one safetensors file: tensors + a JSON state in its metadata; no pickle).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gpusq import distributed as D
from gpusq.checkpoint import atomic_write
from gpusq.data import Batches, prepare_batch
from gpusq.distill import DistillationLoss, FeatureHooks
from gpusq.errors import GpusqError
from gpusq.recipes import StageConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def stage_steps(cfg: StageConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a stage: ``epochs`` over the data, at least ``min_steps`` (0 epochs: none)."""
    if cfg.epochs <= 0:
        return 0
    return max(int(round(cfg.epochs * steps_per_epoch)), cfg.min_steps)


def lr_at(step: int, total: int, warmup: int, cfg: StageConfig) -> float:
    """Linear warmup to ``cfg.lr`` then cosine decay to ``cfg.min_lr``."""
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, desc: str = "eval",
             progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy over ``batches``."""
    was = model.training
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    bad = 0
    for x, y, nb in tqdm(batches, desc=desc, leave=False, disable=not progress):
        bad += nb
        if len(y) == 0:
            continue
        x = prepare_batch(x, device, train=False, flip=False)
        y = y.to(device)
        with autocast(device):
            out = model(x).float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(1).sum())
        n += len(y)
    model.train(was)
    if D.enabled():  # each rank saw its exact share of the split: sums give the global metrics
        n, c1, c5, loss, bad = (type(v)(r) for v, r in zip((n, c1, c5, loss, bad),
                                                          D.sum_floats([n, c1, c5, loss, bad])))
    if n == 0:
        raise GpusqError("evaluation saw no images")
    res = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": n}
    if bad:
        res["skipped_bad_images"] = bad
    return res


# -- checkpoints --------------------------------------------------------------------------------
def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dict/list with tensors → JSON-able structure, tensors moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # tied weights: separate copies
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically, keeping the previous checkpoint as ``PATH.prev`` (fallback if unreadable)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_flatten(state, "s", tensors))
    path = Path(path)
    if path.is_file():
        os.replace(path, prev_path(path))  # a kill right after this leaves .prev: still resumable
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"gpusq_train_state": meta}))


def load_latest_state(path: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint: ``path``, else ``path.prev`` (with a message), else None."""
    path = Path(path)
    if path.is_file():
        st = load_train_state(path)
        if st is not None:
            return st
    prev = prev_path(path)
    if prev.is_file():
        st = load_train_state(prev)
        if st is not None:
            print(f"gpusq: using the previous checkpoint {prev}", flush=True)
            return st
    return None


def load_train_state(path: Path) -> dict[str, Any] | None:
    """The saved state, or None with a message if the file is truncated/corrupt."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {})["gpusq_train_state"]
        tensors = load_file(str(path))
        return _unflatten(json.loads(meta), tensors)
    except Exception as e:  # noqa: BLE001
        print(f"gpusq: checkpoint {path} is unreadable ({type(e).__name__}); ignoring it")
        return None


def rng_state(aug: torch.Generator) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "aug": aug.get_state(),
          "numpy": json.dumps(np.random.get_state()[1].tolist()), "python": json.dumps(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any], aug: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    aug.set_state(st["aug"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class StageResult:
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0


def train_stage(
    name: str,
    student: nn.Module,
    train_batches: Batches,
    cfg: StageConfig,
    device: torch.device,
    *,
    flip: bool | float,
    crop_pad: float = 0.125,
    teacher: nn.Module | None = None,
    loss_fn: DistillationLoss | None = None,
    feature_names: list[str] | None = None,
    ckpt_path: Path | None = None,
    ckpt_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
    ddp_model: nn.Module | None = None,
    compile: bool = False,
    batch_aug: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> StageResult:
    """Train ``student`` for ``stage_steps(cfg, ...)`` steps (``cfg.epochs``, at least ``cfg.min_steps``); with a
    teacher, with the distillation loss.

    ``ckpt_path`` (``ckpt_every`` steps, and every epoch end) makes the stage resumable exactly:
    model, optimizer, step, RNG and sampler position are restored with ``resume``. ``batch_aug``:
    ``x, y = batch_aug(x, y, step)`` on each normalized batch (``gpusq.augment.BatchAugment``:
    random erasing, Mixup / CutMix → soft targets), seeded by the step, so resume stays exact.
    """
    steps_per_epoch = len(train_batches)
    total = stage_steps(cfg, steps_per_epoch)
    result = StageResult()
    if total == 0:
        return result
    if total > round(cfg.epochs * steps_per_epoch) and D.is_main():
        print(f"gpusq: {name}: {cfg.epochs:g} epochs are {round(cfg.epochs * steps_per_epoch)} steps on this data; "
              f"running min_steps={total} ({total / steps_per_epoch:.1f} epochs; set "
              f"train.{name}.min_steps=0 for exactly {cfg.epochs:g})", flush=True)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            fused=device.type == "cuda")
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    aug = torch.Generator().manual_seed(seed + 7)
    step = 0
    acc0 = (0, 0, 0.0)  # running (correct, count, loss sum) of a checkpointed partial epoch
    if resume and ckpt_path is not None:
        st = load_latest_state(ckpt_path)
        if st is not None and st.get("stage") == name:
            student.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            step = int(st["step"])
            set_rng_state(st["rng"], aug)
            result.history = st.get("history", [])
            a = st.get("epoch_acc") or [0, 0, 0.0]
            acc0 = (int(a[0]), int(a[1]), float(a[2]))
            if extra_state is not None:
                extra_state.update(st.get("extra", {}))
            if D.is_main():
                print(f"gpusq: resumed {name} at step {step}/{total}", flush=True)
    if ddp_model is None:
        ddp_model = D.wrap_ddp(student, device)  # None unless launched by torchrun
    run_model = ddp_model or student
    shard = (train_batches.rank, train_batches.world)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    feature_names = feature_names or []
    use_feats = loss_fn is not None and loss_fn.config.gamma > 0 and bool(feature_names)
    hs = FeatureHooks(student, feature_names) if use_feats else None
    ht = FeatureHooks(teacher, feature_names) if (use_feats and teacher is not None) else None

    def save(step_now: int, epoch_acc: tuple = (0, 0, 0.0)) -> None:
        if ckpt_path is None or not D.is_main():  # ranks hold identical state: rank 0 writes
            return
        save_train_state(ckpt_path, {
            "stage": name, "step": step_now, "epoch": step_now // steps_per_epoch,
            "model": student.state_dict(), "optimizer": opt.state_dict(),
            "rng": rng_state(aug), "history": result.history, "extra": extra_state or {},
            "epoch_acc": list(epoch_acc),
        })

    t_model = teacher
    if compile:  # fewer, fused kernels: small ViTs are launch-bound in eager mode
        run_model = torch.compile(run_model)
        t_model = torch.compile(teacher) if teacher is not None else None
    student.train()
    t0 = time.time()
    seen = 0
    bar = tqdm(total=total, initial=step, desc=name, disable=not progress or not D.is_main(), dynamic_ncols=True)
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            train_batches.epoch = epoch
            train_batches.skip = in_epoch
            correct, count, loss_sum = acc0 if in_epoch else (0, 0, 0.0)
            acc0 = (0, 0, 0.0)
            for x, y, _ in train_batches:
                if step >= total:
                    break
                empty = len(y) == 0  # every image of the batch was unreadable (--skip-bad-images)
                if D.enabled():  # DDP needs every rank in every step: skip together
                    empty = not D.all_finite(not empty)
                if empty:
                    step += 1
                    continue
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warmup, cfg)
                x = prepare_batch(x, device, train=True, flip=flip, generator=aug, crop_pad=crop_pad, shard=shard)
                y = y.to(device, non_blocking=True)
                y_hard = y
                if batch_aug is not None:  # erasing, Mixup / CutMix: y may become soft targets
                    x, y = batch_aug(x, y, step)
                with autocast(device):
                    t_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = t_model(x)
                    logits = run_model(x)
                    if loss_fn is not None:
                        loss, _parts = loss_fn(logits, y, t_logits, hs.features if hs else None,
                                               ht.features if ht else None)
                    else:
                        loss = F.cross_entropy(logits.float(), y,  # soft targets: already smoothed
                                               label_smoothing=0.0 if y.is_floating_point() else cfg.label_smoothing)
                if not D.all_finite(bool(torch.isfinite(loss))):  # every rank stops together
                    bad_loss = float(loss.detach()) if not torch.isfinite(loss) else "non-finite on another rank"
                    raise GpusqError(
                        f"{name}: loss became {bad_loss} at step {step}; stopped"
                        + (f", last good checkpoint kept at {ckpt_path}" if ckpt_path and ckpt_path.exists() else "")
                        + " (try a lower learning rate)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad > 0:
                    nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                opt.step()
                step += 1
                seen += len(y)
                correct += int((logits.detach().argmax(1) == y_hard).sum())
                count += len(y)
                loss_sum += float(loss.detach()) * len(y)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{100 * correct / count:.1f}")
                if ckpt_every and step % ckpt_every == 0 and step % steps_per_epoch:
                    save(step, (correct, count, loss_sum))
            if D.enabled():  # epoch statistics over all ranks
                correct, count, loss_sum = D.sum_floats([correct, count, loss_sum])
            if count:
                rec = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / count,
                       "train_top1": 100.0 * correct / count}
                if eval_fn is not None and (step % steps_per_epoch == 0 or step >= total):
                    rec.update({f"val_{k}": v for k, v in eval_fn(student).items() if k in ("top1", "top5")})
                result.history.append(rec)
                if not progress and D.is_main():  # one line per epoch for logs (no progress bar)
                    val = f" val top-1 {rec['val_top1']:.2f}" if "val_top1" in rec else ""
                    print(f"{name} epoch {epoch + 1}/{math.ceil(total / steps_per_epoch)}: loss "
                          f"{rec['train_loss']:.4f} train top-1 {rec['train_top1']:.2f}{val} "
                          f"({seen / max(time.time() - t0, 1e-9):.0f} img/s)", flush=True)
            save(step)
    finally:
        bar.close()
        if hs:
            hs.remove()
        if ht:
            ht.remove()
    result.seconds = time.time() - t0
    result.images_per_s = seen / max(result.seconds, 1e-9)
    return result
