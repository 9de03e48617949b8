"""``gpusq train|compress|eval --task detection|segmentation``: GPUSQ for Mask R-CNN (Swin + FPN),
DETR / Deformable-DETR on COCO-format data and UPerNet-Swin on ADE20K-style folders.

Same two stages as classification (``gpusq.pipeline``):

* stage 1: prune the family's transformer GEMMs to 2:4 (``Task.include``), fine-tune with the model's
  own task losses (the hard losses) + logit KD (``Task.logit_kd``) + feature KD (``Task.features``)
  from the dense teacher;
* stage 2: quantize + calibrate, QAT with the same losses, KD from the stage-1 sparse model, feature
  terms weighted per layer by the stage-1 distortion (``gpusq.distill``).

A model family is a ``Task`` spec (``FAMILIES``); ``task_spec(task, model)`` finds it by model name.
Per-epoch checkpoints (``--resume``) make a killed run continue exactly. Not here: multi-GPU
(torchrun) for ``--task`` runs (classification has it).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq.checkpoint import atomic_write, atomic_write_text, load_compressed, stored_model, write_compressed
from gpusq.classes import check_classes, check_same_classes
from gpusq.distill import FeatureHooks, feature_layers, feature_loss, layer_weights_from_distortion, soft_loss
from gpusq.errors import GpusqError, InternalError, close_matches
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import Recipe, StageConfig
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_
from gpusq.tasks.coco import CocoDetection, coco_folder, collate_list
from gpusq.tasks.metrics import coco_map, detections_to_coco, evaluate_segmentation
from gpusq.tasks.models import (
    DETECTION_FEATURES,
    DETECTION_INCLUDE,
    DETECTION_MODELS,
    SEGMENTATION_FEATURES,
    SEGMENTATION_INCLUDE,
    SEGMENTATION_MODELS,
)
from gpusq.tasks.segdata import SegmentationFolder

TASKS = ("classification", "detection", "segmentation")
CKPT_DIR = ".train"  # per-epoch training checkpoints inside --out, removed when the run ends
TASK_FORMAT = "task-1"


def check_task(task: str) -> str:
    """A dense-prediction task name (classification is dispatched before this module is reached)."""
    if task not in TASKS or task == "classification":
        near = close_matches(task, TASKS)
        raise GpusqError(f"unknown task {task!r}" + (f"; did you mean: {near}?" if near else "")
                         + f" (known: {', '.join(TASKS)})")
    return task


# -- data ------------------------------------------------------------------------------------------
def seg_dir(path: str | Path) -> SegmentationFolder:
    """An ADE20K-style folder: ``images/`` + ``labels/`` (also written by ``gpusq.tasks.mnist_canvas``)."""
    p = Path(path)
    if not p.is_dir():
        raise GpusqError(f"data folder {p} does not exist")
    return SegmentationFolder(p)


def data_classes(ds) -> list[str] | None:
    """The class names of task data in label order: COCO category names (labels 1..K; the background
    is not one), or a segmentation folder's ``classes.txt`` (label 0, the background, included);
    None when the data names none."""
    if isinstance(ds, CocoDetection):
        return [ds.class_names[i] for i in range(1, ds.num_classes)]
    names = getattr(ds, "classes", None)
    return list(names) if names is not None else None


def model_classes(model: nn.Module) -> int | None:
    """How many classes ``model`` predicts, counted as ``data_classes`` counts them."""
    rh = getattr(model, "roi_heads", None)
    if rh is not None:  # torchvision Mask R-CNN: its num_classes includes the background
        return rh.box_predictor.cls_score.out_features - 1
    n = getattr(getattr(model, "config", None), "num_labels", None)  # DETR: K; UPerNet: background included
    return n if isinstance(n, int) else None


def _check_data_classes(ds, val, data: str, val_data: str | None) -> list[str] | None:
    """The class names of ``ds`` (None if it names none); ``val`` must have the same ones."""
    names = data_classes(ds)
    vnames = data_classes(val)
    if val_data and names is not None and vnames is not None:
        check_same_classes(names, vnames, f"--data {data}", f"--val-data {val_data}")
    return names


def pad_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes in one tensor: zero-padded bottom/right, labels padded with 255 (ignored)."""
    h = max(x.shape[1] for x, _ in batch)
    w = max(x.shape[2] for x, _ in batch)
    xs = torch.zeros(len(batch), 3, h, w)
    ys = torch.full((len(batch), h, w), 255, dtype=torch.int64)
    for i, (x, y) in enumerate(batch):
        xs[i, :, : x.shape[1], : x.shape[2]] = x
        ys[i, : y.shape[0], : y.shape[1]] = y
    return xs, ys


@dataclass
class Task:
    """What differs between model families of a task; the GPUSQ stages themselves are shared.

    KD protocol (``train_task``): ``losses(student, batch)`` returns the task (hard) losses; keys
    starting with ``_`` are not losses but what the student computed that logit KD needs (class
    logits, proposals, matched queries). ``teacher_features(teacher, batch)`` runs the teacher on
    the same input (its feature hooks fill) and returns what logit KD needs from it.
    ``logit_kd(teacher, batch, captures, teacher_out, T)`` returns the T^2-scaled KL term.
    """

    name: str  # the task: detection | segmentation
    family: str  # maskrcnn | detr | upernet
    models: dict[str, Callable[..., nn.Module]]  # model name -> builder (random init)
    include: tuple[str, ...]
    features: str
    load_data: Callable[[str], Any]
    collate: Callable
    to_device: Callable
    losses: Callable  # (model in train mode, batch) -> dict of loss tensors (+ "_" captures)
    teacher_features: Callable  # (teacher, batch) -> teacher output for logit KD; fills feature hooks
    evaluate: Callable  # (model, dataset, batch_size, device) -> metrics
    data_info: Callable  # dataset -> dict stored in task.yaml
    check_kwargs: Callable  # (dataset, model kwargs) -> model kwargs
    summary: Callable  # metrics -> one line
    logit_kd: Callable | None = None  # (teacher, batch, captures, teacher_out, T) -> loss tensor
    dense_layers: str = ""  # what stays dense, for the report

    def create(self, name: str, **kwargs: Any) -> nn.Module:
        return self.models[name](**kwargs)


def _det_to(batch, device):
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _maskrcnn_losses(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """torchvision's Mask R-CNN losses, plus (for logit KD) the RoIs its box head classified and the
    class logits it gave them: captured by hooks on ``roi_heads.box_roi_pool`` / ``box_predictor``."""
    cap: dict[str, Any] = {}

    def pre(_m, args):
        cap["_proposals"], cap["_image_shapes"] = [p.detach() for p in args[1]], args[2]

    def post(_m, _args, out):
        cap["_class_logits"] = out[0]

    h1 = model.roi_heads.box_roi_pool.register_forward_pre_hook(pre)
    h2 = model.roi_heads.box_predictor.register_forward_hook(post)
    try:
        losses = model(*batch)
    finally:
        h1.remove()
        h2.remove()
    return {**losses, **cap}


def _maskrcnn_teacher(teacher: nn.Module, batch) -> Any:
    """The teacher's backbone + FPN on the student's exact input (the transform is deterministic)."""
    tensors, _ = teacher.transform(batch[0])
    return teacher.backbone(tensors.tensors)


def _maskrcnn_logit_kd(teacher: nn.Module, batch, cap: dict[str, Any], t_feats: Any, temp: float) -> torch.Tensor:
    """KL between the teacher's and the student's class distributions on the student's sampled RoIs:
    the teacher's box head classifies the same boxes, on its own FPN features."""
    rh = teacher.roi_heads
    with torch.no_grad():
        t_logits = rh.box_predictor(rh.box_head(rh.box_roi_pool(t_feats, cap["_proposals"], cap["_image_shapes"])))[0]
    return soft_loss(cap["_class_logits"], t_logits, temp)


def _det_eval(model: nn.Module, ds: CocoDetection, batch_size: int, device: torch.device) -> dict[str, float]:
    results, ids = [], []
    for images, targets in _loader(MASKRCNN, ds, batch_size, False, 0, drop_last=False):
        images, _ = _det_to((images, targets), device)
        img_ids = [int(t["image_id"]) for t in targets]
        results += detections_to_coco(model(images), img_ids, ds.label_to_cat)
        ids += img_ids
    out = coco_map(ds.coco, results, image_ids=ids)
    out["images"] = len(ids)
    return out


def _det_kwargs(ds: CocoDetection, kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if kw.setdefault("num_classes", ds.num_classes) != ds.num_classes:
        raise GpusqError(f"num_classes={kw['num_classes']} but the data has {ds.num_classes - 1} categories "
                         f"(+ background = {ds.num_classes})")
    return kw


def _seg_losses(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    k = model.config.num_labels
    bad = (y != 255) & ((y < 0) | (y >= k))
    if bool(bad.any()):
        raise GpusqError(f"label value {int(y[bad][0])} is outside [0, {k - 1}] (num_labels={k}; 255 = ignore)")
    out = model(pixel_values=x, labels=y)
    return {"loss_seg": out.loss, "_logits": out.logits}


def _seg_logit_kd(teacher: nn.Module, batch, cap: dict[str, Any], t_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-pixel T^2 KL(teacher || student) over the labelled pixels (padding, label 255, excluded)."""
    s = cap["_logits"].float().permute(0, 2, 3, 1)
    t = t_logits.float().permute(0, 2, 3, 1)
    valid = batch[1] != 255
    return soft_loss(s[valid], t[valid], temp)


def _seg_kwargs(ds: SegmentationFolder, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``num_labels`` defaults to the number of classes the folder's ``classes.txt`` names (if any)."""
    kw = dict(kwargs)
    if ds.classes is not None and kw.setdefault("num_labels", len(ds.classes)) != len(ds.classes):
        raise GpusqError(f"num_labels={kw['num_labels']} but the data names {len(ds.classes)} classes "
                         f"(background included) in its classes.txt")
    return kw


def _seg_eval(model: nn.Module, ds: SegmentationFolder, batch_size: int, device: torch.device) -> dict[str, float]:
    m = evaluate_segmentation(model, ds, model.config.num_labels, 255, device)
    m.pop("iou_per_class")
    return m


MASKRCNN = Task(
    name="detection", family="maskrcnn", models=DETECTION_MODELS, include=DETECTION_INCLUDE,
    features=DETECTION_FEATURES, load_data=coco_folder, collate=collate_list, to_device=_det_to,
    losses=_maskrcnn_losses, teacher_features=_maskrcnn_teacher, evaluate=_det_eval,
    data_info=lambda ds: {"label_to_cat": ds.label_to_cat, "classes": data_classes(ds)}, check_kwargs=_det_kwargs,
    summary=lambda m: f"bbox mAP {m['bbox_map']:.4f}  segm mAP {m['segm_map']:.4f}",
    logit_kd=_maskrcnn_logit_kd,
    dense_layers="everything outside the backbone's transformer blocks (patch embedding, patch merging, "
                 "FPN, RPN and RoI heads)",
)
UPERNET = Task(
    name="segmentation", family="upernet", models=SEGMENTATION_MODELS, include=SEGMENTATION_INCLUDE,
    features=SEGMENTATION_FEATURES, load_data=seg_dir, collate=pad_collate,
    to_device=lambda b, d: (b[0].to(d), b[1].to(d)), losses=_seg_losses,
    teacher_features=lambda t, b: t(pixel_values=b[0]).logits, evaluate=_seg_eval,
    data_info=lambda ds: {"classes": ds.classes} if ds.classes is not None else {},
    check_kwargs=_seg_kwargs, summary=lambda m: f"mIoU {m['miou']:.4f}  pixel acc {m['pixel_acc']:.4f}",
    logit_kd=_seg_logit_kd,
    dense_layers="everything outside the backbone's transformer blocks (patch embedding, patch merging, "
                 "UPerNet decode and auxiliary heads)",
)

def _detr_spec() -> Task:
    """DETR / Deformable-DETR (``gpusq.tasks.detr``): encoder/decoder linears, matched-query logit KD."""
    from gpusq.tasks import detr

    return Task(
        name="detection", family="detr", models=detr.DETR_MODELS, include=detr.DETR_INCLUDE,
        features=detr.DETR_FEATURES, load_data=detr.load_coco, collate=detr.collate, to_device=detr.to_device,
        losses=detr.losses, teacher_features=detr.teacher_features, evaluate=detr.evaluate,
        data_info=lambda ds: {"label_to_cat": ds.label_to_cat, "classes": data_classes(ds)},
        check_kwargs=detr.check_kwargs,
        summary=lambda m: f"bbox mAP {m['bbox_map']:.4f}", logit_kd=detr.logit_kd,
        dense_layers="the ResNet backbone, input projection, query embeddings and the class / box heads",
    )


DETR = _detr_spec()
FAMILIES: list[Task] = [MASKRCNN, UPERNET, DETR]




def task_spec(task: str, model: str) -> Task:
    """The family spec that builds ``model`` for ``task``; one-line error naming the known models."""
    check_task(task)
    specs = [f for f in FAMILIES if f.name == task]
    for f in specs:
        if model in f.models:
            return f
    known = [m for f in specs for m in f.models]
    near = close_matches(model, known)
    raise GpusqError(f"unknown {task} model {model!r}" + (f"; did you mean: {near}?" if near else "")
                     + f" (known: {', '.join(known)})")


def _loader(task: Task, ds, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       collate_fn=task.collate, num_workers=0, drop_last=drop_last)


# -- train / eval ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_task(task: Task, model: nn.Module, ds, batch_size: int = 8,
                  device: torch.device | None = None) -> dict[str, float]:
    """Detection: COCO bbox / segm mAP (pycocotools). Segmentation: mIoU and pixel accuracy."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out = task.evaluate(model, ds, batch_size, device)
    model.train(was)
    return out




def train_task(task: Task, model: nn.Module, ds, cfg: StageConfig, *, seed: int = 0,
               teacher: nn.Module | None = None, feature_names: list[str] | None = None,
               layer_weights: dict[str, float] | None = None, alpha: float = 1.0, beta: float = 0.0,
               gamma: float = 0.0, temperature: float = 1.0, device: torch.device | None = None,
               desc: str = "train", ckpt: Path | None = None, resume: bool = False) -> dict[str, float]:
    """AdamW + cosine over ``cfg.epochs``; loss = alpha * (sum of the model's task losses)
    + beta * logit KD (``task.logit_kd``) + gamma * sum_l w_l * MSE(student layer l, teacher layer l).
    Prints one line per epoch to stderr; returns the last epoch's mean losses.

    ``ckpt``: after every epoch the model, optimizer, schedule, step and RNG states are written there
    atomically (the previous one kept as ``.prev``); with ``resume`` an existing one is loaded and
    training goes on from it exactly (each epoch's shuffle depends only on (seed, epoch))."""
    device = device or next(model.parameters()).device
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":  # TF32 for training only: evaluation stays in the precision `gpusq eval` uses
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        return _train_loop(task, model, ds, cfg, seed=seed, teacher=teacher, feature_names=feature_names,
                           layer_weights=layer_weights, alpha=alpha, beta=beta, gamma=gamma,
                           temperature=temperature, device=device, desc=desc, ckpt=ckpt, resume=resume)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _train_loop(task: Task, model: nn.Module, ds, cfg: StageConfig, *, seed: int, teacher: nn.Module | None,
                feature_names: list[str] | None, layer_weights: dict[str, float] | None, alpha: float, beta: float,
                gamma: float, temperature: float, device: torch.device, desc: str, ckpt: Path | None,
                resume: bool) -> dict[str, float]:
    from gpusq.train import load_latest_state, rng_state, save_train_state, set_rng_state

    loader = _loader(task, ds, cfg.batch_size, True, seed, drop_last=True)
    if len(loader) == 0:
        raise GpusqError(f"{desc}: the data has fewer images ({len(ds)}) than one batch ({cfg.batch_size}); "
                         "use a smaller --batch-size")
    total = max(1, math.ceil(cfg.epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=cfg.min_lr)
    feat_kd = teacher is not None and gamma > 0 and bool(feature_names)
    logit_kd = teacher is not None and beta > 0 and task.logit_kd is not None
    names = (feature_names or []) if feat_kd else []
    weights = layer_weights or {}
    model.train()
    if teacher is not None:
        teacher.eval()
    sums: dict[str, float] = {}
    step, count, epoch, t0 = 0, 0, 0, time.perf_counter()
    dummy = torch.Generator()
    state = load_latest_state(ckpt) if (resume and ckpt is not None) else None
    if state is not None:
        if int(state["total"]) != total:
            raise GpusqError(f"{ckpt} is from a run of {int(state['total'])} steps, this one has {total}: "
                             "same data, batch size and epochs are needed to resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"], dummy)
        step, epoch, count, sums = int(state["step"]), int(state["epoch"]), int(state["count"]), dict(state["sums"])
        print(f"{desc}: resumed at epoch {epoch}, step {step}/{total}", file=sys.stderr, flush=True)
    with FeatureHooks(model, names) as hs, FeatureHooks(teacher or model, names) as ht:
        while step < total:
            sums, count = {}, 0
            loader.generator.manual_seed(seed * 100_003 + epoch)  # shuffle order = f(seed, epoch)
            for batch in loader:
                batch = task.to_device(batch, device)
                out = task.losses(model, batch)
                captures = {k: v for k, v in out.items() if k.startswith("_")}
                losses = {k: v for k, v in out.items() if not k.startswith("_")}
                loss = alpha * sum(losses.values())
                parts = {k: float(v.detach()) for k, v in losses.items()}
                if feat_kd or logit_kd:
                    with torch.no_grad():
                        t_out = task.teacher_features(teacher, batch)
                if feat_kd:
                    feat = sum(weights.get(n, 1.0) * feature_loss(hs.features[n], ht.features[n]) for n in names)
                    loss = loss + gamma * feat
                    parts["feat"] = float(feat.detach())
                if logit_kd:
                    soft = task.logit_kd(teacher, batch, captures, t_out, temperature)
                    loss = loss + beta * soft
                    parts["soft"] = float(soft.detach())
                if not torch.isfinite(loss):
                    raise GpusqError(f"{desc}: the loss became {float(loss)} at step {step}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                opt.step()
                sched.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                step += 1
                if step >= total:
                    break
            epoch += 1
            if ckpt is not None:
                save_train_state(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "rng": rng_state(dummy), "step": step,
                                        "epoch": epoch, "total": total, "count": count, "sums": sums})
            mean = {k: v / max(count, 1) for k, v in sums.items()}
            print(f"{desc}: epoch {epoch}/{math.ceil(cfg.epochs)} step {step}/{total} "
                  + " ".join(f"{k} {v:.4f}" for k, v in mean.items()) + f" ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def _distortion(task: Task, student: nn.Module, teacher: nn.Module, ds, names: list[str], batches: int,
                batch_size: int, device: torch.device) -> dict[str, float]:
    """Stage-1 relative feature distortion per backbone block (as ``gpusq.distill.measure_distortion``)."""
    num, den = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    student.eval()
    teacher.eval()
    with FeatureHooks(student, names) as hs, FeatureHooks(teacher, names) as ht:
        for i, batch in enumerate(_loader(task, ds, batch_size, False, 0, drop_last=False)):
            if i >= batches:
                break
            batch = task.to_device(batch, device)
            task.teacher_features(student, batch)
            task.teacher_features(teacher, batch)
            for n in names:
                s, t = hs.features[n].float(), ht.features[n].float()
                num[n] += float((s - t).pow(2).sum())
                den[n] += float(t.pow(2).sum())
    return {n: num[n] / max(den[n], 1e-12) for n in names}


# -- files -----------------------------------------------------------------------------------------
def _write_task_info(out: Path, info: dict[str, Any]) -> None:
    atomic_write_text(out / "task.yaml", yaml.safe_dump(info, sort_keys=False))


def load_task_dir(path: str | Path, task: str, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Model + task info of a ``gpusq train|compress --task TASK`` output directory."""
    from safetensors.torch import load_file

    d = Path(path)
    info_file = d / "task.yaml"
    if not info_file.is_file():
        raise GpusqError(f"{path} is not a gpusq {task} output directory (no task.yaml)")
    info = yaml.safe_load(info_file.read_text()) or {}
    if info.get("task") != task:
        raise GpusqError(f"{info_file} is for task {info.get('task')!r}, not {task}")
    model = task_spec(task, info["model"]).create(info["model"], **info.get("model_kwargs", {}))
    if info.get("compressed"):
        model, _, _ = load_compressed(d, model=model)
    else:
        f = d / "model.safetensors"
        if not f.is_file():
            raise GpusqError(f"{path} has no model.safetensors")
        missing, unexpected = model.load_state_dict(load_file(str(f)), strict=False)
        if missing or unexpected:
            raise GpusqError(f"{f} does not match {info['model']}: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors")
    model.eval()
    if device is not None:
        model.to(device)
    return model, info




def train_dense_task(task: str, model_name: str, model_kwargs: dict[str, Any], data: str, out: str | Path, *,
                     val_data: str | None = None, cfg: StageConfig | None = None, seed: int = 0,
                     device: torch.device | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a dense model (a teacher) and write ``DIR/model.safetensors`` + ``task.yaml`` + ``report.json``.

    A per-epoch checkpoint lives in ``DIR/.train/`` until the run ends (``resume`` continues from it)."""
    from safetensors.torch import save_file

    t = task_spec(task, model_name)
    device = device or torch.device("cpu")
    ds = t.load_data(data)
    val = t.load_data(val_data) if val_data else ds
    names = _check_data_classes(ds, val, data, val_data)
    kw = t.check_kwargs(ds, model_kwargs)
    torch.manual_seed(seed)
    model = t.create(model_name, **kw).to(device)
    cfg = cfg or StageConfig(epochs=10, lr=1e-3)
    out = Path(out)
    ckdir = out / CKPT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    losses = train_task(t, model, ds, cfg, seed=seed, device=device, desc="train", ckpt=ckdir / "train.safetensors",
                        resume=resume)
    metrics = evaluate_task(t, model, val, cfg.batch_size, device)
    # one copy per key: safetensors refuses tensors that share memory (tied heads, e.g. Deformable-DETR's)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {"gpusq_task": task, **({"classes": json.dumps(names)} if names is not None else {})}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
    _write_task_info(out, {"task": task, "format": TASK_FORMAT, "model": model_name, "model_kwargs": kw,
                           "compressed": False, **t.data_info(ds)})
    report = {"task": task, "model": model_name, "metrics": metrics, "train_losses": losses}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    shutil.rmtree(ckdir, ignore_errors=True)
    return report




def load_teacher(task: str, teacher: str | Path, data: str, model: str | None = None,
                 model_kwargs: dict[str, Any] | None = None,
                 device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any], Task, Any]:
    """The dense teacher: a ``gpusq train --task`` directory, or the user's own weights file
    (``.safetensors`` / ``.pt`` / ``.pth`` state dict) of the model named ``model``.

    Returns (teacher, its task info, its family spec, ``data`` loaded by that family's loader)."""
    from gpusq.models import load_state_file

    p = Path(teacher)
    if p.is_dir():
        m, info = load_task_dir(p, task, device)
        if model and model != info["model"]:
            raise GpusqError(f"--model {model} but the teacher in {p} is a {info['model']}")
        if info.get("compressed"):
            raise GpusqError(f"{teacher} is already compressed; pass the dense teacher")
        t = task_spec(task, info["model"])
        return m, info, t, t.load_data(data)
    if not p.exists():
        raise GpusqError(f"teacher {p} does not exist (a gpusq train --task output directory or a weights file)")
    if not model:
        raise GpusqError(f"teacher {p} is a weights file: name its architecture with --model")
    t = task_spec(task, model)
    data_ds = t.load_data(data)
    kw = t.check_kwargs(data_ds, model_kwargs or {})
    m = t.create(model, **kw)
    state = load_state_file(p)
    own = m.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        first = (shape and f"{shape[0]}: {tuple(state[shape[0]].shape)} vs {tuple(own[shape[0]].shape)}") \
            or (missing + unexpected)[0]
        raise GpusqError(f"{p} does not match {model}{_kw_text(kw)}: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(shape)} of another shape (e.g. {first})")
    m.load_state_dict(state)
    m.eval()
    if device is not None:
        m.to(device)
    info = {"task": task, "format": TASK_FORMAT, "model": model, "model_kwargs": kw, "compressed": False,
            **t.data_info(data_ds)}
    return m, info, t, data_ds


def _kw_text(kw: dict[str, Any]) -> str:
    return f" ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else ""


def compress_task(task: str, teacher_dir: str | Path, recipe: Recipe, data: str, out: str | Path, *,
                  model: str | None = None, model_kwargs: dict[str, Any] | None = None,
                  val_data: str | None = None, batch_size: int | None = None, seed: int = 0,
                  device: torch.device | None = None, resume: bool = False) -> dict[str, Any]:
    """GPUSQ stages 1 and 2 on a dense model of ``task``; writes the compressed model + ``report.json``.

    Per-epoch checkpoints of both stages live in ``out/.train/`` until the run ends; ``resume``
    continues an interrupted run from them (a finished stage is loaded, not retrained).

    ``teacher_dir``: a ``gpusq train --task`` directory, or a weights file of ``model``.
    Stage 1: 2:4 + task losses + feature KD (+ logit KD) from the dense teacher. Stage 2: quantize,
    calibrate, QAT with the same losses from the stage-1 model, feature terms weighted by stage-1 distortion.
    """
    check_task(task)
    device = device or torch.device("cpu")
    teacher, info, t, ds = load_teacher(task, teacher_dir, data, model, model_kwargs, device)
    val = t.load_data(val_data) if val_data else ds
    names = _check_data_classes(ds, val, data, val_data)
    if names is not None:  # a weights-file teacher records no names: its head size is checked
        recorded = info.get("classes") if Path(teacher_dir).is_dir() else None
        check_classes(recorded, model_classes(teacher), names, who="the teacher", data=data)
        info = {**info, "classes": names}
    if "label_to_cat" in info and ds.label_to_cat != {int(k): v for k, v in info["label_to_cat"].items()}:
        raise GpusqError(f"the categories of {data} differ from the teacher's ({teacher_dir})")
    for p in teacher.parameters():
        p.requires_grad_(False)
    c = recipe.distill
    s1, s2 = recipe.train.stage1, recipe.train.stage2
    if batch_size:
        s1 = StageConfig(**{**s1.__dict__, "batch_size": batch_size})
        s2 = StageConfig(**{**s2.__dict__, "batch_size": batch_size})
    teacher_metrics = evaluate_task(t, teacher, val, s1.batch_size, device)
    print(f"teacher: {t.summary(teacher_metrics)}", file=sys.stderr, flush=True)

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    names = feature_layers(student, t.features)
    sel = sparsify_(student, SparsityConfig(pattern=recipe.sparsity.pattern, include=t.include,
                                            exclude=list(recipe.sparsity.exclude)))
    if not sel.selected:
        raise GpusqError(f"no layer of {info['model']} matches the {task} compression patterns")
    kd = dict(alpha=c.alpha, beta=c.beta, gamma=c.gamma, temperature=c.temperature, device=device, resume=resume)
    out = Path(out)
    ckdir = out / CKPT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    stage1 = train_task(t, student, ds, s1, seed=seed, teacher=teacher, feature_names=names, desc="stage 1",
                        ckpt=ckdir / "stage1.safetensors", **kd)
    distortion = _distortion(t, student, teacher, ds, names, recipe.train.calib_batches, s1.batch_size, device)
    weights = layer_weights_from_distortion(distortion, c.layer_weighting)
    stage2: dict[str, float] = {}
    if recipe.quantized:
        sparse_teacher = copy.deepcopy(student).eval()
        for p in sparse_teacher.parameters():
            p.requires_grad_(False)
        quantize_(student, recipe.quant)
        calib = [t.to_device(b, device) for k, b in enumerate(_loader(t, ds, s1.batch_size, False, 0, False))
                 if k < recipe.train.calib_batches]
        calibrate(student, lambda m: [t.teacher_features(m, b) for b in calib])
        stage2 = train_task(t, student, ds, s2, seed=seed + 1, teacher=sparse_teacher, feature_names=names,
                            layer_weights=weights, desc="stage 2", ckpt=ckdir / "stage2.safetensors", **kd)
    student.eval()
    ok = check_2to4(student)
    if recipe.sparse and not all(ok.values()):
        raise InternalError(f"2:4 pattern lost in {[n for n, v in ok.items() if not v]}")
    # metrics of the model as stored (codes + bf16 dense tensors): `gpusq eval` of the output reproduces them
    stored, stored_state, stored_meta = stored_model(student, recipe, info["model"], info["model_kwargs"],
                                                     classes=names)
    metrics = evaluate_task(t, stored, val, s1.batch_size, device)
    write_compressed(stored_state, stored_meta, out, recipe)
    _write_task_info(out, {**info, "compressed": True, "recipe": recipe.name})
    report = {
        "task": task, "model": info["model"], "family": t.family, "recipe": recipe.name,
        "metrics": metrics, "teacher_metrics": teacher_metrics,
        "compressed_layers": sel.selected, "skipped_layers": sel.skipped, "dense_layers": t.dense_layers,
        "distill": {"hard": "the model's task losses", "feature_layers": names,
                    "logit": (LOGIT_KD_DOC.get(t.family, "none") if c.beta > 0 else "off (distill.beta = 0)"),
                    "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "temperature": c.temperature},
        "layer_distortion": distortion, "layer_weights": weights,
        "stage1_losses": stage1, "stage2_losses": stage2, "check_2to4": bool(all(ok.values())),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    shutil.rmtree(ckdir, ignore_errors=True)
    return report


LOGIT_KD_DOC = {
    "maskrcnn": "KL on the RoI box head's class logits, teacher head on the student's sampled RoIs",
    "upernet": "per-pixel KL on the segmentation logits (labelled pixels)",
    "detr": "KL on the class logits of the queries matched to the ground truth",
}
