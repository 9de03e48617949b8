"""``gpusq train|compress|eval --task detection|segmentation``: the task adapters of ``gpusq.engine`` for
Mask R-CNN (Swin + FPN), DETR / Deformable-DETR on COCO-format data and UPerNet-Swin on ADE20K-style
folders, and their output directories.

The method is the engine's, as for classification (stages, KD, importance weights, checkpoints and
``--resume``, torchrun, autocast, warmup + cosine, ``min_steps``). A model family is a ``Task`` spec
(``SPECS``, one per model family): its data, its own task losses (the hard loss), its logit-KD term
and its evaluation. The model-side facts are the family's (``gpusq.families``: the builders, the
GEMMs compressed unless the recipe names its own ``sparsity.include``, the KD feature layers unless the
recipe sets ``distill.features``); ``task_spec(task, model)`` finds the spec of a model name through
``families.lookup``. ``TaskAdapter`` puts a spec into the engine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq import distributed as D
from gpusq import engine, families
from gpusq.checkpoint import (
    atomic_write,
    atomic_write_text,
    load_compressed,
    load_state_file,
    load_weights_,
    write_compressed,
)
from gpusq.classes import check_classes, check_same_classes
from gpusq.data import Batches
from gpusq.distill import soft_loss
from gpusq.engine import Step, device_of, seed_everything
from gpusq.errors import GpusqError
from gpusq.families import TASKS, Family
from gpusq.recipes import Recipe, StageConfig
from gpusq.tasks.coco import CocoDetection, coco_folder, collate_list
from gpusq.tasks.metrics import coco_map, detections_to_coco, evaluate_segmentation
from gpusq.tasks.segdata import SegmentationFolder

CKPT_DIR = ".train"  # training checkpoints inside --out, removed when the run ends
TASK_FORMAT = "task-1"


def check_task(task: str) -> str:
    """A dense-prediction task name (classification is dispatched before this module is reached)."""
    if families.check_task(task) == "classification":
        raise GpusqError(f"task 'classification' is not one of {', '.join(TASKS[1:])}: it runs through gpusq.pipeline")
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
    """How a model family trains for its task; the GPUSQ stages themselves are shared, and the model-side
    facts (builders, compressed GEMMs, KD feature layers, what stays dense) are ``family``'s.

    KD protocol (``TaskAdapter``): ``losses(student, batch, run)`` calls ``run`` (the student, or its
    DDP wrapper; default the student) and returns the task (hard) losses; keys starting with ``_``
    are not losses but what the student computed that logit KD needs (class logits, proposals,
    matched queries); hooks go on ``student``. ``teacher_features(teacher, batch)`` runs the teacher
    on the same input (its feature hooks fill) and returns what logit KD needs from it; it is also
    the plain forward of calibration and importance measurement.
    ``logit_kd(teacher, batch, captures, teacher_out, T)`` returns the T^2-scaled KL term.
    """

    name: str  # the task: detection | segmentation
    family: Family  # gpusq.families.MASKRCNN | DETR | UPERNET
    load_data: Callable[[str], Any]
    collate: Callable
    to_device: Callable
    losses: Callable  # (model in train mode, batch, run) -> dict of loss tensors (+ "_" captures)
    teacher_features: Callable  # (teacher, batch) -> teacher output for logit KD; fills feature hooks
    evaluate: Callable  # (model, dataset, batch_size, device) -> metrics
    data_info: Callable  # dataset -> dict stored in task.yaml
    check_kwargs: Callable  # (dataset, model kwargs) -> model kwargs
    summary: Callable  # metrics -> one line
    logit_kd: Callable | None = None  # (teacher, batch, captures, teacher_out, T) -> loss tensor
    metrics: tuple[str, ...] = ()  # validation metrics recorded after every epoch
    size: Callable[[Any], int] = lambda b: len(b[0])  # images in a batch

    @property
    def include(self) -> tuple[str, ...]:
        return self.family.include

    @property
    def features(self) -> str:
        return self.family.features


def _det_to(batch, device):
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _maskrcnn_losses(model: nn.Module, batch, run: Callable | None = None) -> dict[str, torch.Tensor]:
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
        losses = (run or model)(*batch)
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
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_list)
    for images, targets in loader:
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


def _seg_losses(model: nn.Module, batch, run: Callable | None = None) -> dict[str, torch.Tensor]:
    x, y = batch
    k = model.config.num_labels
    bad = (y != 255) & ((y < 0) | (y >= k))
    if bool(bad.any()):
        raise GpusqError(f"label value {int(y[bad][0])} is outside [0, {k - 1}] (num_labels={k}; 255 = ignore)")
    out = (run or model)(pixel_values=x, labels=y)
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
    name="detection", family=families.MASKRCNN, load_data=coco_folder, collate=collate_list, to_device=_det_to,
    losses=_maskrcnn_losses, teacher_features=_maskrcnn_teacher, evaluate=_det_eval,
    data_info=lambda ds: {"label_to_cat": ds.label_to_cat, "classes": data_classes(ds)}, check_kwargs=_det_kwargs,
    summary=lambda m: f"bbox mAP {m['bbox_map']:.4f}  segm mAP {m['segm_map']:.4f}",
    logit_kd=_maskrcnn_logit_kd, metrics=("bbox_map", "segm_map"),
)
UPERNET = Task(
    name="segmentation", family=families.UPERNET, load_data=seg_dir, collate=pad_collate,
    to_device=lambda b, d: (b[0].to(d), b[1].to(d)), losses=_seg_losses,
    teacher_features=lambda t, b: t(pixel_values=b[0]).logits, evaluate=_seg_eval,
    data_info=lambda ds: {"classes": ds.classes} if ds.classes is not None else {},
    check_kwargs=_seg_kwargs, summary=lambda m: f"mIoU {m['miou']:.4f}  pixel acc {m['pixel_acc']:.4f}",
    logit_kd=_seg_logit_kd, metrics=("miou", "pixel_acc"),
)


def _detr_spec() -> Task:
    """DETR / Deformable-DETR (``gpusq.tasks.detr``): encoder/decoder linears, matched-query logit KD."""
    from gpusq.tasks import detr

    return Task(
        name="detection", family=families.DETR, load_data=detr.load_coco, collate=detr.collate,
        to_device=detr.to_device,
        losses=detr.losses, teacher_features=detr.teacher_features, evaluate=detr.evaluate,
        data_info=lambda ds: {"label_to_cat": ds.label_to_cat, "classes": data_classes(ds)},
        check_kwargs=detr.check_kwargs,
        summary=lambda m: f"bbox mAP {m['bbox_map']:.4f}", logit_kd=detr.logit_kd, metrics=("bbox_map",),
        size=lambda b: len(b["labels"]),
    )


DETR = _detr_spec()
SPECS: dict[str, Task] = {t.family.name: t for t in (MASKRCNN, DETR, UPERNET)}  # family name -> its spec


def task_spec(task: str, model: str) -> Task:
    """The spec of the family that builds ``model`` for ``task``; one-line error naming the known models."""
    fam = families.lookup(model, check_task(task))
    if fam.name not in SPECS:
        raise GpusqError(f"{model} ({fam.name} family) cannot be trained for {task} yet: it has no task adapter")
    return SPECS[fam.name]


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
    model = task_spec(task, info["model"]).family.build(info["model"], **info.get("model_kwargs", {}))
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
                     device: torch.device | None = None, resume: bool = False,
                     progress: bool = False) -> dict[str, Any]:
    """Train a dense model (a teacher) with ``gpusq.engine.train_stage`` and write
    ``DIR/model.safetensors`` + ``task.yaml`` + ``report.json``.

    Checkpoints live in ``DIR/.train/`` until the run ends (``resume`` continues from them)."""
    from safetensors.torch import save_file

    t = task_spec(task, model_name)
    device = device or device_of(None)
    ds = t.load_data(data)
    val = t.load_data(val_data) if val_data else ds
    names = _check_data_classes(ds, val, data, val_data)
    kw = t.check_kwargs(ds, model_kwargs)
    seed_everything(seed)
    model = t.family.build(model_name, **kw).to(device)
    D.broadcast_module_(model)  # identical initial weights on every rank
    cfg = cfg or StageConfig(epochs=10, lr=1e-3)
    _check_stage(cfg, "label_smoothing")
    out = Path(out)
    ckdir = out / CKPT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    adapter = TaskAdapter(t, val, cfg.batch_size, device)
    res = engine.train_stage("train", model, task_batches(t, ds, cfg.batch_size, seed), cfg, device,
                             adapter=adapter, ckpt_path=ckdir / "train.safetensors", resume=resume, seed=seed,
                             progress=progress)
    metrics = adapter.evaluate(model)
    report = {"task": task, "model": model_name, "metrics": metrics,
              "train_losses": res.history[-1]["losses"] if res.history else {}, "history": res.history,
              "processes": D.world()}
    if D.is_main():
        # one copy per key: safetensors refuses tensors that share memory (tied heads, e.g. Deformable-DETR's)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        meta = {"gpusq_task": task, **({"classes": json.dumps(names)} if names is not None else {})}
        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
        _write_task_info(out, {"task": task, "format": TASK_FORMAT, "model": model_name, "model_kwargs": kw,
                               "compressed": False, **t.data_info(ds)})
        engine.write_json(out / "report.json", report)
        shutil.rmtree(ckdir, ignore_errors=True)
    D.barrier()
    return report


def load_teacher(task: str, teacher: str | Path, data: str, model: str | None = None,
                 model_kwargs: dict[str, Any] | None = None,
                 device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any], Task, Any]:
    """The dense teacher: a ``gpusq train --task`` directory, or the user's own weights file
    (``.safetensors`` / ``.pt`` / ``.pth`` state dict) of the model named ``model``.

    Returns (teacher, its task info, its family spec, ``data`` loaded by that family's loader)."""
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
    m = t.family.build(model, **kw)
    load_weights_(m, load_state_file(p), str(p), target=f"{model}{_kw_text(kw)}")
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
                  device: torch.device | None = None, resume: bool = False, progress: bool = False,
                  ckpt_every: int = 0, stage1_from: str | Path | None = None,
                  epoch_eval: bool = True) -> dict[str, Any]:
    """GPUSQ (``gpusq.engine.compress``) on a dense model of ``task``; writes the compressed model,
    ``task.yaml`` and ``report.json``.

    ``teacher_dir``: a ``gpusq train --task`` directory, or a weights file of ``model``. Checkpoints
    live in ``out/.train/`` until the run ends; ``resume`` continues an interrupted run from them
    (a finished stage 1 is loaded from ``out/stage1/``, not retrained); ``stage1_from``: the ``stage1/``
    directory of an earlier run of the same teacher, reused instead of stage 1.
    """
    check_task(task)
    check_recipe(recipe)  # before any work
    device = device or device_of(None)
    teacher, info, t, ds = load_teacher(task, teacher_dir, data, model, model_kwargs, device)
    val = t.load_data(val_data) if val_data else ds
    names = _check_data_classes(ds, val, data, val_data)
    if names is not None:  # a weights-file teacher records no names: its head size is checked
        recorded = info.get("classes") if Path(teacher_dir).is_dir() else None
        check_classes(recorded, model_classes(teacher), names, who="the teacher", data=data)
        info = {**info, "classes": names}
    if "label_to_cat" in info and ds.label_to_cat != {int(k): v for k, v in info["label_to_cat"].items()}:
        raise GpusqError(f"the categories of {data} differ from the teacher's ({teacher_dir})")
    bs = recipe.loader_batch_size(batch_size)
    adapter = TaskAdapter(t, val, bs, device, info)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    D.broadcast_module_(teacher)  # replicated teacher: identical on every rank, so are the masks
    header = {"task": task, "model": info["model"], "family": t.family.name}
    return engine.compress(adapter, teacher, recipe, out, task_batches(t, ds, bs, seed), device=device,
                           model_name=info["model"], model_kwargs=info["model_kwargs"], classes=names,
                           report=header, seed=seed, batch_size=batch_size, resume=resume, progress=progress,
                           ckpt_every=ckpt_every, ckpt_dir=CKPT_DIR, stage1_from=stage1_from,
                           epoch_eval=epoch_eval)


# -- the engine's view of a task ---------------------------------------------------------------------
class TaskBatches(Batches):
    """``gpusq.data.Batches`` (seeded shuffle per epoch, ``skip`` for mid-epoch resume, torchrun shards)
    of a task dataset, collated by the family."""

    def __init__(self, ds, batch_size: int, collate: Callable, seed: int, rank: int, world: int):
        super().__init__(ds, batch_size, shuffle=True, seed=seed, workers=0, drop_last=True, rank=rank, world=world)
        self.collate = collate

    def __iter__(self) -> Iterator[Any]:
        chunks = list(self.indices().split(self.bs))
        if chunks and len(chunks[-1]) < self.bs:
            chunks = chunks[:-1]
        chunks = chunks[self.skip:]
        self.skip = 0
        for c in chunks:
            yield self.collate([self.ds[i] for i in c.tolist()])


def task_batches(t: Task, ds, batch_size: int, seed: int) -> TaskBatches:
    """Training batches; under torchrun each rank gets ``batch_size / world`` of every global batch."""
    world = D.world()
    if batch_size % world:
        raise GpusqError(f"the batch size {batch_size} is not divisible by the {world} processes; "
                         f"use a multiple of {world}")
    b = TaskBatches(ds, batch_size // world, t.collate, seed, D.rank(), world)
    if len(b) == 0:
        raise GpusqError(f"the training data has fewer images ({len(ds)}) than one batch ({batch_size}); "
                         "use a smaller --batch-size")
    return b


def _check_stage(cfg: StageConfig, field: str) -> None:
    """The one recipe field a task cannot use: label smoothing belongs to a cross-entropy over classes."""
    if cfg.label_smoothing:
        raise GpusqError(f"{field} is for classification; detection / segmentation models train on their "
                         f"own losses (set it to 0)")


def check_recipe(recipe: Recipe) -> None:
    """A one-line error for a recipe field no task can use (every other field is used)."""
    changed = recipe.augment.changed()
    if changed:  # the task pipelines have their own data transforms
        raise GpusqError(f"augment.{changed[0]} is for classification; detection / segmentation runs use their "
                         "own data transforms (remove the recipe's augment section)")
    _check_stage(recipe.train.stage1, "train.stage1.label_smoothing")
    _check_stage(recipe.train.stage2, "train.stage2.label_smoothing")


class TaskAdapter:
    """A ``Task`` family spec as a ``gpusq.engine.Adapter``: the model's own losses are the hard loss."""

    find_unused = True  # a detection head may leave parameters without gradient in a step

    def __init__(self, t: Task, val, batch_size: int, device: torch.device, info: dict[str, Any] | None = None):
        self.t, self.val, self.batch_size, self.device, self.info = t, val, batch_size, device, info or {}
        self.task, self.features, self.include, self.history_keys = t.name, t.features, t.include, t.metrics

    def size(self, batch) -> int:
        return self.t.size(batch)

    def prepare(self, batch, device: torch.device, train: bool, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1), step: int = 0):
        return self.t.to_device(batch, device)

    def forward(self, model: nn.Module, run: Callable, batch, label_smoothing: float) -> Step:
        out = self.t.losses(model, batch, run)
        losses = {k: v for k, v in out.items() if not k.startswith("_")}
        return Step(sum(losses.values()), {k: v for k, v in out.items() if k.startswith("_")}, losses)

    def teacher_forward(self, teacher: Callable, batch):
        return self.t.teacher_features(teacher, batch)

    def logit_kd(self, teacher: nn.Module, batch, step: Step, t_out, temperature: float) -> torch.Tensor | None:
        if self.t.logit_kd is None:
            return None
        return self.t.logit_kd(teacher, batch, step.captures, t_out, temperature)

    def infer(self, model: nn.Module, batch):
        return self.t.teacher_features(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Every rank evaluates the whole split (mAP does not add up over shards); identical models."""
        return evaluate_task(self.t, model, self.val, self.batch_size, self.device)

    def check_recipe(self, recipe: Recipe) -> None:
        check_recipe(recipe)

    def begin_stage(self, seed: int, cfg: StageConfig) -> None:
        """Task batches draw their augmentation in ``prepare`` alone: nothing per stage."""

    def write(self, out: Path, report: dict[str, Any], stored: nn.Module, state: dict, meta: dict,
              recipe: Recipe) -> None:
        c = recipe.distill
        logit = LOGIT_KD_DOC.get(self.t.family.name, "none") if c.beta > 0 else "off (distill.beta = 0)"
        hist = report["history"]
        last = lambda h: h[-1].get("losses", {}) if h else {}  # noqa: E731
        report.update({
            "skipped_layers": report.get("layers_skipped", {}), "dense_layers": self.t.family.dense_layers,
            "distill": {"hard": "the model's task losses", "feature_layers": report["feature_layers"],
                        "logit": logit,
                        "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "temperature": c.temperature},
            "stage1_losses": last(hist["stage1"]), "stage2_losses": last(hist["stage2"]),
        })
        write_compressed(state, meta, out, recipe)
        _write_task_info(out, {**self.info, "compressed": True, "recipe": recipe.name})
        engine.write_json(out / "report.json", report)


LOGIT_KD_DOC = {
    "maskrcnn": "KL on the RoI box head's class logits, teacher head on the student's sampled RoIs",
    "upernet": "per-pixel KL on the segmentation logits (labelled pixels)",
    "detr": "KL on the class logits of the queries matched to the ground truth",
}
