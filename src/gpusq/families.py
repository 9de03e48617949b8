"""The model families gpusq builds, in one place: a reader looking for "what does gpusq know about
this model" finds it here.

A ``Family`` record knows how its models are built (offline, random weights: nothing is downloaded),
which of their GEMM layers GPUSQ compresses (``include``, regexes on module names as in
``sparsity.include``), which layers feature KD matches (``features``), which modules ``gpusq.deploy`` /
``gpusq bench`` compile one by one (``compile_regions``; empty: no GPU deployment path), its input
size, the task it serves and what it leaves dense. ``lookup(name, task)`` finds the family of a model
name (a one-line ``GpusqError`` with close matches otherwise) and ``build(name, task, **kwargs)``
builds the model: training, ``stats``, ``bench``, ``deploy``, ``export`` and checkpoint loading all
build models here.

=========  ==============  ====================================================================
family     task            models
=========  ==============  ====================================================================
maskrcnn   detection       ``maskrcnn_swin_t``, ``maskrcnn_swin_test`` (torchvision on timm Swin)
detr       detection       ``detr_r50``, ``deformable_detr_r50``, ``detr_test``, ``deformable_detr_test``
upernet    segmentation    ``upernet_swin_t``, ``upernet_swin_test`` (transformers)
hf-vit     classification  ``ViTForImageClassification``, ``DeiTForImageClassification``,
                           ``DeiTForImageClassificationWithTeacher`` (transformers; a local HF directory)
hf-swin    classification  ``SwinForImageClassification`` (transformers; a local HF directory)
timm       classification  every timm name (``timm.is_model``), facts from timm's ``pretrained_cfg``
=========  ==============  ====================================================================

How a task trains (its losses, logit KD, data, evaluation) is not a family's business: that is the
task adapters' (``gpusq.pipeline``, ``gpusq.tasks``), which take their model-side facts from here.
The builders of the dense-prediction models live in ``gpusq.tasks.models``; timm, torchvision and
transformers are imported only when a model is built, so importing this module is cheap.

A new family is one more record given to ``register``: families with named models are searched
before timm's open catalogue, so a name is never taken by timm first, and ``lookup(...,
task="classification")`` then lists it too. The Hugging Face families (``gpusq.hf``) name their models
by HF architecture (random weights from an HF config given as ``config=``, default transformers'
defaults) and also know a local HF directory (``config.json`` + weights) as a name: building one loads
its weights, so ``stats`` / ``bench`` / ``deploy`` take ``--model ./my-vit`` too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gpusq import hf
from gpusq.distill import DEFAULT_FEATURE_PATTERN
from gpusq.errors import GpusqError, close_matches
from gpusq.sparsity import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, FilterFn, SparsityConfig
from gpusq.tasks import models as builders

TASKS = ("classification", "detection", "segmentation")

# Modules compiled one by one (deploy, bench): the repeated transformer blocks (compiled once, reused by
# every block of the same shape, which keeps compile time low) and the few modules around them.
BLOCK_COMPILE_REGIONS = (r"(^|\.)blocks\.\d+$", r"^patch_embed$", r"(^|\.)downsample$")


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: how its models are built and which of their layers the method touches."""

    name: str
    task: str  # classification | detection | segmentation
    builders: Mapping[str, Callable[..., nn.Module]]  # model name -> builder (kwargs -> random-init model)
    include: tuple[str, ...]  # the GEMMs GPUSQ compresses (unless a recipe names its own sparsity.include)
    features: str  # the layers feature KD matches (unless a recipe sets distill.features)
    compile_regions: tuple[str, ...] = ()  # compiled one by one when deployed / benchmarked; () = not deployed
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) of the full-size models
    dense_layers: str = ""  # what stays dense, in words (report.json)
    test_models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # CPU-sized models + kwargs

    def knows(self, name: str) -> bool:
        return name in self.builders

    def names(self) -> list[str]:
        """The model names this family builds (what help texts and errors list)."""
        return list(self.builders)

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """``name`` with random weights; a one-line error for an unknown name or keyword."""
        if not self.knows(name):
            raise _unknown(name, self.task, [self])
        try:
            return self._create(name, kwargs)
        except TypeError as e:
            raise GpusqError(f"model '{name}' does not take these arguments: {e}") from None

    def _create(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        return self.builders[name](**kwargs)

    def input_size_of(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) a built model of this family takes (its own patch embedding's size where it has one)."""
        return model_input_size(model, self.input_size)

    def sparsity_config(self, recipe: SparsityConfig) -> SparsityConfig:
        """The recipe's 2:4 selection on this family: its own GEMMs unless the recipe names its own include."""
        return recipe.on_family(self.include)

    def gemm_filter(self, exclude: Sequence[str] = (), prefix: str = "") -> FilterFn:
        """``filter_fn(name, module)`` (``sparsify_`` / ``prepare_``) selecting this family's GEMMs minus the
        classifier heads and ``exclude``; ``prefix``: the names are those of the model's submodule ``prefix``
        (the benchmark deploys Mask R-CNN's Swin body, ``backbone.body.``, alone)."""
        inc = [re.compile(p) for p in self.include]
        exc = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *exclude)]

        def select(name: str, module: nn.Module) -> bool:  # noqa: ARG001 - the filter_fn signature
            full = prefix + name
            return any(p.search(full) for p in inc) and not any(p.search(full) for p in exc)

        return select


@dataclass(frozen=True, eq=False)
class TimmFamily(Family):
    """timm's catalogue as one family: a name is a model when ``timm.is_model`` says so; the input size,
    classifier and first conv are timm's own ``pretrained_cfg`` (data shipped with timm, no download)."""

    open: bool = True  # names are timm's: not listed, searched after every family with named models

    def knows(self, name: str) -> bool:
        import timm

        return bool(timm.is_model(name))

    def names(self) -> list[str]:
        import timm

        return list(timm.list_models())

    def _create(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        import timm

        if kwargs.get("pretrained"):
            raise GpusqError(f"pretrained=True: gpusq downloads no weights; pass your own with --teacher FILE "
                             f"--model {name} (a .safetensors / .pth state dict)")
        return timm.create_model(name, **{**kwargs, "pretrained": False})

    def meta(self, name: str) -> dict[str, Any]:
        """timm's metadata of ``name``: ``classifier`` (module name(s) of the head), ``first_conv`` (the
        patch embedding's conv of a ViT) and ``input_size`` (C, H, W) at the default resolution."""
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name, allow_unregistered=True) if self.knows(name) else None
        if cfg is None:
            return {"classifier": None, "first_conv": None, "input_size": self.input_size}
        return {"classifier": cfg.classifier, "first_conv": cfg.first_conv, "input_size": tuple(cfg.input_size)}


def compile_regions_of(model: nn.Module) -> tuple[str, ...]:
    """The modules ``deploy`` / ``bench`` compile one by one in ``model``: its Hugging Face family's
    (encoder layers / Swin blocks) for an HF classifier, else the timm-style blocks."""
    arch = (getattr(model, "gpusq_hf", None) or {}).get("architecture")
    for f in FAMILIES:
        if arch and isinstance(f, HFFamily) and arch in f.builders:
            return f.compile_regions
    return BLOCK_COMPILE_REGIONS


def model_input_size(model: nn.Module, default: tuple[int, int, int] = (3, 224, 224)) -> tuple[int, int, int]:
    """(C, H, W) ``model`` takes: its patch embedding's image size (a timm ViT / Swin built with
    ``img_size=...``), else timm's ``pretrained_cfg`` input size, else ``default``."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (chans, int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", default))  # type: ignore[return-value]


# -- the families ----------------------------------------------------------------------------------
MASKRCNN = Family(
    name="maskrcnn", task="detection",
    builders={"maskrcnn_swin_t": builders.maskrcnn_swin_t, "maskrcnn_swin_test": builders.maskrcnn_swin_test},
    # the backbone's transformer-block linears, whatever prefix wraps them ("backbone.body.layers_0.blocks.1.mlp.fc1")
    include=(r"(^|\.)backbone\.body\.(.+\.)?blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$",),
    # the outputs of the backbone's transformer blocks and of the FPN (its output convs P2-P5)
    features=r"(^|\.)backbone\.(body\.(.+\.)?blocks\.\d+|fpn\.layer_blocks\.\d+)$",
    compile_regions=BLOCK_COMPILE_REGIONS,  # of the Swin body, the part the GPU kernels run
    input_size=(3, 800, 1344),
    dense_layers="everything outside the backbone's transformer blocks (patch embedding, patch merging, "
                 "FPN, RPN and RoI heads)",
    test_models={"maskrcnn_swin_test": {}},
)
DETR = Family(
    name="detr", task="detection",
    builders={"detr_r50": builders.detr_r50, "deformable_detr_r50": builders.deformable_detr_r50,
              "detr_test": builders.detr_test, "deformable_detr_test": builders.deformable_detr_test},
    # every Linear inside an encoder / decoder layer (names differ across transformers versions: out_proj vs
    # o_proj, fc1 vs mlp.fc1); select_layers picks only Linear / Conv2d modules
    include=(r"^model\.(encoder|decoder)\.layers\.\d+\..+",),
    # each encoder layer's output (tokens of the image) and each decoder layer's (queries)
    features=r"^model\.(encoder|decoder)\.layers\.\d+$",
    compile_regions=(),  # no GPU deployment path yet
    input_size=(3, 800, 1333),
    dense_layers="the ResNet backbone, input projection, query embeddings and the class / box heads",
    test_models={"detr_test": {}, "deformable_detr_test": {}},
)
UPERNET = Family(
    name="upernet", task="segmentation",
    builders={"upernet_swin_t": builders.upernet_swin_t, "upernet_swin_test": builders.upernet_swin_test},
    # every Linear inside a backbone Swin block (q/k/v/o projections and the MLP; named differently across
    # transformers versions, hence the loose tail); the UPerNet head is convs
    include=(r"(^|\.)backbone\.(.+\.)?blocks\.\d+\..+",),
    features=r"(^|\.)backbone\.(.+\.)?blocks\.\d+$",
    compile_regions=BLOCK_COMPILE_REGIONS,
    input_size=(3, 512, 512),
    dense_layers="everything outside the backbone's transformer blocks (patch embedding, patch merging, "
                 "UPerNet decode and auxiliary heads)",
    test_models={"upernet_swin_test": {}},
)
TIMM = TimmFamily(
    name="timm", task="classification", builders={},
    include=tuple(DEFAULT_INCLUDE),  # a Linear inside a transformer block + the patch embedding (first_conv)
    features=DEFAULT_FEATURE_PATTERN,  # the transformer blocks' outputs
    compile_regions=BLOCK_COMPILE_REGIONS,
    dense_layers="the classifier head, norms and everything outside the transformer blocks but the patch "
                 "embedding",
    test_models={"deit_tiny_patch16_224": dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2),
                 "swin_tiny_patch4_window7_224": dict(img_size=16, patch_size=2, window_size=4, embed_dim=32,
                                                      depths=(2,), num_heads=(2,))},
)


@dataclass(frozen=True, eq=False)
class HFFamily(Family):
    """Hugging Face image classifiers: a model is an architecture name (random weights, ``config=`` an HF
    config dict + HF config fields as overrides) or a local ``save_pretrained`` directory (its weights)."""

    def knows(self, name: str) -> bool:
        if name in self.builders:
            return True
        if not hf.is_hf_dir(name):
            return False
        try:
            return hf.read_dir(name)[0] in self.builders
        except GpusqError:
            return False

    def _create(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        if name in self.builders:
            return self.builders[name](**kwargs)
        hf.check_no_overrides(name, kwargs)
        import torch

        if torch.empty(0).device.type == "meta":  # stats builds on meta: shapes only, the weights are not read
            arch, config, pre = hf.read_dir(name)
            return self.builders[arch](config=config, preprocessor=pre)
        return hf.load_dir(name)[0]


HF_VIT_ARCHS = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
HF_VIT = HFFamily(
    name="hf-vit", task="classification", builders={a: hf.builder(a) for a in HF_VIT_ARCHS},
    # every Linear of an encoder layer (query / key / value, attention output, intermediate, output dense:
    # named encoder.layer.N.attention.attention.query ... before transformers 5, layers.N.attention.q_proj /
    # mlp.fc1 ... since) and the patch-embedding conv; the classifier(s) stay dense
    include=(r"^(vit|deit)\.(encoder\.)?layers?\.\d+\..+", r"^(vit|deit)\.embeddings\.patch_embeddings\.projection$"),
    features=r"^(vit|deit)\.(encoder\.)?layers?\.\d+$",  # the encoder layers' outputs
    compile_regions=(r"^(vit|deit)\.(encoder\.)?layers?\.\d+$", r"^(vit|deit)\.embeddings$"),
    dense_layers="the classifier(s) (cls / distillation heads), norms, embeddings but the patch projection",
)
HF_SWIN = HFFamily(
    name="hf-swin", task="classification", builders={"SwinForImageClassification": hf.builder(
        "SwinForImageClassification")},
    include=(r"^swin\.encoder\.layers\.\d+\.blocks\.\d+\..+", r"^swin\.embeddings\.patch_embeddings\.projection$"),
    features=r"^swin\.encoder\.layers\.\d+\.blocks\.\d+$",  # each Swin block's output, as timm's Swin
    compile_regions=(r"^swin\.encoder\.layers\.\d+\.blocks\.\d+$", r"^swin\.embeddings$",
                     r"^swin\.encoder\.layers\.\d+\.downsample$"),
    dense_layers="the classifier, norms, patch merging and embeddings but the patch projection",
)

# Searched in this order: families with named models first, timm's open catalogue last.
FAMILIES: list[Family] = [MASKRCNN, DETR, UPERNET, HF_VIT, HF_SWIN, TIMM]


def _is_open(f: Family) -> bool:
    return bool(getattr(f, "open", False))


def register(family: Family) -> Family:
    """Add a family (searched before timm's catalogue); its name and model names must be new."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a family named {family.name!r} is registered already")
    if family.task not in TASKS:
        raise ValueError(f"family {family.name!r}: unknown task {family.task!r} (known: {', '.join(TASKS)})")
    taken = [n for n in family.names() for f in FAMILIES if f.knows(n)]
    if taken:
        raise ValueError(f"family {family.name!r}: model {taken[0]!r} belongs to another family already")
    closed = [f for f in FAMILIES if not _is_open(f)]
    FAMILIES[:] = [*closed, family, *(f for f in FAMILIES if _is_open(f))]
    return family


def check_task(task: str) -> str:
    """``task`` if it is one gpusq knows; else a one-line error with close matches."""
    if task not in TASKS:
        near = close_matches(task, TASKS)
        raise GpusqError(f"unknown task {task!r}" + (f"; did you mean: {near}?" if near else "")
                         + f" (known: {', '.join(TASKS)})")
    return task


def of_task(task: str | None = None) -> list[Family]:
    """The registered families (of ``task``), in search order."""
    return [f for f in FAMILIES if task is None or f.task == check_task(task)]


def names(task: str | None = None) -> list[str]:
    """The named models (of ``task``) for help texts; timm's catalogue is not listed."""
    return [n for f in of_task(task) if not _is_open(f) for n in f.names()]


def lookup(name: str, task: str | None = None) -> Family:
    """The family that builds model ``name`` (for ``task`` when given); else a one-line ``GpusqError`` with
    close matches (and the task the name belongs to, when it is another one's)."""
    fams = of_task(task)
    for f in fams:
        if f.knows(name):
            return f
    other = next((f for f in FAMILIES if f not in fams and f.knows(name)), None)
    raise _unknown(name, task, fams, other)


def build(name: str, task: str | None = None, **kwargs: Any) -> nn.Module:
    """Model ``name`` (of ``task``), random weights, nothing downloaded."""
    return lookup(name, task).build(name, **kwargs)


def _unknown(name: str, task: str | None, fams: list[Family], other: Family | None = None) -> GpusqError:
    """The one-line error for a name none of ``fams`` builds: the task it belongs to when it is another
    one's; else close matches (classification, timm's open catalogue) and, for a task, its models."""
    what = "model" if task in (None, "classification") else f"{task} model"
    if other is not None:
        return GpusqError(f"unknown {what} '{name}': it is a {other.task} model (--task {other.task})")
    near = close_matches(name, [n for f in fams for n in f.names()])
    if task in (None, "classification"):
        return GpusqError(f"unknown model '{name}'" + (f" (close matches: {near})" if near else ""))
    known = [n for f in fams if not _is_open(f) for n in f.names()]
    return GpusqError(f"unknown {what} '{name}'" + (f"; did you mean: {near}?" if near else "")
                      + f" (known: {', '.join(known)})")
