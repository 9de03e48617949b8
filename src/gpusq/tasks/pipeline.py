"""``gpusq train|compress|eval --task detection``: the GPUSQ pipeline for Mask R-CNN (Swin + FPN).

Same two stages as classification (``gpusq.pipeline``), on COCO-format data:

* stage 1: prune the backbone's transformer GEMMs to 2:4 (``DETECTION_INCLUDE``), fine-tune with
  the detector's own losses (the hard losses) + feature KD on the backbone block outputs from the
  dense teacher;
* stage 2: quantize + calibrate, QAT with the same losses, KD from the stage-1 sparse model, feature
  terms weighted per block by the stage-1 distortion (``gpusq.distill``).

Not done yet (issue 6): logit KD on the class predictions (``distill.beta`` is not used here),
resume, multi-GPU, and the segmentation / DETR tasks on the CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
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
from gpusq.tasks.metrics import coco_map, detections_to_coco
from gpusq.tasks.models import DETECTION_FEATURES, DETECTION_INCLUDE, create_detection_model

TASKS = ("classification", "detection", "segmentation")
TASK_FORMAT = "task-1"


def check_task(task: str) -> str:
    if task not in TASKS:
        near = close_matches(task, TASKS)
        raise GpusqError(f"unknown task {task!r}" + (f"; did you mean: {near}?" if near else "")
                         + f" (known: {', '.join(TASKS)})")
    if task == "segmentation":
        raise GpusqError("--task segmentation is not available from the CLI yet (issue 6 in progress); "
                         "build UPerNet-Swin with gpusq.tasks.models.create_segmentation_model")
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


def _loader(ds: CocoDetection, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       collate_fn=collate_list, num_workers=0, drop_last=False)


def _to(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


# -- train / eval ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_detection(model: nn.Module, ds: CocoDetection, batch_size: int = 8,
                       device: torch.device | None = None) -> dict[str, float]:
    """COCO bbox / segm mAP of ``model`` on ``ds`` (pycocotools)."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    results, ids = [], []
    for images, targets in _loader(ds, batch_size, False, 0):
        images, _ = _to(images, targets, device)
        img_ids = [int(t["image_id"]) for t in targets]
        results += detections_to_coco(model(images), img_ids, ds.label_to_cat)
        ids += img_ids
    model.train(was)
    out = coco_map(ds.coco, results, image_ids=ids)
    out["images"] = len(ids)
    return out


def _teacher_features(teacher: nn.Module, images: list[torch.Tensor]) -> None:
    """Run the teacher's backbone on the student's exact input (its transform is deterministic)."""
    batch, _ = teacher.transform(images)
    teacher.backbone(batch.tensors)


def train_detector(model: nn.Module, ds: CocoDetection, cfg: StageConfig, *, seed: int = 0,
                   teacher: nn.Module | None = None, feature_names: list[str] | None = None,
                   layer_weights: dict[str, float] | None = None, alpha: float = 1.0, gamma: float = 0.0,
                   device: torch.device | None = None, desc: str = "train") -> dict[str, float]:
    """AdamW + cosine over ``cfg.epochs``; loss = alpha * (sum of the detector's losses)
    + gamma * sum_l w_l * MSE(student block l, teacher block l). Returns the last epoch's mean losses."""
    device = device or next(model.parameters()).device
    loader = _loader(ds, cfg.batch_size, True, seed)
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
            for images, targets in loader:
                images, targets = _to(images, targets, device)
                losses = model(images, targets)
                loss = alpha * sum(losses.values())
                parts = {k: float(v.detach()) for k, v in losses.items()}
                if kd:
                    with torch.no_grad():
                        _teacher_features(teacher, images)
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
def _distortion(student: nn.Module, teacher: nn.Module, ds: CocoDetection, names: list[str], batches: int,
                batch_size: int, device: torch.device) -> dict[str, float]:
    """Stage-1 relative feature distortion per backbone block (as ``gpusq.distill.measure_distortion``)."""
    num, den = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    student.eval()
    teacher.eval()
    with FeatureHooks(student, names) as hs, FeatureHooks(teacher, names) as ht:
        for i, (images, targets) in enumerate(_loader(ds, batch_size, False, 0)):
            if i >= batches:
                break
            images, _ = _to(images, targets, device)
            _teacher_features(student, images)
            _teacher_features(teacher, images)
            for n in names:
                s, t = hs.features[n].float(), ht.features[n].float()
                num[n] += float((s - t).pow(2).sum())
                den[n] += float(t.pow(2).sum())
    return {n: num[n] / max(den[n], 1e-12) for n in names}


# -- files -----------------------------------------------------------------------------------------
def _write_task_info(out: Path, info: dict[str, Any]) -> None:
    atomic_write_text(out / "task.yaml", yaml.safe_dump(info, sort_keys=False))


def load_detection_dir(path: str | Path, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Model + task info of a ``gpusq train|compress --task detection`` output directory."""
    from safetensors.torch import load_file

    d = Path(path)
    info_file = d / "task.yaml"
    if not info_file.is_file():
        raise GpusqError(f"{path} is not a gpusq detection output directory (no task.yaml)")
    info = yaml.safe_load(info_file.read_text()) or {}
    if info.get("task") != "detection":
        raise GpusqError(f"{info_file} is for task {info.get('task')!r}, not detection")
    model = create_detection_model(info["model"], **info.get("model_kwargs", {}))
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


def _model_kwargs(ds: CocoDetection, kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if kw.setdefault("num_classes", ds.num_classes) != ds.num_classes:
        raise GpusqError(f"num_classes={kw['num_classes']} but the data has {ds.num_classes - 1} categories "
                         f"(+ background = {ds.num_classes})")
    return kw


def train_dense_detection(model_name: str, model_kwargs: dict[str, Any], data: str, out: str | Path, *,
                          val_data: str | None = None, cfg: StageConfig | None = None, seed: int = 0,
                          device: torch.device | None = None) -> dict[str, Any]:
    """Train a dense detector (a teacher) and write ``DIR/model.safetensors`` + ``task.yaml`` + ``report.json``."""
    from safetensors.torch import save_file

    device = device or torch.device("cpu")
    ds = coco_dir(data)
    val = coco_dir(val_data) if val_data else ds
    kw = _model_kwargs(ds, model_kwargs)
    torch.manual_seed(seed)
    model = create_detection_model(model_name, **kw).to(device)
    cfg = cfg or StageConfig(epochs=10, lr=1e-3)
    losses = train_detector(model, ds, cfg, seed=seed, device=device, desc="train")
    metrics = evaluate_detection(model, val, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"gpusq_task": "detection"}))
    _write_task_info(out, {"task": "detection", "format": TASK_FORMAT, "model": model_name, "model_kwargs": kw,
                           "compressed": False, "label_to_cat": ds.label_to_cat})
    report = {"task": "detection", "model": model_name, "metrics": metrics, "train_losses": losses}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


def compress_detection(teacher_dir: str | Path, recipe: Recipe, data: str, out: str | Path, *,
                       val_data: str | None = None, batch_size: int | None = None, seed: int = 0,
                       device: torch.device | None = None) -> dict[str, Any]:
    """GPUSQ stages 1 and 2 on a dense detector; writes the compressed model + ``report.json``."""
    device = device or torch.device("cpu")
    teacher, info = load_detection_dir(teacher_dir, device)
    if info.get("compressed"):
        raise GpusqError(f"{teacher_dir} is already compressed; pass the dense teacher")
    ds = coco_dir(data)
    val = coco_dir(val_data) if val_data else ds
    if ds.label_to_cat != {int(k): v for k, v in info["label_to_cat"].items()}:
        raise GpusqError(f"the categories of {data} differ from the teacher's ({teacher_dir})")
    for p in teacher.parameters():
        p.requires_grad_(False)
    c = recipe.distill
    s1, s2 = recipe.train.stage1, recipe.train.stage2
    if batch_size:
        s1 = StageConfig(**{**s1.__dict__, "batch_size": batch_size})
        s2 = StageConfig(**{**s2.__dict__, "batch_size": batch_size})
    teacher_metrics = evaluate_detection(teacher, val, device=device)

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    names = feature_layers(student, DETECTION_FEATURES)
    sel = sparsify_(student, SparsityConfig(pattern=recipe.sparsity.pattern, include=DETECTION_INCLUDE,
                                            exclude=list(recipe.sparsity.exclude)))
    torch.manual_seed(seed)
    stage1 = train_detector(student, ds, s1, seed=seed, teacher=teacher, feature_names=names, alpha=c.alpha,
                            gamma=c.gamma, device=device, desc="stage 1")
    distortion = _distortion(student, teacher, ds, names, recipe.train.calib_batches, s1.batch_size, device)
    weights = layer_weights_from_distortion(distortion, c.layer_weighting)
    stage2: dict[str, float] = {}
    if recipe.quantized:
        sparse_teacher = copy.deepcopy(student).eval()
        for p in sparse_teacher.parameters():
            p.requires_grad_(False)
        quantize_(student, recipe.quant)
        calib = [_to(i, t, device)[0] for k, (i, t) in enumerate(_loader(ds, s1.batch_size, False, 0))
                 if k < recipe.train.calib_batches]
        calibrate(student, lambda m: [m(x) for x in calib])
        stage2 = train_detector(student, ds, s2, seed=seed + 1, teacher=sparse_teacher, feature_names=names,
                                layer_weights=weights, alpha=c.alpha, gamma=c.gamma, device=device, desc="stage 2")
    student.eval()
    metrics = evaluate_detection(student, val, device=device)
    ok = check_2to4(student)
    if recipe.sparse and not all(ok.values()):
        raise RuntimeError(f"2:4 pattern lost in {[n for n, v in ok.items() if not v]}")  # a bug, not user input
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_compressed(student, out, recipe, info["model"], info["model_kwargs"])
    _write_task_info(out, {**info, "compressed": True, "recipe": recipe.name})
    report = {
        "task": "detection", "model": info["model"], "recipe": recipe.name,
        "metrics": metrics, "teacher_metrics": teacher_metrics,
        "compressed_layers": sel.selected, "skipped_layers": sel.skipped,
        "dense_layers": "everything else: patch embedding, patch merging, FPN, RPN and RoI heads",
        "distill": {"hard": "detector losses (classifier, box, mask, objectness, rpn box)",
                    "feature_layers": names, "logit": "not implemented yet (distill.beta unused)"},
        "layer_distortion": distortion, "layer_weights": weights,
        "stage1_losses": stage1, "stage2_losses": stage2, "check_2to4": bool(all(ok.values())),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return report


# -- CLI -------------------------------------------------------------------------------------------
def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--task", required=True)
    ap.add_argument("--data", required=True, help="COCO-format folder (instances.json + images/)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")


def _fmt(m: dict) -> str:
    return f"bbox mAP {m['bbox_map']:.4f}  segm mAP {m['segm_map']:.4f}"


def cli_main(argv: list[str], prog: str, command: str) -> int:
    """``gpusq train|compress|eval --task detection ...`` (dispatched here by ``gpusq.pipeline``)."""
    ap = argparse.ArgumentParser(prog=prog)
    _common(ap)
    if command == "train":
        ap.add_argument("--model", required=True, help="maskrcnn_swin_t | maskrcnn_swin_test")
        ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
        ap.add_argument("--val-data", default=None)
        ap.add_argument("--epochs", type=float, default=10)
        ap.add_argument("--lr", type=float, default=1e-3)
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv)
        check_task(a.task)
        cfg = StageConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size or 8, min_lr=a.lr * 0.01)
        rep = train_dense_detection(a.model, parse_model_kwargs(a.model_arg), a.data, a.out, val_data=a.val_data,
                                    cfg=cfg, seed=a.seed, device=_device(a))
        print(json.dumps({"metrics": rep["metrics"]}) if a.json
              else f"{_fmt(rep['metrics'])}; dense detector written to {a.out}")
        return 0
    if command == "compress":
        ap.add_argument("--teacher", required=True, help="a gpusq train --task detection output dir")
        ap.add_argument("--val-data", default=None)
        ap.add_argument("--recipe", default="int8")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv)
        check_task(a.task)
        overrides: dict = {}
        for s in a.set:
            overrides = _merge(overrides, parse_override(s))
        recipe = load_recipe(a.recipe, overrides)
        rep = compress_detection(a.teacher, recipe, a.data, a.out, val_data=a.val_data, batch_size=a.batch_size,
                                 seed=a.seed, device=_device(a))
        if a.json:
            print(json.dumps({k: rep[k] for k in ("metrics", "teacher_metrics", "compressed_layers")}))
        else:
            print(f"teacher {_fmt(rep['teacher_metrics'])}  →  {recipe.name} {_fmt(rep['metrics'])}; "
                  f"{len(rep['compressed_layers'])} backbone layers compressed; written to {a.out}")
        return 0
    if command == "eval":
        ap.add_argument("--checkpoint", required=True)
        a = ap.parse_args(argv)
        check_task(a.task)
        model, _ = load_detection_dir(a.checkpoint, _device(a))
        m = evaluate_detection(model, coco_dir(a.data), a.batch_size or 8)
        print(json.dumps(m) if a.json else f"{_fmt(m)}  ({m['images']} images)", file=sys.stdout)
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
