"""``gpusq train|compress|eval --task detection|segmentation``: GPUSQ for Mask R-CNN (Swin + FPN)
on COCO-format data and UPerNet-Swin on ADE20K-style folders.

Same two stages as classification (``gpusq.pipeline``):

* stage 1: prune the backbone's transformer GEMMs to 2:4 (``DETECTION_INCLUDE`` /
  ``SEGMENTATION_INCLUDE``), fine-tune with the model's own task losses (the hard losses) + feature
  KD on the backbone block outputs from the dense teacher;
* stage 2: quantize + calibrate, QAT with the same losses, KD from the stage-1 sparse model, feature
  terms weighted per block by the stage-1 distortion (``gpusq.distill``).

Not done yet (issue 6): logit KD on the class predictions (``distill.beta`` is not used here),
resume, multi-GPU, DETR / Deformable-DETR.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq.checkpoint import atomic_write, atomic_write_text, load_compressed, save_compressed
from gpusq.distill import FeatureHooks, feature_layers, feature_loss, layer_weights_from_distortion
from gpusq.errors import GpusqError, close_matches
from gpusq.models import parse_model_kwargs
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import Recipe, StageConfig, _merge, load_recipe, parse_override
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_
from gpusq.tasks.coco import CocoDetection, collate_list
from gpusq.tasks.metrics import coco_map, detections_to_coco, evaluate_segmentation
from gpusq.tasks.models import (
    DETECTION_FEATURES,
    DETECTION_INCLUDE,
    SEGMENTATION_FEATURES,
    SEGMENTATION_INCLUDE,
    create_detection_model,
    create_segmentation_model,
)
from gpusq.tasks.segdata import SegmentationFolder

TASKS = ("classification", "detection", "segmentation")
TASK_FORMAT = "task-1"


def check_task(task: str) -> str:
    """A dense-prediction task name (classification is dispatched before this module is reached)."""
    if task not in TASKS or task == "classification":
        near = close_matches(task, TASKS)
        raise GpusqError(f"unknown task {task!r}" + (f"; did you mean: {near}?" if near else "")
                         + f" (known: {', '.join(TASKS)})")
    return task


# -- data ------------------------------------------------------------------------------------------
def coco_dir(path: str | Path) -> CocoDetection:
    """A COCO-format folder: ``instances.json`` + ``images/`` (what ``gpusq.tasks.mnist_canvas`` writes)."""
    p = Path(path)
    if not p.exists():
        raise GpusqError(f"data folder {p} does not exist")
    if p.is_file():
        return CocoDetection(p)
    return CocoDetection(p / "instances.json", p / "images")


def seg_dir(path: str | Path) -> SegmentationFolder:
    """An ADE20K-style folder: ``images/`` + ``labels/`` (also written by ``gpusq.tasks.mnist_canvas``)."""
    p = Path(path)
    if not p.is_dir():
        raise GpusqError(f"data folder {p} does not exist")
    return SegmentationFolder(p)


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
    """What differs between tasks; the GPUSQ stages themselves are shared."""

    name: str
    include: tuple[str, ...]
    features: str
    create: Callable[..., nn.Module]
    load_data: Callable[[str], Any]
    collate: Callable
    to_device: Callable
    losses: Callable  # (model in train mode, batch) -> dict of loss tensors
    teacher_features: Callable  # (teacher, batch) -> None; fills the teacher's feature hooks
    evaluate: Callable  # (model, dataset, batch_size, device) -> metrics
    data_info: Callable  # dataset -> dict stored in task.yaml
    check_kwargs: Callable  # (dataset, model kwargs) -> model kwargs
    summary: Callable  # metrics -> one line


def _det_to(batch, device):
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _det_teacher(teacher: nn.Module, batch) -> None:
    """Run the teacher's backbone on the student's exact input (its transform is deterministic)."""
    tensors, _ = teacher.transform(batch[0])
    teacher.backbone(tensors.tensors)


def _det_eval(model: nn.Module, ds: CocoDetection, batch_size: int, device: torch.device) -> dict[str, float]:
    results, ids = [], []
    for images, targets in _loader(DETECTION, ds, batch_size, False, 0, drop_last=False):
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
    return {"loss_seg": model(pixel_values=x, labels=y).loss}


def _seg_eval(model: nn.Module, ds: SegmentationFolder, batch_size: int, device: torch.device) -> dict[str, float]:
    m = evaluate_segmentation(model, ds, model.config.num_labels, 255, device)
    m.pop("iou_per_class")
    return m


DETECTION = Task(
    name="detection", include=DETECTION_INCLUDE, features=DETECTION_FEATURES, create=create_detection_model,
    load_data=coco_dir, collate=collate_list, to_device=_det_to,
    losses=lambda m, b: m(*b), teacher_features=_det_teacher, evaluate=_det_eval,
    data_info=lambda ds: {"label_to_cat": ds.label_to_cat}, check_kwargs=_det_kwargs,
    summary=lambda m: f"bbox mAP {m['bbox_map']:.4f}  segm mAP {m['segm_map']:.4f}",
)
SEGMENTATION = Task(
    name="segmentation", include=SEGMENTATION_INCLUDE, features=SEGMENTATION_FEATURES,
    create=create_segmentation_model, load_data=seg_dir, collate=pad_collate,
    to_device=lambda b, d: (b[0].to(d), b[1].to(d)), losses=_seg_losses,
    teacher_features=lambda t, b: t(pixel_values=b[0]), evaluate=_seg_eval, data_info=lambda ds: {},
    check_kwargs=lambda ds, kw: dict(kw),
    summary=lambda m: f"mIoU {m['miou']:.4f}  pixel acc {m['pixel_acc']:.4f}",
)
TASK_SPECS = {"detection": DETECTION, "segmentation": SEGMENTATION}


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


def evaluate_detection(model: nn.Module, ds: CocoDetection, batch_size: int = 8,
                       device: torch.device | None = None) -> dict[str, float]:
    return evaluate_task(DETECTION, model, ds, batch_size, device)


def train_task(task: Task, model: nn.Module, ds, cfg: StageConfig, *, seed: int = 0,
               teacher: nn.Module | None = None, feature_names: list[str] | None = None,
               layer_weights: dict[str, float] | None = None, alpha: float = 1.0, gamma: float = 0.0,
               device: torch.device | None = None, desc: str = "train") -> dict[str, float]:
    """AdamW + cosine over ``cfg.epochs``; loss = alpha * (sum of the model's task losses)
    + gamma * sum_l w_l * MSE(student block l, teacher block l). Returns the last epoch's mean losses."""
    device = device or next(model.parameters()).device
    loader = _loader(task, ds, cfg.batch_size, True, seed, drop_last=True)
    if len(loader) == 0:
        raise GpusqError(f"{desc}: the data has fewer images ({len(ds)}) than one batch ({cfg.batch_size}); "
                         "use a smaller --batch-size")
    total = max(1, math.ceil(cfg.epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=cfg.min_lr)
    kd = teacher is not None and gamma > 0 and bool(feature_names)
    names = feature_names or []
    weights = layer_weights or {}
    model.train()
    if teacher is not None:
        teacher.eval()
    sums: dict[str, float] = {}
    step, count = 0, 0
    with FeatureHooks(model, names if kd else []) as hs, FeatureHooks(teacher or model, names if kd else []) as ht:
        while step < total:
            sums, count = {}, 0
            for batch in loader:
                batch = task.to_device(batch, device)
                losses = task.losses(model, batch)
                loss = alpha * sum(losses.values())
                parts = {k: float(v.detach()) for k, v in losses.items()}
                if kd:
                    with torch.no_grad():
                        task.teacher_features(teacher, batch)
                    feat = sum(weights.get(n, 1.0) * feature_loss(hs.features[n], ht.features[n]) for n in names)
                    loss = loss + gamma * feat
                    parts["feat"] = float(feat.detach())
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
    model = TASK_SPECS[task].create(info["model"], **info.get("model_kwargs", {}))
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


def load_detection_dir(path: str | Path, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    return load_task_dir(path, "detection", device)


def train_dense_task(task: str, model_name: str, model_kwargs: dict[str, Any], data: str, out: str | Path, *,
                     val_data: str | None = None, cfg: StageConfig | None = None, seed: int = 0,
                     device: torch.device | None = None) -> dict[str, Any]:
    """Train a dense model (a teacher) and write ``DIR/model.safetensors`` + ``task.yaml`` + ``report.json``."""
    from safetensors.torch import save_file

    t = TASK_SPECS[task]
    device = device or torch.device("cpu")
    ds = t.load_data(data)
    val = t.load_data(val_data) if val_data else ds
    kw = t.check_kwargs(ds, model_kwargs)
    torch.manual_seed(seed)
    model = t.create(model_name, **kw).to(device)
    cfg = cfg or StageConfig(epochs=10, lr=1e-3)
    losses = train_task(t, model, ds, cfg, seed=seed, device=device, desc="train")
    metrics = evaluate_task(t, model, val, cfg.batch_size, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"gpusq_task": task}))
    _write_task_info(out, {"task": task, "format": TASK_FORMAT, "model": model_name, "model_kwargs": kw,
                           "compressed": False, **t.data_info(ds)})
    report = {"task": task, "model": model_name, "metrics": metrics, "train_losses": losses}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def train_dense_detection(model_name: str, model_kwargs: dict[str, Any], data: str, out: str | Path,
                          **kw: Any) -> dict[str, Any]:
    return train_dense_task("detection", model_name, model_kwargs, data, out, **kw)


def compress_task(task: str, teacher_dir: str | Path, recipe: Recipe, data: str, out: str | Path, *,
                  val_data: str | None = None, batch_size: int | None = None, seed: int = 0,
                  device: torch.device | None = None) -> dict[str, Any]:
    """GPUSQ stages 1 and 2 on a dense model of ``task``; writes the compressed model + ``report.json``."""
    t = TASK_SPECS[task]
    device = device or torch.device("cpu")
    teacher, info = load_task_dir(teacher_dir, task, device)
    if info.get("compressed"):
        raise GpusqError(f"{teacher_dir} is already compressed; pass the dense teacher")
    ds = t.load_data(data)
    val = t.load_data(val_data) if val_data else ds
    if task == "detection" and ds.label_to_cat != {int(k): v for k, v in info["label_to_cat"].items()}:
        raise GpusqError(f"the categories of {data} differ from the teacher's ({teacher_dir})")
    for p in teacher.parameters():
        p.requires_grad_(False)
    c = recipe.distill
    s1, s2 = recipe.train.stage1, recipe.train.stage2
    if batch_size:
        s1 = StageConfig(**{**s1.__dict__, "batch_size": batch_size})
        s2 = StageConfig(**{**s2.__dict__, "batch_size": batch_size})
    teacher_metrics = evaluate_task(t, teacher, val, s1.batch_size, device)

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    names = feature_layers(student, t.features)
    sel = sparsify_(student, SparsityConfig(pattern=recipe.sparsity.pattern, include=t.include,
                                            exclude=list(recipe.sparsity.exclude)))
    if not sel.selected:
        raise GpusqError(f"no layer of {info['model']} matches the {task} compression patterns")
    torch.manual_seed(seed)
    stage1 = train_task(t, student, ds, s1, seed=seed, teacher=teacher, feature_names=names, alpha=c.alpha,
                        gamma=c.gamma, device=device, desc="stage 1")
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
                            layer_weights=weights, alpha=c.alpha, gamma=c.gamma, device=device, desc="stage 2")
    student.eval()
    metrics = evaluate_task(t, student, val, s1.batch_size, device)
    ok = check_2to4(student)
    if recipe.sparse and not all(ok.values()):
        raise RuntimeError(f"2:4 pattern lost in {[n for n, v in ok.items() if not v]}")  # a bug, not user input
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_compressed(student, out, recipe, info["model"], info["model_kwargs"])
    _write_task_info(out, {**info, "compressed": True, "recipe": recipe.name})
    report = {
        "task": task, "model": info["model"], "recipe": recipe.name,
        "metrics": metrics, "teacher_metrics": teacher_metrics,
        "compressed_layers": sel.selected, "skipped_layers": sel.skipped,
        "dense_layers": "everything outside the backbone's transformer blocks (patch embedding, patch merging, "
                        + ("FPN, RPN and RoI heads)" if task == "detection" else "UPerNet decode and auxiliary heads)"),
        "distill": {"hard": "the model's task losses", "feature_layers": names,
                    "logit": "not implemented yet (distill.beta unused)"},
        "layer_distortion": distortion, "layer_weights": weights,
        "stage1_losses": stage1, "stage2_losses": stage2, "check_2to4": bool(all(ok.values())),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def compress_detection(teacher_dir: str | Path, recipe: Recipe, data: str, out: str | Path, **kw: Any) -> dict:
    return compress_task("detection", teacher_dir, recipe, data, out, **kw)


# -- CLI -------------------------------------------------------------------------------------------
def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--task", required=True, help="detection | segmentation")
    ap.add_argument("--data", required=True, help="detection: COCO-format folder (instances.json + images/); "
                    "segmentation: images/ + labels/ folder")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")


def cli_main(argv: list[str], prog: str, command: str) -> int:
    """``gpusq train|compress|eval --task detection|segmentation ...`` (dispatched by ``gpusq.pipeline``)."""
    ap = argparse.ArgumentParser(prog=prog)
    _common(ap)
    if command == "train":
        ap.add_argument("--model", required=True,
                        help="detection: maskrcnn_swin_t | maskrcnn_swin_test; "
                             "segmentation: upernet_swin_t | upernet_swin_test")
        ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
        ap.add_argument("--val-data", default=None)
        ap.add_argument("--epochs", type=float, default=10)
        ap.add_argument("--lr", type=float, default=1e-3)
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv)
        t = TASK_SPECS[check_task(a.task)]
        cfg = StageConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size or 8, min_lr=a.lr * 0.01)
        rep = train_dense_task(t.name, a.model, parse_model_kwargs(a.model_arg), a.data, a.out, val_data=a.val_data,
                               cfg=cfg, seed=a.seed, device=_device(a))
        print(json.dumps({"metrics": rep["metrics"]}) if a.json
              else f"{t.summary(rep['metrics'])}; dense {t.name} model written to {a.out}")
        return 0
    if command == "compress":
        ap.add_argument("--teacher", required=True, help="a gpusq train --task TASK output dir")
        ap.add_argument("--val-data", default=None)
        ap.add_argument("--recipe", default="int8")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv)
        t = TASK_SPECS[check_task(a.task)]
        overrides: dict = {}
        for s in a.set:
            overrides = _merge(overrides, parse_override(s))
        recipe = load_recipe(a.recipe, overrides)
        rep = compress_task(t.name, a.teacher, recipe, a.data, a.out, val_data=a.val_data, batch_size=a.batch_size,
                            seed=a.seed, device=_device(a))
        if a.json:
            print(json.dumps({k: rep[k] for k in ("metrics", "teacher_metrics", "compressed_layers")}))
        else:
            print(f"teacher {t.summary(rep['teacher_metrics'])}  →  {recipe.name} {t.summary(rep['metrics'])}; "
                  f"{len(rep['compressed_layers'])} backbone layers compressed; written to {a.out}")
        return 0
    if command == "eval":
        ap.add_argument("--checkpoint", required=True)
        a = ap.parse_args(argv)
        t = TASK_SPECS[check_task(a.task)]
        model, _ = load_task_dir(a.checkpoint, t.name, _device(a))
        m = evaluate_task(t, model, t.load_data(a.data), a.batch_size or 8)
        print(json.dumps(m) if a.json else f"{t.summary(m)}  ({m['images']} images)", file=sys.stdout)
        return 0
    raise GpusqError(f"--task is not supported by gpusq {command}")


def _device(a) -> torch.device:
    return torch.device(a.device) if a.device else torch.device("cpu")


def split_task_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--task NAME`` / ``--task=NAME`` out of ``argv``: (NAME or None, the other arguments)."""
    rest: list[str] = []
    task = None
    it = iter(argv)
    for arg in it:
        if arg == "--task":
            task = next(it, None)
            if task is None:
                raise GpusqError(f"--task needs a value ({', '.join(TASKS)})")
        elif arg.startswith("--task="):
            task = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return task, rest
