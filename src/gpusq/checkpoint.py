"""The ``gpusq compress`` output format, and atomic file writes.

``DIR/model.safetensors`` holds the compressed model's state, with, for each compressed layer
``L``:

* ``L.weight``: the effective weight, a dense float32 tensor with the 2:4 zeros explicit and the
  values already on the quantized grid (``codes * L.weight_scale[:, None]``);
* ``L.weight_mask``: the 2:4 mask (bool);
* ``L.weight_scale``: per-output-channel scale (float32 [out]), when weights are quantized;
* ``L.input_scale``: per-tensor activation scale (float32 scalar), when inputs are quantized;
* ``L.bias`` as usual.

Its metadata (and ``DIR/model.yaml``) name the timm model and its keyword arguments;
``DIR/recipe.yaml`` is the full recipe. Packing (2:4 compression, INT4 nibbles) happens at
deployment/export. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq.errors import GpusqError
from gpusq.layers import compressed_layers, ensure_compressed
from gpusq.recipes import Recipe, load_recipe

FORMAT_VERSION = "1"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, w)


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in the output format above (effective weights + scales)."""
    # one copy per key: safetensors refuses tensors that share memory (tied heads, e.g. Deformable-DETR's)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    for name, layer in compressed_layers(model).items():
        # quantizer internals are replaced by the explicit scales
        for k in list(state):
            if k.startswith(f"{name}.weight_quant.") or k.startswith(f"{name}.input_quant."):
                del state[k]
        with torch.no_grad():
            state[f"{name}.weight"] = layer.effective_weight().detach().float().cpu().contiguous()
            ws = layer.weight_scale()
            if ws is not None:
                state[f"{name}.weight_scale"] = ws.float().cpu().contiguous()
            if layer.input_quant is not None:
                state[f"{name}.input_scale"] = layer.input_quant.scale.detach().abs().float().cpu().reshape(())
    return state


def save_compressed(
    model: nn.Module, out_dir: str | Path, recipe: Recipe, model_name: str | None, model_kwargs: dict,
    classes: list[str] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``model.yaml`` and ``recipe.yaml`` into ``out_dir`` atomically.

    ``classes``: the class names in label order, recorded in both (``read_compressed_dir`` returns
    them as ``info["classes"]``, ``None`` when an output has none)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = export_state(model)
    meta = {
        "gpusq_format": FORMAT_VERSION,
        "model": model_name or "",
        "model_kwargs": json.dumps(model_kwargs),
        "recipe": recipe.name,
    }
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
    info = {"model": model_name, "model_kwargs": model_kwargs, "gpusq_format": FORMAT_VERSION}
    if classes is not None:
        info["classes"] = list(classes)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
    atomic_write_text(out / "model.yaml", yaml.safe_dump(info))
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return out


def read_compressed_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Recipe]:
    """Tensors, model info and recipe of a ``gpusq compress`` output (one-line errors if not one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(path)
    f = d / "model.safetensors" if d.is_dir() else d
    if not f.is_file():
        raise GpusqError(f"{path} is not a gpusq output directory (no model.safetensors)")
    try:
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata() or {}
    except Exception:  # noqa: BLE001
        raise GpusqError(f"{f} is not a readable safetensors file") from None
    if meta.get("gpusq_format") is None:
        raise GpusqError(f"{f} was not written by gpusq (no gpusq_format metadata)")
    recipe_file = f.parent / "recipe.yaml"
    if not recipe_file.is_file():
        raise GpusqError(f"{f.parent} is not a complete gpusq output directory (no recipe.yaml)")
    recipe = load_recipe(str(recipe_file))
    info = {"model": meta.get("model") or None, "model_kwargs": json.loads(meta.get("model_kwargs") or "{}"),
            "classes": json.loads(meta["classes"]) if meta.get("classes") else None}
    return load_file(str(f)), info, recipe


def build_compressed(
    model: nn.Module, state: dict[str, torch.Tensor], recipe: Recipe, source: str = "checkpoint"
) -> nn.Module:
    """Give ``model`` the compressed structure recorded in ``state`` and load it (in place).

    Weight quantizers get their stored scales frozen, so the model computes exactly what the
    compressed model that was saved computed.
    """
    from gpusq.models import load_weights_

    names = [k[: -len(".weight_mask")] for k in state if k.endswith(".weight_mask")]
    names += [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    names = list(dict.fromkeys(names))
    try:
        layers = ensure_compressed(model, names)
    except AttributeError as e:
        raise GpusqError(f"{source} does not match the model: {e}") from None
    plain = {}
    for k, v in state.items():
        if k.endswith((".weight_scale", ".input_scale")):
            continue
        plain[k] = v
    for name, layer in layers.items():
        if f"{name}.weight_mask" in state:
            layer.weight_mask = torch.zeros_like(layer.weight, dtype=torch.bool)
        wq = recipe.quant.weight if f"{name}.weight_scale" in state else None
        aq = recipe.quant.act if f"{name}.input_scale" in state else None
        layer.set_quant_(wq, aq)
    load_weights_(model, _add_quantizer_state(model, plain), source)
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.weight_quant is not None:
                layer.weight_quant.freeze_scale_(state[f"{name}.weight_scale"].to(layer.weight.device))
            if layer.input_quant is not None:
                layer.input_quant.scale.data.copy_(state[f"{name}.input_scale"].reshape(()))
                layer.input_quant.calibrated.fill_(True)
    return model


def _add_quantizer_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the quantizers' own buffers (not part of the output format) from the fresh model."""
    own = model.state_dict()
    out = dict(state)
    for k, v in own.items():
        if (".weight_quant." in k or ".input_quant." in k) and k not in out:
            out[k] = v
    return out


def load_compressed(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, Recipe, dict]:
    """Rebuild the compressed (fake-quant) model of a ``gpusq compress`` output directory.

    ``model``: an already constructed architecture (for models not built from a timm name).
    """
    from gpusq.models import create_model

    state, info, recipe = read_compressed_dir(path)
    if model is None:
        if not info["model"]:
            raise GpusqError(f"{path} does not name its model; pass the architecture through the Python API")
        model = create_model(info["model"], **info["model_kwargs"])
    build_compressed(model, state, recipe, source=str(path))
    model.eval()
    return model, recipe, info
