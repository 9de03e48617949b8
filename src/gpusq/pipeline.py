"""Classification: its data, its task adapter for the engine, dense training (teachers), compression
and evaluation of timm models on ImageFolder-style data.

The method itself (stage order, loop, KD, checkpoints, torchrun) is ``gpusq.engine``; what is
classification's own is ``ClassificationAdapter``: uint8 batches normalized and augmented on the
device, cross-entropy, logit KD on the class logits, top-1/top-5 evaluation, and the output it
writes (``DIR/model.safetensors`` + ``report.json`` / ``report.md`` with the size and bit-op stats).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from gpusq import distributed as D
from gpusq import engine
from gpusq.augment import AugmentConfig, batch_augment
from gpusq.checkpoint import atomic_write, atomic_write_text, write_compressed
from gpusq.classes import check_classes, check_same_split_classes, head_size, recorded_classes
from gpusq.data import Batches, DataInfo, Norm, build_dataset, cache_in_memory, model_norm, prepare_batch
from gpusq.distill import DEFAULT_FEATURE_PATTERN, soft_loss
from gpusq.engine import Step, autocast, device_of, seed_everything
from gpusq.errors import GpusqError
from gpusq.families import model_input_size
from gpusq.recipes import Recipe, StageConfig

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


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, desc: str = "eval",
             progress: bool = True, norm: Norm | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy over ``batches`` (normalized with ``norm``,
    default the model's own: ``gpusq.data.model_norm``)."""
    norm = norm if norm is not None else model_norm(model)
    was = model.training
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    bad = 0
    ready = getattr(batches, "ready", False)  # a user's loader (gpusq.userdata): inputs as the model takes them
    for x, y, nb in tqdm(batches, desc=desc, leave=False, disable=not progress):
        bad += nb
        if len(y) == 0:
            continue
        x = x.to(device, non_blocking=True) if ready else prepare_batch(x, device, train=False, flip=False, norm=norm)
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


class ClassificationAdapter:
    """Classification for ``gpusq.engine``: ``(uint8 images, labels, n_bad)`` batches, augmented on the
    device (pad-crop + optional flip), cross-entropy, KL on the class logits, top-1/top-5.
    ``ready``: the batches are a user's (``gpusq.userdata``), inputs already as the model takes them
    (moved to the device as they are; the batch augmentation, erasing and Mixup, still applies)."""

    task = "classification"
    features = DEFAULT_FEATURE_PATTERN
    include = None  # the recipe's sparsity.include
    history_keys = ("top1", "top5")
    find_unused = False

    def __init__(self, val: Batches | None, device: torch.device, *, flip: bool | float, crop_pad: float = 0.125,
                 input_size: tuple[int, int, int] | None = None, augment: AugmentConfig | None = None,
                 num_classes: int = 0, shard: tuple[int, int] = (0, 1), ready: bool = False,
                 norm: Norm | None = None, family: object | None = None):
        self.val, self.device, self.flip, self.crop_pad, self.input_size = val, device, flip, crop_pad, input_size
        self.augment, self.num_classes, self.shard, self.ready = augment, num_classes, shard, ready
        self.norm = norm  # the model's own input normalization (Hugging Face models), else gpusq's
        if family is not None and getattr(family, "name", "timm") != "timm":  # its GEMMs and KD taps (HF models)
            self.include, self.features = tuple(family.include), family.features
        self.batch_aug = None  # gpusq.augment.BatchAugment of the running stage (erasing, Mixup / CutMix)

    def begin_stage(self, seed: int, cfg: StageConfig) -> None:
        """Each stage draws its erasing / Mixup from its own seed (per step: resume stays exact)."""
        self.batch_aug = batch_augment(self.augment, self.num_classes, seed, cfg.label_smoothing, self.shard)

    def size(self, batch) -> int:
        return len(batch[1])

    def prepare(self, batch, device: torch.device, train: bool, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1), step: int = 0):
        x, y, _ = batch
        if self.ready:
            x = x.to(device, non_blocking=True)
        else:
            x = prepare_batch(x, device, train=train, flip=self.flip if train else False, generator=generator,
                              crop_pad=self.crop_pad, shard=shard, norm=self.norm)
        if not train:
            return x
        y = y.to(device, non_blocking=True)
        if self.batch_aug is None:
            return x, y, y
        x_aug, y_aug = self.batch_aug(x, y, step)  # y_aug: soft targets when mixing
        return x_aug, y_aug, y

    def forward(self, model: nn.Module, run: Callable, batch, label_smoothing: float) -> Step:
        x, y, y_hard = batch
        logits = run(x)
        # soft (mixed) targets come smoothed already
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.0 if y.is_floating_point() else label_smoothing)
        return Step(loss, {"logits": logits}, correct=int((logits.detach().argmax(1) == y_hard).sum()))

    def teacher_forward(self, teacher: Callable, batch):
        return teacher(batch[0])

    def logit_kd(self, teacher: nn.Module, batch, step: Step, t_out, temperature: float) -> torch.Tensor:
        return soft_loss(step.captures["logits"], t_out, temperature)

    def infer(self, model: nn.Module, batch):
        return model(batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.val, self.device, progress=False, norm=self.norm)

    def check_recipe(self, recipe: Recipe) -> None:
        """Every recipe field has its use in classification."""

    def write(self, out: Path, report: dict, stored: nn.Module, state: dict, meta: dict, recipe: Recipe) -> None:
        """Stats first: a failure there must not leave a model without its report."""
        from gpusq.report import write_report_md
        from gpusq.stats import model_stats

        report["stats"] = model_stats(copy.deepcopy(stored).cpu(), recipe, input_size=self.input_size)
        write_compressed(state, meta, out, recipe)
        report["stats"]["file_bytes"] = (out / "model.safetensors").stat().st_size
        _write_json(out / "report.json", report)
        write_report_md(out, report)


# -- model construction ---------------------------------------------------------------------------
def resolve_model(model: str | None, model_kwargs: dict, checkpoint: str | None) -> tuple[nn.Module, str | None, dict]:
    """Build the dense classifier (a ``gpusq.families`` name + kwargs) and load ``checkpoint`` if given.

    A ``gpusq train`` output directory supplies its own model name and kwargs. The class names
    recorded with ``checkpoint`` (``gpusq.classes.recorded_classes``; None when it has none) are
    attached to the model as ``net.gpusq_classes``, which ``compress`` and ``train_dense`` check
    against the data's.
    """
    from gpusq import families, hf
    from gpusq.checkpoint import load_state_file, load_weights_

    hf.check_not_hub_id(checkpoint)
    hf.check_not_hub_id(model)
    hf_dir = checkpoint if hf.is_hf_dir(checkpoint) else model if not checkpoint and hf.is_hf_dir(model) else None
    if hf_dir:  # a Hugging Face save_pretrained directory: its config.json is the model (gpusq.hf)
        hf.check_no_overrides(hf_dir, model_kwargs)
        net, name, kwargs = hf.load_dir(hf_dir)
        net.gpusq_classes = None  # HF label names (id2label) need not be folder names: net.gpusq_label_names
        return net, name, kwargs
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
        raise GpusqError("no model given: pass --model NAME (a timm model name) or a Hugging Face directory")
    net = families.build(model, "classification", **model_kwargs)
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


_write_json = engine.write_json


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
        raise GpusqError(f"nothing to resume: no checkpoint in {out}")
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
    device = _run_device(device)
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
                      data=data.data, label_names=getattr(net, "gpusq_label_names", None))
    else:
        n = len(classes)
        check_classes(None, head_size(net), classes, who=f"the model {model or ''}".rstrip(), data=data.data,
                      note=False, hint=f"; pass --model-arg num_classes={n}")
    _run_classes(out / "checkpoints", classes, resume, data.data)
    cfg = StageConfig(epochs=epochs, lr=lr, min_lr=lr * 1e-3, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, batch_size=batch_size, label_smoothing=label_smoothing)
    adapter = ClassificationAdapter(loaders.val, device, flip=loaders.info.flip, crop_pad=loaders.info.crop_pad,
                                    augment=augment, num_classes=loaders.info.num_classes,
                                    shard=(loaders.train.rank, loaders.train.world), norm=model_norm(net))
    res = engine.train_stage("train", net, loaders.train, cfg, device, adapter=adapter,
                             ckpt_path=out / "checkpoints" / "train.safetensors", resume=resume, seed=data.seed,
                             progress=progress, compile=compile)
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
def compress(teacher: nn.Module, recipe: Recipe, data: DataOptions | None = None, out: str | Path | None = None, *,
             train: Iterable | None = None, val: Iterable | None = None, calib: Iterable | None = None,
             seed: int | None = None, model_name: str | None = None, model_kwargs: dict | None = None,
             resume: bool = False, overwrite: bool = False, device: torch.device | None = None,
             progress: bool = True, ckpt_every: int = 0, stage1_from: str | Path | None = None,
             compile: bool = False, teacher_classes: list[str] | None = None, epoch_eval: bool = True) -> dict:
    """Run GPUSQ (``gpusq.engine.compress``) on a trained dense classifier ``teacher``; write the
    compressed model and reports to ``out``; return the report.

    The data, one of two ways:

    * ``data=DataOptions(PATH, ...)``: an ImageFolder / .zip / ``mnist5k`` read by gpusq (its
      normalization, the recipe's augmentation, torchrun shards, exact resume), as ``gpusq compress``;
    * ``train=`` / ``val=`` (and optionally ``calib=``): your own re-iterables of ``(inputs, labels)``
      batches, e.g. ``torch.utils.data.DataLoader`` s; inputs as the model takes them. ``calib``: the
      un-augmented batches for activation calibration and the layer-importance measurement (default:
      ``train``). ``seed`` (default 0) seeds the run. What holds for resume and torchrun, and what is
      refused: ``gpusq.userdata``.

    ``out``: a new or empty directory. One that holds anything else is refused (one line), unless it
    holds an interrupted run and ``resume`` (continue it: the recipe, seed, model and data must be the
    interrupted run's) or ``overwrite`` (an earlier gpusq output there is replaced; your own files are
    kept) — as the CLI's ``--resume`` / ``--overwrite``.

    ``teacher_classes``: the class names the teacher was trained on, in label order (default: those
    ``resolve_model`` attached as ``teacher.gpusq_classes``); the data's must be the same, else a
    one-line error before any training (without names, the teacher's head size is checked). The
    output records the classes (with ``train=``, these names, if any).

    ``stage1_from``: reuse the stage-1 result of an earlier run (its ``out/stage1`` directory) and
    go straight to stage 2 (how the ablations share one sparse fine-tuning).

    ``epoch_eval=False``: no validation pass after every epoch (the history has training metrics
    only; the stage and final metrics are measured as always), for sweeps of many short runs.
    """
    _check_data_args(data, out, train, val, calib, seed)
    if train is not None:
        from gpusq.userdata import UserBatches, check_recipe_for_loaders

        check_recipe_for_loaders(recipe)
    seed = data.seed if data is not None else (seed or 0)
    device = _run_device(device)
    if teacher_classes is None:
        teacher_classes = getattr(teacher, "gpusq_classes", None)
    head = head_size(teacher)
    if train is not None:  # the loaders are checked before out is touched (their batches as they come)
        train_batches = UserBatches(train, "train", head, seed=seed)
        val_batches = UserBatches(val, "val", head, seed=seed, need_len=False)
        calib_batches = None if calib is None else UserBatches(calib, "calib", head, seed=seed, need_len=False)
        classes: list[str] | None = list(teacher_classes) if teacher_classes is not None else None
        if classes is not None and head is not None and len(classes) != head:
            raise GpusqError(f"teacher_classes names {len(classes)} classes but the teacher predicts {head}")
    out = _open_out(Path(out), resume, overwrite)
    model_kwargs = model_kwargs or {}
    seed_everything(seed)
    teacher = teacher.to(device).eval()
    D.broadcast_module_(teacher)  # replicated teacher: identical on every rank, so are the masks
    size = model_input_size(teacher)
    family = _family_of(model_name)
    if data is not None:
        bs = recipe.loader_batch_size(data.batch_size)
        loaders = build_loaders(data, size, bs, device, augment=recipe.augment)
        classes = loaders.info.classes
        check_classes(teacher_classes, head, classes, who="the teacher", data=data.data,
                      label_names=getattr(teacher, "gpusq_label_names", None))
        adapter = ClassificationAdapter(loaders.val, device, flip=loaders.info.flip, crop_pad=loaders.info.crop_pad,
                                        input_size=size, augment=recipe.augment,
                                        num_classes=loaders.info.num_classes,
                                        shard=(loaders.train.rank, loaders.train.world),
                                        norm=model_norm(teacher), family=family)
        train_batches, calib_batches, where, batch_size = loaders.train, None, data.data, data.batch_size
        run = {"data": str(Path(data.data).resolve()) if Path(data.data).exists() else data.data, "batch_size": bs}
    else:
        adapter = ClassificationAdapter(val_batches, device, flip=False, crop_pad=0.0, input_size=size,
                                        augment=recipe.augment, num_classes=head or 0,
                                        shard=(train_batches.rank, train_batches.world), ready=True,
                                        family=family)
        where, batch_size = f"{type(train).__name__} (Python)", None
        run = {"data": where, "train_batches": len(train_batches)}
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    _same_run(ck, {"recipe": recipe.to_dict(), "seed": seed, "model": model_name, "model_kwargs": model_kwargs,
                   **run}, resume, out)
    if classes is not None:
        _run_classes(ck, classes, resume, where)
    header = {"kind": "compressed", "model": model_name, "model_kwargs": model_kwargs, "data": where,
              "classes": classes}
    return engine.compress(adapter, teacher, recipe, out, train_batches, device=device, model_name=model_name,
                           model_kwargs=model_kwargs, classes=classes, report=header, seed=seed,
                           batch_size=batch_size, resume=resume, progress=progress, ckpt_every=ckpt_every,
                           stage1_from=stage1_from, compile=compile, epoch_eval=epoch_eval,
                           calib_batches=calib_batches)


def _family_of(model_name: str | None):
    """The ``gpusq.families`` record of ``model_name`` (None for a model gpusq did not build by name)."""
    from gpusq import families

    if not model_name:
        return None
    try:
        return families.lookup(model_name, "classification")
    except GpusqError:
        return None


def _check_data_args(data: DataOptions | None, out: str | Path | None, train: Iterable | None,
                     val: Iterable | None, calib: Iterable | None, seed: int | None) -> None:
    """The data given one way, with what goes with it: one-line errors before any work."""
    if out is None:
        raise GpusqError("compress needs out=DIR (a new or empty directory)")
    if (data is None) == (train is None):
        raise GpusqError("compress takes its data one way: data=DataOptions(PATH) or train=/val= (your loaders)"
                         + (", not both" if data is not None else ""))
    if data is not None:
        if not isinstance(data, DataOptions):
            raise GpusqError(f"data= takes DataOptions(PATH, ...), got {type(data).__name__}; pass your own "
                             "loader as train= (and val=)")
        if val is not None or calib is not None:
            raise GpusqError("val= / calib= go with train=; DataOptions reads the val split of its own data")
        if seed is not None and seed != data.seed:
            raise GpusqError(f"seed={seed} but DataOptions(seed={data.seed}); set the seed in DataOptions")
    elif val is None:
        raise GpusqError("train= needs val= too: the teacher, each stage and the output are evaluated on it")


def _run_device(device: torch.device | None) -> torch.device:
    """The run's device; under torchrun this rank joins the process group (and takes its GPU) even when
    the caller names the device."""
    if device is None:
        return device_of(None)
    return D.init_from_env(device.type) or device


def _open_out(out: Path, resume: bool, overwrite: bool) -> Path:
    """``out`` checked as the CLI checks ``--out`` (``gpusq.outdir``), then created. ``overwrite``: an
    earlier gpusq output's files go now; files of your own are kept and may be there without one (as
    ``gpusq compress --overwrite`` leaves the directory), unless one has a name gpusq writes."""
    from gpusq import outdir

    if overwrite and not resume and out.is_dir() and not outdir.is_gpusq_output(out):
        taken = [n for n in outdir.OUTPUT_ENTRIES if (out / n).exists() and not outdir.is_scaffolding(out / n)]
        if taken:
            raise GpusqError(f"out {out} holds {taken[0]}, not written by gpusq; choose a new or empty directory")
    else:
        outdir.check_out_dir(out, overwrite=overwrite, resume=resume, flags=outdir.PYTHON_FLAGS)()
    _prepare_out(out, resume)
    return out


def _same_run(ck: Path, record: dict, resume: bool, out: Path) -> None:
    """Record a run's settings with its checkpoints; a resumed run must have the same ones."""
    f = ck / "run.json"
    record = json.loads(json.dumps(record, default=str))
    if resume and f.is_file():
        old = json.loads(f.read_text())
        for k, v in record.items():
            if k in old and old[k] != v:
                shown = f" ({_short(old[k])} → {_short(v)})" if k != "recipe" else ""
                raise GpusqError(f"{out} holds an interrupted run with another {k.replace('_', ' ')}{shown}; "
                                 "resume it with its own settings, or start over in a new directory")
    elif D.is_main():
        atomic_write_text(f, json.dumps(record) + "\n")


def _short(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


# -- evaluation -----------------------------------------------------------------------------------
def load_any(checkpoint: str, model: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """A gpusq output (dense or compressed) or a foreign weights file, ready for evaluation."""
    from gpusq import families
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
            net = families.build(model, **(model_kwargs or {})) if model else None
            return load_compressed(p if p.is_dir() else p.parent, model=net)[0]
    return resolve_model(model, model_kwargs or {}, checkpoint)[0]


def eval_checkpoint(checkpoint: str, data: DataOptions, model: str | None = None,
                    model_kwargs: dict | None = None, device: torch.device | None = None,
                    progress: bool = True) -> dict:
    """Top-1/top-5 of ``checkpoint`` on the val split of ``data``, whose classes must be the ones the
    checkpoint records (without names: as many as its head has)."""
    device = device or device_of(None)
    net = load_any(checkpoint, model, model_kwargs).to(device)
    val_ds, info = build_dataset(data.data, "val", model_input_size(net), data.skip_bad_images)
    check_classes(recorded_classes(checkpoint), head_size(net), info.classes, who=f"checkpoint {checkpoint}",
                  data=data.data, label_names=getattr(net, "gpusq_label_names", None))
    val = Batches(val_ds, data.batch_size or 256, shuffle=False, workers=data.workers, pin=device.type == "cuda",
                  rank=D.rank(), world=D.world(), even=False)
    return evaluate(net, val, device, progress=progress)


# -- CLI ----------------------------------------------------------------------------------------------
