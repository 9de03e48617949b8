"""The GPUSQ method, written once for every task (classification, Mask R-CNN, UPerNet, DETR).

``compress`` is the stage order, checked::

    dense teacher → stage 1: prune 2:4, KD fine-tune from the dense teacher (hard + logit + feature)
                  → layer importance: each feature layer's stage-1 distortion on a few batches
                  → stage 2: quantize, calibrate, QAT with KD from the stage-1 sparse model, feature
                    terms weighted per layer by the stage-1 distortion
                  → the stored model (codes + bf16 tensors), its metrics, the report.

``train_stage`` is the one training loop (dense teachers and both stages): AdamW, linear warmup
then cosine decay per step, at least ``min_steps`` steps, gradient clipping, bf16 autocast on GPU,
DistributedDataParallel under torchrun, tqdm progress, step-exact resumable checkpoints written
atomically (one safetensors file: tensors + a JSON state in its metadata; no pickle).

What differs between tasks is an ``Adapter`` (``gpusq.pipeline.ClassificationAdapter``,
``gpusq.tasks.pipeline.TaskAdapter``): batch transfer, forward + hard loss, the logit-KD term,
the teacher's forward, evaluation, where its KD features are and how it writes its output. The KD
itself (hooks, terms, per-layer weights, importance measurement) is a ``gpusq.distill.Distiller``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gpusq import distributed as D
from gpusq.checkpoint import atomic_write, atomic_write_text, build_compressed, read_compressed_dir, save_compressed
from gpusq.distill import DistillConfig, Distiller, feature_layers, layer_weights
from gpusq.errors import GpusqError, InternalError
from gpusq.recipes import Recipe, StageConfig
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# -- what a task supplies -----------------------------------------------------------------------
@dataclass
class Step:
    """One forward of the student: its hard loss, what logit KD needs (``captures``), the loss parts
    to log and, for classifiers, how many predictions were right (training accuracy)."""

    loss: torch.Tensor
    captures: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    correct: int | None = None


class Adapter(Protocol):
    """What differs between tasks; the engine does everything else.

    ``batches`` yields raw batches (a ``gpusq.data.Batches``: ``epoch``/``skip`` for exact resume,
    ``rank``/``world`` for torchrun shards); ``prepare`` moves one to the device (augmenting it on the
    device when ``train``: the random draws are made for the global batch, ``shard`` = (rank, world);
    ``step``, the optimizer step, can seed per-step draws so that resume stays exact).
    ``forward(model, run, batch, label_smoothing)``: ``run`` is what to call (``model`` itself, its DDP
    wrapper or its compiled form); hooks go on ``model``. ``teacher_forward`` runs the teacher on the
    same input (feature hooks fill) and returns what ``logit_kd`` needs. ``infer`` is a plain forward
    (calibration, importance). ``features``: the regex of the layers distilled by default.
    """

    task: str
    features: str
    include: tuple[str, ...] | None  # 2:4 layer patterns of the family (None: the recipe's)
    history_keys: tuple[str, ...]  # validation metrics recorded per epoch
    find_unused: bool  # DDP: parameters may get no gradient in a step (detection heads)

    def size(self, batch: Any) -> int: ...

    def prepare(self, batch: Any, device: torch.device, train: bool, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1), step: int = 0) -> Any: ...

    def forward(self, model: nn.Module, run: Callable, batch: Any, label_smoothing: float) -> Step: ...

    def teacher_forward(self, teacher: Callable, batch: Any) -> Any: ...

    def logit_kd(self, teacher: nn.Module, batch: Any, step: Step, t_out: Any, temperature: float) -> torch.Tensor: ...

    def infer(self, model: nn.Module, batch: Any) -> Any: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def check_recipe(self, recipe: Recipe) -> None: ...

    def begin_stage(self, seed: int, cfg: StageConfig) -> None: ...

    def write(self, out: Path, report: dict[str, Any], stored: nn.Module, state: dict[str, torch.Tensor],
              meta: dict[str, str], recipe: Recipe) -> None: ...


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
    history: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0


def train_stage(
    name: str,
    student: nn.Module,
    train_batches: Any,
    cfg: StageConfig,
    device: torch.device,
    *,
    adapter: Adapter,
    distiller: Distiller | None = None,
    ckpt_path: Path | None = None,
    ckpt_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
    compile: bool = False,
) -> StageResult:
    """Train ``student`` for ``stage_steps(cfg, ...)`` steps (``cfg.epochs``, at least ``cfg.min_steps``).

    Loss: the adapter's hard loss; with a ``distiller`` (``task_distiller``: its teacher, layers and
    weights), the distiller's total of it and the logit- and feature-KD terms.
    ``ckpt_path`` (``ckpt_every`` steps, and every epoch end) makes the stage resumable exactly:
    model, optimizer, step, RNG and sampler position are restored with ``resume``.
    """
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise GpusqError(f"{name}: the training data has fewer samples than one batch; use a smaller --batch-size")
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
    adapter.begin_stage(seed, cfg)  # per-stage draws (classification: erasing, Mixup / CutMix)
    step = 0
    acc0: tuple = (0, 0, 0.0, {})  # running (correct, count, loss sum, part sums) of a checkpointed partial epoch
    if resume and ckpt_path is not None:
        st = load_latest_state(ckpt_path)
        if st is not None and st.get("stage") == name:
            student.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            step = int(st["step"])
            set_rng_state(st["rng"], aug)
            result.history = st.get("history", [])
            a = st.get("epoch_acc") or [0, 0, 0.0, {}]
            acc0 = (int(a[0]), int(a[1]), float(a[2]), dict(a[3]) if len(a) > 3 else {})
            if extra_state is not None:
                extra_state.update(st.get("extra", {}))
            if D.is_main():
                print(f"gpusq: resumed {name} at step {step}/{total}", flush=True)
    ddp_model = D.wrap_ddp(student, device, find_unused=adapter.find_unused)  # None unless under torchrun
    run_model = ddp_model or student
    shard = (train_batches.rank, train_batches.world)
    kd = distiller
    teacher = kd.teacher if kd is not None else None

    def save(step_now: int, epoch_acc: tuple = (0, 0, 0.0, {})) -> None:
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
    accuracy = False  # the adapter counts correct predictions (classification)
    bar = tqdm(total=total, initial=step, desc=name, disable=not progress or not D.is_main(), dynamic_ncols=True)
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            train_batches.epoch = epoch
            train_batches.skip = in_epoch
            correct, count, loss_sum, part_sums = acc0 if in_epoch else (0, 0, 0.0, {})
            acc0 = (0, 0, 0.0, {})
            for raw in train_batches:
                if step >= total:
                    break
                n = adapter.size(raw)
                empty = n == 0  # every image of the batch was unreadable (--skip-bad-images)
                if D.enabled():  # DDP needs every rank in every step: skip together
                    empty = not D.all_finite(not empty)
                if empty:
                    step += 1
                    continue
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warmup, cfg)
                batch = adapter.prepare(raw, device, train=True, generator=aug, shard=shard, step=step)
                with autocast(device):
                    t_out = None
                    if kd is not None and kd.needs_teacher:
                        with torch.no_grad():
                            t_out = adapter.teacher_forward(t_model, batch)
                    out = adapter.forward(student, run_model, batch, cfg.label_smoothing)
                    if kd is not None:  # the task's logit KD sees the batch and the step (task_distiller)
                        loss, parts = kd.loss(out.loss, (batch, out), t_out)
                    else:
                        loss, parts = out.loss, {}
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
                seen += n
                if out.correct is not None:
                    accuracy = True
                    correct += out.correct
                count += n
                loss_sum += float(loss.detach()) * n
                for k, v in {**out.parts, **parts}.items():
                    part_sums[k] = part_sums.get(k, 0.0) + float(v.detach()) * n
                bar.update(1)
                post = {"loss": f"{loss_sum / count:.3f}"}
                if accuracy:
                    post["acc"] = f"{100 * correct / count:.1f}"
                bar.set_postfix(post)
                if ckpt_every and step % ckpt_every == 0 and step % steps_per_epoch:
                    save(step, (correct, count, loss_sum, part_sums))
            keys = list(part_sums)
            if D.enabled():  # epoch statistics over all ranks
                correct, count, loss_sum, *vals = D.sum_floats([correct, count, loss_sum, *part_sums.values()])
                part_sums = dict(zip(keys, vals))
            if count:
                rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / count}
                if accuracy:
                    rec["train_top1"] = 100.0 * correct / count
                rec["losses"] = {k: v / count for k, v in part_sums.items()}
                if eval_fn is not None and (step % steps_per_epoch == 0 or step >= total):
                    rec.update({f"val_{k}": v for k, v in eval_fn(student).items() if k in adapter.history_keys})
                result.history.append(rec)
                if not progress and D.is_main():  # one line per epoch for logs (no progress bar)
                    top = f" train top-1 {rec['train_top1']:.2f}" if "train_top1" in rec else ""
                    val = "".join(f" val {k[4:]} {v:.4f}" for k, v in rec.items() if k.startswith("val_"))
                    print(f"{name} epoch {epoch + 1}/{math.ceil(total / steps_per_epoch)}: loss "
                          f"{rec['train_loss']:.4f}{top}{val} "
                          f"({seen / max(time.time() - t0, 1e-9):.0f} img/s)", flush=True)
            save(step)
    finally:
        bar.close()
    # DDP keeps parameters equal; buffers (BatchNorm running statistics) drift apart per rank: rank 0's,
    # the ones it saves, go to every rank, so calibration and evaluation see the model that is written
    D.broadcast_module_(student)
    result.seconds = time.time() - t0
    result.images_per_s = seen / max(result.seconds, 1e-9)
    return result


def task_distiller(adapter: Adapter, student: nn.Module, teacher: nn.Module, config: DistillConfig,
                   layers: list[str], weights: dict[str, float] | None = None) -> Distiller:
    """A ``Distiller`` whose logit-KD term is the task's (``adapter.logit_kd``): ``train_stage`` hands it
    ``(batch, step)`` as the student's output and the teacher's forward as the teacher's."""
    def logit_kd(s: tuple[Any, Step], t_out: Any, temperature: float) -> torch.Tensor | None:
        return adapter.logit_kd(teacher, s[0], s[1], t_out, temperature)

    return Distiller(student, teacher, config, criterion=layers, weights=weights, logit_kd=logit_kd)


def sample_batches(adapter: Adapter, batches: Any, n: int, device: torch.device) -> list[Any]:
    """``n`` un-augmented batches on ``device`` (calibration, layer-importance measurement), in an
    order independent of training's; under torchrun each rank takes its shard of them."""
    out: list[Any] = []
    saved = batches.epoch
    batches.epoch = 10_000
    augmented = getattr(batches, "augment", None)
    if augmented is not None:
        batches.augment = False  # no RandAugment / colour jitter (crops of >= 128 px images stay)
    try:
        for raw in batches:
            if adapter.size(raw):
                out.append(adapter.prepare(raw, device, train=False))
            if len(out) >= n:
                break
    finally:
        batches.epoch = saved
        if augmented is not None:
            batches.augment = augmented
    return out


def _stage_cfg(cfg: StageConfig, batch_size: int | None) -> StageConfig:
    return cfg if batch_size is None else replace(cfg, batch_size=batch_size)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


# -- the method ---------------------------------------------------------------------------------
def compress(adapter: Adapter, teacher: nn.Module, recipe: Recipe, out: Path, train_batches: Any, *,
             device: torch.device, model_name: str | None, model_kwargs: dict, classes: list[str] | None,
             report: dict[str, Any], seed: int = 0, batch_size: int | None = None, resume: bool = False,
             progress: bool = True, ckpt_every: int = 0, ckpt_dir: str = "checkpoints",
             stage1_from: str | Path | None = None, compile: bool = False, epoch_eval: bool = True,
             calib_batches: Any = None) -> dict:
    """GPUSQ stages 1 and 2 on the dense ``teacher`` (already on ``device``, identical on every rank);
    rank 0 writes the output through ``adapter.write``. ``report``: the task's header fields.
    ``calib_batches``: where calibration and importance batches come from (default ``train_batches``).

    ``stage1_from``: reuse the stage-1 result of an earlier run (its ``out/stage1`` directory) and
    go straight to stage 2; a resumed run whose stage 1 had finished does the same with its own.
    ``epoch_eval=False``: no validation pass after every epoch.
    """
    adapter.check_recipe(recipe)
    recipe = replace(recipe, sparsity=sparsity_config(adapter, recipe),
                     distill=feature_pattern(adapter, recipe.distill))
    teacher.eval().requires_grad_(False)
    names = feature_layers(teacher, recipe.distill.features)  # stage-1 damage is measured on these
    feats = names if recipe.distill.gamma > 0 else []  # and distilled when features are weighted in (Distiller)
    ev = adapter.evaluate
    report = {**report, "recipe": recipe.name, "teacher_metrics": ev(teacher)}
    ck = out / ckpt_dir
    ck.mkdir(parents=True, exist_ok=True)
    main = D.is_main()
    calib_src = train_batches if calib_batches is None else calib_batches

    # stage 1: 2:4 prune + KD fine-tune from the dense teacher (features unweighted)
    student = copy.deepcopy(teacher).train()
    student.requires_grad_(True)
    stage1_dir = out / "stage1"
    if stage1_from is None and resume and (stage1_dir / "stage1.json").is_file():
        stage1_from = stage1_dir  # stage 1 finished before the interruption

    def stage1_distiller() -> Distiller:
        """KD from the dense teacher; no importance weights yet (uniform). Built on the sparse student."""
        return task_distiller(adapter, student, teacher, recipe.distill, names)

    def feature_errors(kd: Distiller) -> tuple[dict[str, float], dict[str, float]]:
        """The sparse student's per-layer feature damage (distortion, feature MSE), averaged over ranks."""
        if not names:
            return {}, {}
        imp = sample_batches(adapter, calib_src, recipe.train.importance_batches, device)
        distortion, mse = kd.measure(imp, adapter.infer)
        return D.mean_dict(distortion), D.mean_dict(mse)

    if stage1_from is not None:
        state, s1_info, _r = read_compressed_dir(stage1_from)
        s1_file = Path(stage1_from) / "stage1.json"
        if any(k.endswith((".weight_scale", ".input_scale")) for k in state) or not s1_file.is_file():
            raise GpusqError(f"{stage1_from} is not a stage-1 (sparse, unquantized) output directory")
        if s1_info.get("classes") is not None and classes is not None:
            from gpusq.classes import check_classes

            check_classes(s1_info["classes"], None, classes, who=f"the stage-1 model in {stage1_from}",
                          data=report.get("data"))
        build_compressed(student, state, recipe, source=str(stage1_from))
        student.to(device)
        s1 = json.loads(s1_file.read_text())
        hist1 = s1.get("history", [])
        distortion = s1["distortion"]
        feature_mse = s1.get("feature_mse")
        if feature_mse is None:  # a stage-1 directory written before feature_mse was recorded
            with stage1_distiller() as kd1:
                feature_mse = feature_errors(kd1)[1]
    else:
        if recipe.sparse:
            sel = sparsify_(student, recipe.sparsity)
            report["layers_skipped"] = sel.skipped
            if not sel.selected:
                why = "; ".join(f"{k}: {v}" for k, v in list(sel.skipped.items())[:3])
                raise GpusqError("no layer to compress: the recipe's sparsity.include patterns match no "
                                 "2:4-prunable layer" + (f" (skipped {why})" if why else ""))
            D.broadcast_module_(student)
        with stage1_distiller() as kd1:
            r1 = train_stage("stage1", student, train_batches, _stage_cfg(recipe.train.stage1, batch_size),
                             device, adapter=adapter, distiller=kd1, ckpt_path=ck / "stage1.safetensors",
                             ckpt_every=ckpt_every, resume=resume, seed=seed, eval_fn=ev if epoch_eval else None,
                             progress=progress, compile=compile)
            distortion, feature_mse = feature_errors(kd1)
        hist1 = r1.history
        if main:
            save_compressed(student, stage1_dir, recipe, model_name, model_kwargs, classes=classes,
                            dense_dtype="fp32")  # lossless: stage 2 trains on it
            write_json(stage1_dir / "stage1.json",
                       {"history": hist1, "distortion": distortion, "feature_mse": feature_mse})
        D.barrier()
    report["stage1_metrics"] = ev(student)
    weights = layer_weights(distortion, feature_mse, recipe.distill)  # = Distiller.importance
    report["feature_layers"] = feats
    report["layer_importance"] = recipe.distill.importance if recipe.distill.layer_weighting else "uniform"
    report["layer_distortion"] = distortion
    report["layer_feature_mse"] = feature_mse
    report["layer_weights"] = weights

    # stage 2: sparse-aware QAT, KD from the stage-1 sparse model, features weighted per layer
    hist2: list = []
    if recipe.quantized:
        from gpusq.quant import calibrate, quantize_

        teacher2 = copy.deepcopy(student).eval().requires_grad_(False)
        if not quantize_(student, recipe.quant):
            raise GpusqError("no layer to compress: no GEMM layer of the model can be quantized")
        calib = sample_batches(adapter, calib_src, recipe.train.calib_batches, device)
        calibrate(student, lambda m: [adapter.infer(m, b) for b in calib])
        report["calibrated_metrics"] = ev(student)
        with task_distiller(adapter, student, teacher2, recipe.distill, names, weights) as kd2:
            r2 = train_stage("stage2", student, train_batches, _stage_cfg(recipe.train.stage2, batch_size),
                             device, adapter=adapter, distiller=kd2, ckpt_path=ck / "stage2.safetensors",
                             ckpt_every=ckpt_every, resume=resume, seed=seed + 1,
                             eval_fn=ev if epoch_eval else None, progress=progress, compile=compile)
        hist2 = r2.history
    # the final metrics are the stored model's (codes + bf16 dense tensors): what `gpusq eval` of the
    # output reproduces exactly
    from gpusq.checkpoint import stored_model
    from gpusq.layers import compressed_layers

    stored, stored_state, stored_meta = stored_model(student, recipe, model_name, model_kwargs, classes)
    report["metrics"] = ev(stored)
    report["history"] = {"stage1": hist1, "stage2": hist2}
    ok = check_2to4(student)
    if recipe.sparse and not all(ok.values()):
        raise InternalError(f"2:4 pattern broken in {[n for n, v in ok.items() if not v][:3]} after training")
    report["compressed_layers"] = list(compressed_layers(student))
    report["check_2to4"] = bool(all(ok.values()))
    report["processes"] = D.world()
    if main:
        adapter.write(out, report, stored, stored_state, stored_meta, recipe)
        shutil.rmtree(ck, ignore_errors=True)
    D.barrier()
    return report


def sparsity_config(adapter: Adapter, recipe: Recipe) -> SparsityConfig:
    """The recipe's 2:4 selection; a family with its own patterns uses them unless the recipe names its own."""
    return recipe.sparsity.on_family(adapter.include)


def feature_pattern(adapter: Adapter, config: DistillConfig) -> DistillConfig:
    """The recipe's KD feature layers; a family with its own layers uses them unless the recipe names its own."""
    from gpusq.distill import DEFAULT_FEATURE_PATTERN

    if config.features == DEFAULT_FEATURE_PATTERN and adapter.features != DEFAULT_FEATURE_PATTERN:
        return replace(config, features=adapter.features)
    return config


def device_of(arg: str | None) -> torch.device:
    """The device of a run: under torchrun, this rank's (joining the process group); else ``arg``,
    default CUDA when available."""
    dev = D.init_from_env(arg)
    if dev is not None:
        return dev
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
