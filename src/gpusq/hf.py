"""Hugging Face ``transformers`` image classifiers in and out: ViT, DeiT (with and without the
distillation token) and Swin, from a local ``save_pretrained`` directory.

In: ``load_dir(DIR)`` reads ``DIR/config.json`` + its weights offline (``local_files_only``) into a model
that takes images and returns logits (the HF class with ``forward(images) -> .logits``: the engine,
the adapters and export want a tensor), with the same module and state-dict names as the HF model, so
the ``gpusq.families`` records (``HF_VIT``, ``HF_SWIN``) select its GEMMs by HF's own names. The model
is recorded as its architecture name (``ViTForImageClassification``) + ``config`` (the HF config as a
dict) + ``preprocessor`` (``preprocessor_config.json``, if any) as model kwargs: a gpusq output rebuilds
it from its model.yaml without the original directory. Input size and mean / std come from the
preprocessor config (else the config's ``image_size`` and HF's defaults) and reach the data pipeline
as ``model.gpusq_norm`` (``gpusq.data.model_norm``).

Out: ``save_hf_dir(model, info, DIR)`` writes a directory ``AutoModelForImageClassification`` loads,
holding the compressed model's effective weights (2:4 zeros, on-grid quantized values) as dense
floats; activation quantization is not representable there and is left out (README.md written there).

transformers is imported only when a model is built or written: ``import gpusq.hf`` is cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpusq.data import MEAN, STD
from gpusq.errors import GpusqError

# architecture -> (config class, model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "ViTForImageClassification": ("ViTConfig", "vit"),
    "DeiTForImageClassification": ("DeiTConfig", "deit"),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", "deit"),
    "SwinForImageClassification": ("SwinConfig", "swin"),
}
DEFAULT_ARCH = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification",
                "swin": "SwinForImageClassification"}
# HF's processors' defaults where a directory has no preprocessor_config.json: ViTImageProcessor
# (ViT and, on the hub, Swin's processor class) normalizes with 0.5 / 0.5 unless told; DeiT's and the
# Swin checkpoints' configs use the ImageNet statistics.
IMAGENET = (MEAN[3], STD[3])  # gpusq's standard normalization (timm's ImageNet statistics)
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DEFAULT_NORM = {"vit": HALF, "deit": IMAGENET, "swin": IMAGENET}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# model keywords spelled the timm way (tests, stats, bench pass these) -> the HF config's
ALIASES = {"num_classes": "num_labels", "img_size": "image_size", "in_chans": "num_channels"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DROP = ("_name_or_path", "transformers_version")  # config fields that name a place or a version, not the model


def is_hf_dir(path: str | Path | None) -> bool:
    """A directory holding a Hugging Face ``config.json`` (gpusq outputs hold none)."""
    return bool(path) and Path(str(path)).is_dir() and (Path(str(path)) / "config.json").is_file()


def check_not_hub_id(value: str | None) -> None:
    """A one-line error for ``org/name`` that is no local path: gpusq works offline."""
    if not value or Path(value).exists() or not _HUB_ID.match(value):
        return
    if Path(value).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".yaml", ".zip"):
        return
    raise GpusqError(f"'{value}' is not a local path and looks like a Hugging Face hub id: gpusq downloads "
                     f"nothing; pass a local directory (e.g. `hf download {value} --local-dir DIR`, or "
                     "save_pretrained(DIR)) holding config.json and the weights")


def model_class(arch: str) -> type[nn.Module]:
    """The HF class of ``arch`` whose ``forward(images)`` returns the logits tensor (same modules and
    state-dict names as the HF class; cached so every model of an architecture shares one class)."""
    if arch not in _CLASSES:
        import transformers

        base = getattr(transformers, arch)

        class Logits(base):  # type: ignore[misc, valid-type]
            """An HF image classifier for gpusq: ``images -> logits`` (the DeiT with-teacher model's
            logits are HF's, the mean of its two heads)."""

            def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
                return super().forward(pixel_values=pixel_values, **kwargs).logits

        Logits.__name__ = Logits.__qualname__ = f"Gpusq{arch}"
        _CLASSES[arch] = Logits
    return _CLASSES[arch]


_CLASSES: dict[str, type[nn.Module]] = {}


def _config(arch: str, config: dict | None, overrides: dict) -> Any:
    import transformers

    cfg_name, model_type = ARCHITECTURES[arch]
    d = {k: v for k, v in (config or {}).items() if k not in _DROP}
    d.update({ALIASES.get(k, k): v for k, v in overrides.items()})
    if "id2label" in d and "num_labels" in overrides:  # a new head size: HF's labels follow it
        d.pop("id2label")
        d.pop("label2id", None)
    d["architectures"] = [arch]
    try:
        return getattr(transformers, cfg_name)(**d)
    except (TypeError, ValueError) as e:
        raise GpusqError(f"{arch}: the config does not build ({str(e).splitlines()[0] if str(e) else e})") from None


def preprocessing(config: Any, preprocessor: dict | None) -> dict[str, Any]:
    """``{"input_size": (C, H, W), "mean": ..., "std": ...}`` of a model: its preprocessor config's size
    (the crop when it center-crops) and normalization, else the config's ``image_size`` and HF's
    default normalization of the model type."""
    c = int(getattr(config, "num_channels", 3))
    img = config.image_size
    h, w = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    mean, std = DEFAULT_NORM.get(config.model_type, IMAGENET) if c == 3 else ((0.5,) * c, (0.5,) * c)
    if preprocessor:
        size = preprocessor.get("crop_size") if preprocessor.get("do_center_crop") else preprocessor.get("size")
        if isinstance(size, int):
            h = w = size
        elif isinstance(size, dict) and "height" in size:
            h, w = int(size["height"]), int(size["width"])
        elif isinstance(size, dict) and "shortest_edge" in size:
            h = w = int(size["shortest_edge"])
        if preprocessor.get("do_normalize", True):
            mean = tuple(preprocessor.get("image_mean", mean))
            std = tuple(preprocessor.get("image_std", std))
        else:
            mean, std = (0.0,) * c, (1.0,) * c
    return {"input_size": (c, int(h), int(w)), "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std)}


def label_names(config: Any) -> list[str] | None:
    """The config's ``id2label`` names in label order; None where they are transformers' ``LABEL_i``
    placeholders (no names given)."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(int(config.num_labels))]
    except (KeyError, ValueError, TypeError):
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _attach(model: nn.Module, arch: str, preprocessor: dict | None) -> nn.Module:
    """What gpusq reads off a model: input size (``pretrained_cfg``, as timm's), normalization, head size."""
    pre = preprocessing(model.config, preprocessor)
    model.pretrained_cfg = pre
    model.gpusq_norm = (pre["mean"], pre["std"])
    model.num_classes = int(model.config.num_labels)
    model.gpusq_label_names = label_names(model.config)
    model.gpusq_hf = {"architecture": arch, "preprocessor": preprocessor}
    return model


def builder(arch: str):
    """The ``gpusq.families`` builder of ``arch``: random weights from ``config`` (an HF config as a dict;
    default: transformers' defaults, e.g. ViT-B/16 224 px, Swin-T) with ``overrides`` (HF config fields,
    or timm's ``num_classes`` / ``img_size``); ``preprocessor``: a preprocessor_config.json as a dict."""

    def build(config: dict | None = None, preprocessor: dict | None = None, pretrained: bool = False,
              **overrides: Any) -> nn.Module:
        if pretrained:
            raise GpusqError(f"pretrained=True: gpusq downloads no weights; pass a local Hugging Face directory "
                             f"(--teacher DIR) for {arch}")
        cfg = _config(arch, config, overrides)
        cfg._attn_implementation = "sdpa"
        return _attach(model_class(arch)(cfg), arch, preprocessor)

    build.__name__ = f"build_{arch}"
    return build


def check_no_overrides(path: str | Path, overrides: dict) -> None:
    """A directory's config.json sets its model: constructor overrides (``--model-arg``) are one line."""
    if overrides:
        raise GpusqError(f"{path} is a Hugging Face directory: its config.json sets the model "
                         f"(no --model-arg: got {', '.join(overrides)})")


def read_dir(path: str | Path) -> tuple[str, dict, dict | None]:
    """(architecture, config.json, preprocessor_config.json or None) of an HF directory; one-line
    errors for one gpusq cannot use."""
    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GpusqError(f"{p}/config.json is not readable JSON ({e})") from None
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:
        arch = DEFAULT_ARCH.get(model_type or "")
    if arch is None or ARCHITECTURES[arch][1] != model_type:
        what = ", ".join(archs) or f"model_type {model_type!r}"
        raise GpusqError(f"{p} holds a Hugging Face {what} model, not an image classifier gpusq supports "
                         f"({', '.join(ARCHITECTURES)})")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise GpusqError(f"{p} has a config.json but no weights ({' / '.join(WEIGHT_FILES[::2])})")
    pre = None
    if (p / "preprocessor_config.json").is_file():
        try:
            pre = json.loads((p / "preprocessor_config.json").read_text())
        except json.JSONDecodeError as e:
            raise GpusqError(f"{p}/preprocessor_config.json is not JSON ({e})") from None
    return arch, config, pre


@contextmanager
def _quiet(errors_only: bool = False) -> Iterator[None]:
    """transformers without progress bars (and, ``errors_only``, without warnings) inside the block; its
    settings restored after."""
    import transformers

    log = transformers.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    if errors_only:
        log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def load_dir(path: str | Path) -> tuple[nn.Module, str, dict]:
    """(model with the directory's weights, its architecture name, its model kwargs: ``config`` and
    ``preprocessor``), read offline; a config/weights mismatch is one line."""
    arch, _, pre = read_dir(path)
    cls = model_class(arch)
    try:
        with _quiet(errors_only=True):  # the mismatches are reported below, in one line
            model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True, dtype=torch.float32,
                                              attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GpusqError(f"{path}: transformers could not load it ({first})") from None
    problems = []
    mism = sorted(info.get("mismatched_keys") or [])
    if mism:
        k = mism[0]
        problems.append(f"shape of '{k[0]}' is {tuple(k[1])}, config.json makes {tuple(k[2])}"
                        if isinstance(k, tuple) and len(k) == 3 else f"{len(mism)} keys of another shape ('{k}')")
    for what in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(what) or [])
        if keys:
            problems.append(f"{len(keys)} {what.replace('_', ' ')} (e.g. '{keys[0]}')")
    if problems:
        raise GpusqError(f"{path}: the weights do not match its config.json: " + "; ".join(problems))
    model.eval()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _DROP}
    config = json.loads(json.dumps(config, default=str))  # plain JSON / YAML types (id2label keys as strings)
    kwargs = {"config": config, "preprocessor": pre}
    return _attach(model, arch, pre), arch, kwargs


MASK_FREE_SDPA = "gpusq_sdpa"


def mask_free_attention_(model: nn.Module) -> int:
    """Run ``model``'s SDPA attention with no attention mask ever built; returns how many configs changed.

    Images have no padding, so a mask is never needed, and transformers skips it (``None``) for "sdpa" --
    except, in some versions, while a CUDA graph is being captured, where it materializes a full mask: the
    compiled layers then see a new input in the capture and recompile inside it, which fails. An attention
    implementation registered without a mask function (SDPA itself) makes transformers skip the mask always.
    """
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # older transformers: attention modules of their own, no mask built for images
        return 0
    AttentionInterface.register(MASK_FREE_SDPA, sdpa_attention_forward)
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    for c in configs.values():
        c._attn_implementation = MASK_FREE_SDPA
    return len(configs)


def is_hf_model(model: nn.Module) -> bool:
    return getattr(model, "gpusq_hf", None) is not None


def check_hf_model(model: nn.Module) -> None:
    """A one-line error unless ``model`` is an HF classifier (what ``save_hf_dir`` can write)."""
    if not is_hf_model(model):
        raise GpusqError("this model is not a Hugging Face classifier (it was not loaded from an HF directory "
                         "or built as one): --format hf writes those only")


def save_hf_dir(model: nn.Module, out: str | Path, recipe_name: str = "", classes: list[str] | None = None) -> Path:
    """Write ``model`` (a gpusq HF model, compressed or not) as a ``save_pretrained`` directory: the
    effective weights (2:4 zeros, on-grid quantized values) as dense float32; activation quantizers
    are not representable in transformers and are left out (their static scales go to
    ``gpusq_quant.json``). ``classes``: the data's class names, written as ``id2label``."""
    from gpusq.layers import compressed_layers

    check_hf_model(model)
    arch = model.gpusq_hf["architecture"]
    import transformers

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [arch]
    if classes is not None and len(classes) == config.num_labels:
        config.id2label = {i: str(c) for i, c in enumerate(classes)}
        config.label2id = {str(c): i for i, c in enumerate(classes)}
    plain = getattr(transformers, arch)(config)
    layers = compressed_layers(model)
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, dict] = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if ".weight_quant." in k or ".input_quant." in k or k.endswith(".weight_mask"):
                continue
            state[k] = v.detach().float().cpu()
        for name, layer in layers.items():
            state[f"{name}.weight"] = layer.effective_weight().detach().float().cpu()
            scales[name] = {"sparse_2to4": layer.weight_mask is not None,
                            "weight": layer.weight_quant.spec.dtype if layer.weight_quant is not None else None,
                            "input_scale": float(layer.input_quant.scale) if layer.input_quant is not None else None}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GpusqError(f"the model does not map onto {arch}: missing {list(missing)[:2]}, "
                         f"unexpected {list(unexpected)[:2]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet():
        plain.save_pretrained(str(out))
    pre = dict(model.gpusq_hf.get("preprocessor") or {})
    if not pre:
        p = model.pretrained_cfg
        pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p["mean"]),
               "image_std": list(p["std"]), "size": {"height": p["input_size"][1], "width": p["input_size"][2]},
               "resample": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "gpusq_quant.json").write_text(json.dumps(scales, indent=1, default=str) + "\n")
    n_sparse = sum(1 for s in scales.values() if s["sparse_2to4"])
    n_act = sum(1 for s in scales.values() if s["input_scale"] is not None)
    text = (README.format(arch=arch, recipe=recipe_name or "?", n=len(scales), n_sparse=n_sparse, n_act=n_act)
            if scales else f"# {arch} written by gpusq\n\nA dense model (no compressed layers): its weights as "
                           "they are.\n")
    (out / "README.md").write_text(text)
    return out


README = """# {arch} compressed by gpusq (recipe: {recipe})

`transformers.AutoModelForImageClassification.from_pretrained(THIS_DIR)` loads this directory.

The weights are the compressed model's **effective weights stored as dense float32**: in {n_sparse} of
the {n} compressed layers two of every four weights along the input are exact zeros (2:4 sparsity),
and quantized layers hold their on-grid values (code x per-channel scale). Nothing here is smaller
or faster than a dense model: transformers runs it as dense floats.

Activation quantization ({n_act} layers have a static INT8/FP8 input scale in gpusq) is **not** part
of this directory: transformers has no place for it, so the logits here equal gpusq's fake-quant
model with its input quantizers off (exactly so for a `sparse` recipe). The scales are listed in
`gpusq_quant.json`. For the deployed speed-up use the gpusq output itself (`gpusq.deploy`,
`gpusq export` to ONNX / TensorRT).
"""


def weights_only(model: nn.Module) -> nn.Module:
    """A copy of a compressed model with its activation quantizers off: what an ``save_hf_dir``
    directory computes (its weights are the effective ones, its activations float)."""
    import copy

    from gpusq.layers import compressed_layers

    m = copy.deepcopy(model)
    for layer in compressed_layers(m).values():
        layer.input_quant = None
    return m


@torch.no_grad()
def verify_hf_dir(model: nn.Module, path: str | Path, n: int = 8, seed: int = 0) -> dict[str, float]:
    """Load ``path`` with ``AutoModelForImageClassification`` (offline) and compare its logits with the gpusq
    model's, activation quantizers off (``weights_only``), on ``n`` random inputs: max abs / relative error."""
    import transformers

    with _quiet():
        ref = transformers.AutoModelForImageClassification.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = weights_only(model).float().eval().cpu()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.pretrained_cfg["input_size"], generator=g)
    a, b = ref(pixel_values=x).logits, ours(x)
    err = float((a - b).abs().max())
    return {"n": n, "max_abs_err": err, "rel_err": float((a - b).norm() / b.norm().clamp_min(1e-12)),
            "top1_agree": float((a.argmax(1) == b.argmax(1)).float().mean())}
