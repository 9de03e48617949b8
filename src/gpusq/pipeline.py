"""The GPUSQ pipeline: dense training (teachers), two-stage compression, evaluation; and their CLI.

Stage order (checked): dense teacher → stage 1 (prune 2:4, KD fine-tune from the dense teacher:
hard + soft + feature) → stage 2 (quantize, calibrate, QAT with KD from the stage-1 sparse model,
feature terms weighted per layer by stage-1 distortion) → ``DIR/model.safetensors`` + reports.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq import distributed as D
from gpusq.augment import AugmentConfig, batch_augment
from gpusq.checkpoint import (
    atomic_write,
    atomic_write_text,
    build_compressed,
    read_compressed_dir,
    save_compressed,
    stored_model,
    write_compressed,
)
from gpusq.classes import check_classes, check_same_split_classes, head_size, recorded_classes
from gpusq.data import Batches, DataInfo, build_dataset, cache_in_memory, prepare_batch
from gpusq.distill import DistillationLoss, feature_layers, layer_weights, measure_feature_errors
from gpusq.errors import GpusqError, InternalError
from gpusq.models import create_model, load_state_file, load_weights_, model_input_size
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import Recipe, StageConfig
from gpusq.sparsity import check_2to4, sparsify_
from gpusq.train import default_device, evaluate, seed_everything, train_stage

DENSE_FORMAT = "dense-1"


@dataclass
class DataOptions:
    data: str
    batch_size: int | None = None
    workers: int = 4
    cache: bool | None = None  # decode once into memory; default: when the split is small
    skip_bad_images: bool = False
    seed: int = 0


_DECODED: dict = {}  # the last small dataset decoded into memory (reused by later runs in the process)


@dataclass
class Loaders:
    train: Batches
    val: Batches
    info: DataInfo
    calib: list[torch.Tensor] = field(default_factory=list)


def build_loaders(opts: DataOptions, size: tuple[int, int, int], batch_size: int, device: torch.device,
                  rank: int | None = None, world: int | None = None, augment: AugmentConfig | None = None) -> Loaders:
    """Train/val batches; under torchrun each rank gets ``batch_size / world`` of every global batch.
    ``augment``: the training split's per-image augmentation (``gpusq.augment``)."""
    rank = D.rank() if rank is None else rank
    world = D.world() if world is None else world
    if batch_size % world:
        raise GpusqError(f"the batch size {batch_size} is not divisible by the {world} processes; "
                         f"use a multiple of {world}")
    global_bs, batch_size = batch_size, batch_size // world
    key = (opts.data, tuple(size), opts.skip_bad_images, repr(augment or AugmentConfig()))
    if opts.cache is not False and key in _DECODED:
        train_ds, val_ds, info = _DECODED[key]
    else:
        train_ds, info = build_dataset(opts.data, "train", size, opts.skip_bad_images, augment)
        val_ds, val_info = build_dataset(opts.data, "val", size, opts.skip_bad_images)
        check_same_split_classes(info.classes, val_info.classes, opts.data)
        cache = opts.cache
        if cache is None:  # small sets (< ~200 MB decoded) are decoded once per process
            cache = len(train_ds) * size[0] * size[1] * size[2] < 200e6
        if cache:
            train_ds, val_ds = cache_in_memory(train_ds), cache_in_memory(val_ds)
            _DECODED.clear()
            _DECODED[key] = (train_ds, val_ds, info)
    pin = device.type == "cuda"
    train = Batches(train_ds, batch_size, shuffle=True, seed=opts.seed, workers=opts.workers, pin=pin,
                    drop_last=True, rank=rank, world=world)
    val = Batches(val_ds, max(batch_size, 256), shuffle=False, workers=opts.workers, pin=pin,
                  rank=rank, world=world, even=False)
    if len(train) == 0:
        raise GpusqError(f"the training split of {opts.data} has fewer images ({len(train_ds)}) than one batch "
                         f"({global_bs}); use a smaller --batch-size")
    return Loaders(train, val, info)


def sample_batches(batches: Batches, n: int, device: torch.device) -> list[torch.Tensor]:
    """``n`` un-augmented batches (calibration, layer-importance measurement)."""
    out = []
    saved = batches.epoch
    batches.epoch = 10_000  # an order independent of training's
    batches.augment = False  # no RandAugment / colour jitter (crops of >= 128 px images stay)
    for x, y, _ in batches:
        if len(y):
            out.append(prepare_batch(x, device, train=False, flip=False))
        if len(out) >= n:
            break
    batches.epoch = saved
    batches.augment = True
    return out


# -- model construction ---------------------------------------------------------------------------
def resolve_model(model: str | None, model_kwargs: dict, checkpoint: str | None) -> tuple[nn.Module, str | None, dict]:
    """Build the dense model (timm name + kwargs) and load ``checkpoint`` if given.

    A ``gpusq train`` output directory supplies its own model name and kwargs. The class names
    recorded with ``checkpoint`` (``gpusq.classes.recorded_classes``; None when it has none) are
    attached to the model as ``net.gpusq_classes``, which ``compress`` and ``train_dense`` check
    against the data's.
    """
    state = None
    classes = None
    if checkpoint:
        p = Path(checkpoint)
        if p.is_dir():
            info_file = p / "model.yaml"
            if not (p / "model.safetensors").is_file():
                raise GpusqError(f"{checkpoint} is not a gpusq output directory (no model.safetensors)")
            if info_file.is_file():
                info = yaml.safe_load(info_file.read_text()) or {}
                model = model or info.get("model")
                model_kwargs = {**(info.get("model_kwargs") or {}), **model_kwargs}
            p = p / "model.safetensors"
        state = load_state_file(p)
        classes = recorded_classes(p)
    if not model:
        raise GpusqError("no model given: pass --model NAME (a timm model name)")
    net = create_model(model, **model_kwargs)
    if state is not None:
        if any(k.endswith(".weight_mask") for k in state):
            raise GpusqError(f"{checkpoint} is a compressed model, not a dense one")
        load_weights_(net, state, source=f"checkpoint {checkpoint}")
    net.gpusq_classes = classes
    return net, model, model_kwargs


def _write_dense(net: nn.Module, out: Path, model: str | None, kwargs: dict,
                 classes: list[str] | None = None) -> None:
    """``out/model.safetensors`` + ``out/model.yaml``; ``classes``: the class names in label order,
    recorded in both (safetensors metadata ``classes`` as JSON, ``classes:`` in model.yaml)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"gpusq_format": DENSE_FORMAT, "model": model or "", "model_kwargs": json.dumps(kwargs)}
    info = {"model": model, "model_kwargs": kwargs, "gpusq_format": DENSE_FORMAT}
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
        info["classes"] = list(classes)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
    atomic_write_text(out / "model.yaml", yaml.safe_dump(info))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def _run_classes(ck: Path, classes: list[str], resume: bool, data: str) -> None:
    """Record the data's classes with a run's checkpoints; a resumed run must see the same ones."""
    f = ck / "classes.json"
    if resume and f.is_file():
        check_classes(json.loads(f.read_text()), None, classes, who=f"the interrupted run in {ck.parent}", data=data)
    elif D.is_main():
        atomic_write_text(f, json.dumps(list(classes)) + "\n")


def _prepare_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GpusqError(f"--out {out} exists and is not a directory")
    if not out.parent.exists():
        raise GpusqError(f"--out {out}: parent directory {out.parent} does not exist")
    if resume and not (out / "checkpoints").is_dir():
        raise GpusqError(f"--resume: no checkpoint in {out}")
    out.mkdir(exist_ok=True)


# -- dense training ---------------------------------------------------------------------------------
def train_dense(model: str | None, model_kwargs: dict, data: DataOptions, out: str | Path, *,
                epochs: float = 10, lr: float = 1e-3, batch_size: int = 128, warmup_epochs: float = 1.0,
                weight_decay: float = 0.05, label_smoothing: float = 0.1, init: str | None = None,
                resume: bool = False, device: torch.device | None = None, progress: bool = True,
                net: nn.Module | None = None, compile: bool = False, augment: AugmentConfig | None = None) -> dict:
    """Train (or fine-tune from ``init``) a dense model; writes ``out/model.safetensors`` + report.

    The data's classes must be those recorded with ``init`` (or with ``net``, as ``net.gpusq_classes``),
    and their number the model's head size; the output records them. ``augment``: the training
    augmentation (default: gpusq's standard crop + flip)."""
    out = Path(out)
    _prepare_out(out, resume)
    device = device or default_device()
    seed_everything(data.seed)
    if net is None:
        net, model, model_kwargs = resolve_model(model, model_kwargs, init)
    net.to(device)
    D.broadcast_module_(net)  # identical initial weights on every rank
    loaders = build_loaders(data, model_input_size(net), batch_size, device, augment=augment)
    classes = loaders.info.classes
    init_classes = getattr(net, "gpusq_classes", None)
    if init or init_classes is not None:
        check_classes(init_classes, head_size(net), classes, who=f"--init {init}" if init else "the initial model",
                      data=data.data)
    else:
        n = len(classes)
        check_classes(None, head_size(net), classes, who=f"the model {model or ''}".rstrip(), data=data.data,
                      note=False, hint=f"; pass --model-arg num_classes={n}")
    _run_classes(out / "checkpoints", classes, resume, data.data)
    cfg = StageConfig(epochs=epochs, lr=lr, min_lr=lr * 1e-3, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, batch_size=batch_size, label_smoothing=label_smoothing)
    res = train_stage("train", net, loaders.train, cfg, device, flip=loaders.info.flip, crop_pad=loaders.info.crop_pad,
                      ckpt_path=out / "checkpoints" / "train.safetensors", resume=resume, seed=data.seed,
                      progress=progress, compile=compile,
                      batch_aug=batch_augment(augment, loaders.info.num_classes, data.seed, label_smoothing,
                                              (loaders.train.rank, loaders.train.world)))
    metrics = evaluate(net, loaders.val, device, progress=progress)
    report = {"kind": "dense", "model": model, "model_kwargs": model_kwargs, "data": data.data,
              "classes": classes, "metrics": metrics, "history": res.history,
              "train_images_per_s": res.images_per_s * D.world(), "train_seconds": res.seconds, "processes": D.world()}
    if D.is_main():
        _write_dense(net, out, model, model_kwargs, classes)
        _write_json(out / "report.json", report)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    D.barrier()
    return report


# -- compression --------------------------------------------------------------------------------
def compress(teacher: nn.Module, recipe: Recipe, data: DataOptions, out: str | Path, *,
             model_name: str | None = None, model_kwargs: dict | None = None, resume: bool = False,
             device: torch.device | None = None, progress: bool = True, ckpt_every: int = 0,
             stage1_from: str | Path | None = None, compile: bool = False,
             teacher_classes: list[str] | None = None, epoch_eval: bool = True) -> dict:
    """Run GPUSQ on a trained dense ``teacher``; write the compressed model and reports to ``out``.

    ``teacher_classes``: the class names the teacher was trained on, in label order (default: those
    ``resolve_model`` attached as ``teacher.gpusq_classes``); the data's must be the same, else a
    one-line error before any training (without names, the teacher's head size is checked). The
    output records the classes.

    ``stage1_from``: reuse the stage-1 result of an earlier run (its ``out/stage1`` directory) and
    go straight to stage 2 (how the ablations share one sparse fine-tuning).

    ``epoch_eval=False``: no validation pass after every epoch (the history has training metrics
    only; the stage and final metrics are measured as always), for sweeps of many short runs.
    """
    out = Path(out)
    _prepare_out(out, resume)
    device = device or default_device()
    model_kwargs = model_kwargs or {}
    seed_everything(data.seed)
    teacher = teacher.to(device).eval()
    D.broadcast_module_(teacher)  # replicated teacher: identical on every rank, so are the masks
    size = model_input_size(teacher)
    bs = data.batch_size or recipe.train.stage1.batch_size
    loaders = build_loaders(data, size, bs, device, augment=recipe.augment)
    classes = loaders.info.classes
    if teacher_classes is None:
        teacher_classes = getattr(teacher, "gpusq_classes", None)
    check_classes(teacher_classes, head_size(teacher), classes, who="the teacher", data=data.data)
    feats = feature_layers(teacher, recipe.distill.features) if recipe.distill.gamma > 0 else []
    ev = lambda m: evaluate(m, loaders.val, device, progress=False)  # noqa: E731
    teacher_metrics = ev(teacher)
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    _run_classes(ck, classes, resume, data.data)
    main = D.is_main()
    report: dict[str, Any] = {"kind": "compressed", "model": model_name, "model_kwargs": model_kwargs,
                              "recipe": recipe.name, "data": data.data, "classes": classes,
                              "teacher_metrics": teacher_metrics}

    # stage 1: 2:4 prune + KD fine-tune from the dense teacher (features unweighted)
    student = copy.deepcopy(teacher).train()
    student.requires_grad_(True)  # the teacher may have been frozen by an earlier stage
    stage1_dir = out / "stage1"
    if stage1_from is None and resume and (stage1_dir / "stage1.json").is_file():
        stage1_from = stage1_dir  # stage 1 finished before the interruption
    if stage1_from is not None:
        state, s1_info, _r = read_compressed_dir(stage1_from)
        s1_file = Path(stage1_from) / "stage1.json"
        if any(k.endswith((".weight_scale", ".input_scale")) for k in state) or not s1_file.is_file():
            raise GpusqError(f"{stage1_from} is not a stage-1 (sparse, unquantized) output directory")
        if s1_info.get("classes") is not None:
            check_classes(s1_info["classes"], None, classes, who=f"the stage-1 model in {stage1_from}",
                          data=data.data)
        build_compressed(student, state, recipe, source=str(stage1_from))
        student.to(device)
        s1 = json.loads(s1_file.read_text())
        hist1 = s1.get("history", [])
        distortion = s1["distortion"]
        feature_mse = s1.get("feature_mse")
        if feature_mse is None:  # a stage-1 directory written before feature_mse was recorded
            imp = sample_batches(loaders.train, recipe.train.importance_batches, device)
            names = feature_layers(teacher, recipe.distill.features)
            feature_mse = D.mean_dict(measure_feature_errors(student, teacher, imp, names)[1]) if names else {}
    else:
        if recipe.sparse:
            sel = sparsify_(student, recipe.sparsity)
            report["layers_skipped"] = sel.skipped
            if not sel.selected:
                why = "; ".join(f"{k}: {v}" for k, v in list(sel.skipped.items())[:3])
                raise GpusqError("no layer to compress: the recipe's sparsity.include patterns match no "
                                 "2:4-prunable layer" + (f" (skipped {why})" if why else ""))
            D.broadcast_module_(student)
        cfg1 = _stage_cfg(recipe.train.stage1, data.batch_size)
        loss1 = DistillationLoss(_no_weighting(recipe))
        r1 = train_stage("stage1", student, loaders.train, cfg1, device, flip=loaders.info.flip,
                         crop_pad=loaders.info.crop_pad, teacher=teacher,
                         loss_fn=loss1, feature_names=feats, ckpt_path=ck / "stage1.safetensors",
                         ckpt_every=ckpt_every, resume=resume, seed=data.seed, eval_fn=ev if epoch_eval else None,
                         progress=progress, compile=compile,
                         batch_aug=batch_augment(recipe.augment, loaders.info.num_classes, data.seed,
                                                 cfg1.label_smoothing, (loaders.train.rank, loaders.train.world)))
        hist1 = r1.history
        imp = sample_batches(loaders.train, recipe.train.importance_batches, device)
        names = feature_layers(teacher, recipe.distill.features)
        distortion, feature_mse = measure_feature_errors(student, teacher, imp, names) if names else ({}, {})
        distortion, feature_mse = D.mean_dict(distortion), D.mean_dict(feature_mse)
        if main:
            save_compressed(student, stage1_dir, recipe, model_name, model_kwargs, classes=classes,
                            dense_dtype="fp32")  # lossless: stage 2 trains on it
            _write_json(stage1_dir / "stage1.json",
                        {"history": hist1, "distortion": distortion, "feature_mse": feature_mse})
        D.barrier()
    report["stage1_metrics"] = ev(student)
    weights = layer_weights(distortion, feature_mse, recipe.distill)
    report["layer_importance"] = recipe.distill.importance if recipe.distill.layer_weighting else "uniform"
    report["layer_distortion"] = distortion
    report["layer_feature_mse"] = feature_mse
    report["layer_weights"] = weights

    # stage 2: sparse-aware QAT, KD from the stage-1 sparse model, features weighted per layer
    hist2: list = []
    if recipe.quantized:
        teacher2 = copy.deepcopy(student).eval().requires_grad_(False)
        if not quantize_(student, recipe.quant):
            raise GpusqError("no layer to compress: no GEMM layer of the model can be quantized")
        calib = sample_batches(loaders.train, recipe.train.calib_batches, device)

        def loop(m):
            for x in calib:
                m(x)

        calibrate(student, loop)
        report["calibrated_metrics"] = ev(student)
        cfg2 = _stage_cfg(recipe.train.stage2, data.batch_size)
        loss2 = DistillationLoss(recipe.distill, weights)
        r2 = train_stage("stage2", student, loaders.train, cfg2, device, flip=loaders.info.flip,
                         crop_pad=loaders.info.crop_pad,
                         teacher=teacher2, loss_fn=loss2, feature_names=feats,
                         ckpt_path=ck / "stage2.safetensors", ckpt_every=ckpt_every, resume=resume,
                         seed=data.seed + 1, eval_fn=ev if epoch_eval else None, progress=progress,
                         compile=compile,
                         batch_aug=batch_augment(recipe.augment, loaders.info.num_classes, data.seed + 1,
                                                 cfg2.label_smoothing, (loaders.train.rank, loaders.train.world)))
        hist2 = r2.history
    # the final metrics are the stored model's (codes + bf16 dense tensors): what `gpusq eval` of the
    # output reproduces exactly
    stored, stored_state, stored_meta = stored_model(student, recipe, model_name, model_kwargs, classes)
    report["metrics"] = ev(stored)
    report["history"] = {"stage1": hist1, "stage2": hist2}
    bad = [n for n, ok in check_2to4(student).items() if not ok]
    if recipe.sparse and bad:
        raise InternalError(f"2:4 pattern broken in {bad[:3]} after training")
    report["processes"] = D.world()
    if main:  # stats first: a failure there must not leave a model without its report
        from gpusq.report import write_report_md
        from gpusq.stats import model_stats

        report["stats"] = model_stats(copy.deepcopy(stored).cpu(), recipe, input_size=size)
        write_compressed(stored_state, stored_meta, out, recipe)
        report["stats"]["file_bytes"] = (out / "model.safetensors").stat().st_size
        _write_json(out / "report.json", report)
        write_report_md(out, report)
        shutil.rmtree(ck, ignore_errors=True)
    D.barrier()
    return report


def _stage_cfg(cfg: StageConfig, batch_size: int | None) -> StageConfig:
    return cfg if batch_size is None else StageConfig(**{**cfg.__dict__, "batch_size": batch_size})


def _no_weighting(recipe: Recipe):
    from dataclasses import replace

    return replace(recipe.distill, layer_weighting=False)


# -- evaluation -----------------------------------------------------------------------------------
def load_any(checkpoint: str, model: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """A gpusq output (dense or compressed) or a foreign weights file, ready for evaluation."""
    from gpusq.checkpoint import load_compressed

    p = Path(checkpoint)
    f = p / "model.safetensors" if p.is_dir() else p
    if f.suffix == ".safetensors" and f.is_file():
        from safetensors import safe_open

        from gpusq.checkpoint import file_metadata

        try:
            with safe_open(str(f), "pt") as sf:
                fmt = file_metadata(sf.metadata()).get("gpusq_format")
        except Exception:  # noqa: BLE001
            raise GpusqError(f"{f} is not a readable safetensors file") from None
        if fmt and fmt != DENSE_FORMAT:
            net = create_model(model, **(model_kwargs or {})) if model else None
            return load_compressed(p if p.is_dir() else p.parent, model=net)[0]
    return resolve_model(model, model_kwargs or {}, checkpoint)[0]


def eval_checkpoint(checkpoint: str, data: DataOptions, model: str | None = None,
                    model_kwargs: dict | None = None, device: torch.device | None = None,
                    progress: bool = True) -> dict:
    """Top-1/top-5 of ``checkpoint`` on the val split of ``data``, whose classes must be the ones the
    checkpoint records (without names: as many as its head has)."""
    device = device or default_device()
    net = load_any(checkpoint, model, model_kwargs).to(device)
    val_ds, info = build_dataset(data.data, "val", model_input_size(net), data.skip_bad_images)
    check_classes(recorded_classes(checkpoint), head_size(net), info.classes, who=f"checkpoint {checkpoint}",
                  data=data.data)
    val = Batches(val_ds, data.batch_size or 256, shuffle=False, workers=data.workers, pin=device.type == "cuda",
                  rank=D.rank(), world=D.world(), even=False)
    return evaluate(net, val, device, progress=progress)


# -- CLI ----------------------------------------------------------------------------------------------
