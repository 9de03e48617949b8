"""The ``gpusq compress`` output format (version 2: codes on disk), and atomic file writes.

``DIR/model.safetensors`` stores what a deployment stores (spec: docs/format.md). For each
compressed layer ``L``:

* ``L.weight.codes``: the weight codes — INT8 as int8, INT4 packed two per byte (uint8), FP8 as
  float8_e4m3fn, or for un-quantized 2:4 layers the values at the dense dtype; for 2:4 layers only
  the two kept values of every group of four (``[N, K/2]``), with
* ``L.weight.index``: their positions, 2 bits each (``[N, ceil(K/8)]`` uint8, ``gpusq.codes``);
* ``L.weight_scale``: per-output-channel scale (float32 [N]) of quantized weights;
* ``L.input_scale``: the static activation scale (float32 scalar) of quantized inputs;
* ``L.bias`` and every other tensor of the model at the recipe's ``deploy.dense_dtype`` (bf16 by
  default; integer buffers as they are).

The metadata name the format, the model (its ``gpusq.families`` name + kwargs), the recipe, the
class names and each compressed layer's weight shape and formats. Loading rebuilds the fake-quant model exactly
as stored (``save -> load -> save`` gives identical bytes) and attaches each layer's stored codes,
which deployment and export then use (``gpusq.codes.layer_codes``). Version 1 directories (dense
float32 effective weights + masks) still load. Nothing here uses pickle.
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

from gpusq.codes import LayerCodes, attach_codes, layer_codes, pack_2to4, pack_int4, unpack_2to4, unpack_int4
from gpusq.errors import GpusqError
from gpusq.layers import compressed_layers, ensure_compressed
from gpusq.quant import set_quant_
from gpusq.recipes import Recipe, load_recipe

FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", "2")
META_KEY = "gpusq"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def export_state(model: nn.Module, dense_dtype: str = "bf16") -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, per-layer metadata) of ``model`` in the format above; ``dense_dtype`` for everything
    that is not a code or a scale (``fp32`` keeps a training intermediate lossless)."""
    dt = DTYPES[dense_dtype]
    # one copy per key: safetensors refuses tensors that share memory (tied heads, e.g. Deformable-DETR's)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    layers_meta: dict[str, dict] = {}
    special: set[str] = set()
    for name, layer in compressed_layers(model).items():
        for k in list(state):  # quantizer internals, the float weight and the mask are replaced below
            if k.startswith((f"{name}.weight_quant.", f"{name}.input_quant.")) or k in (f"{name}.weight",
                                                                                          f"{name}.weight_mask"):
                del state[k]
        c = layer_codes(layer)
        codes = c.codes.to(dt) if c.w_fmt == "none" else c.codes
        n, k = codes.shape
        if c.mask is not None:
            codes, state[f"{name}.weight.index"] = pack_2to4(codes, c.mask)
            special.add(f"{name}.weight.index")
        if c.w_fmt == "int4":
            codes = pack_int4(torch.nn.functional.pad(codes, (0, codes.shape[1] % 2)))
        state[f"{name}.weight.codes"] = codes.contiguous()
        special.add(f"{name}.weight.codes")
        for key, t in ((f"{name}.weight_scale", c.weight_scale), (f"{name}.input_scale", c.input_scale)):
            if t is not None:
                state[key] = t.float().cpu().contiguous()
                special.add(key)
        layers_meta[name] = {"shape": list(layer.weight.shape), "k": k, "w": c.w_fmt, "a": c.a_fmt,
                             "sparse": c.mask is not None}
    for k, v in state.items():
        if k not in special and v.is_floating_point():
            state[k] = v.to(dt)
    return state, layers_meta


def _metadata(recipe: Recipe, model_name: str | None, model_kwargs: dict, classes: list[str] | None,
              layers_meta: dict, dense_dtype: str) -> dict[str, str]:
    """The file's metadata: ONE key holding sorted JSON, because safetensors writes a metadata map in
    no fixed order and ``save -> load -> save`` must give identical bytes."""
    info = {"format": FORMAT_VERSION, "model": model_name or "", "model_kwargs": model_kwargs,
            "recipe": recipe.name, "dense_dtype": dense_dtype, "layers": layers_meta,
            "classes": list(classes) if classes is not None else None}
    return {META_KEY: json.dumps(info, sort_keys=True, separators=(",", ":"))}


def file_metadata(meta: dict[str, str] | None) -> dict[str, Any]:
    """A gpusq safetensors file's metadata, any version, as a dict with at least ``gpusq_format``
    (``None`` if the file was not written by gpusq)."""
    meta = meta or {}
    if META_KEY in meta:
        info = json.loads(meta[META_KEY])
        info["gpusq_format"] = info.pop("format")
        return info
    out: dict[str, Any] = dict(meta)
    out.setdefault("gpusq_format", None)
    for key in ("model_kwargs", "classes", "layers"):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = json.loads(out[key])
    return out


def decode_state(state: dict[str, torch.Tensor], layers_meta: dict[str, dict],
                 ) -> tuple[dict[str, torch.Tensor], dict[str, LayerCodes]]:
    """Format-2 tensors -> (the fake-quant model's state: effective float32 weights, masks, scales;
    each layer's codes). Raises GpusqError on tensors that do not fit their metadata."""
    out = dict(state)
    codes_by_layer: dict[str, LayerCodes] = {}
    for name, m in layers_meta.items():
        try:
            raw = out.pop(f"{name}.weight.codes")
            index = out.pop(f"{name}.weight.index", None)
            shape, k, w_fmt = m["shape"], int(m["k"]), m["w"]
            if w_fmt == "int4":
                raw = unpack_int4(raw)
            if m["sparse"]:
                if index is None:
                    raise KeyError(f"{name}.weight.index")
                codes, mask = unpack_2to4(raw, index, k)
            else:
                codes, mask = raw[:, :k].contiguous(), None
            ws = out.get(f"{name}.weight_scale")
            c = LayerCodes(w_fmt, m["a"], codes if w_fmt != "none" else codes.float(), ws,
                           out.get(f"{name}.input_scale"), mask)
        except (KeyError, ValueError, RuntimeError) as e:
            raise GpusqError(f"compressed layer {name} is damaged or incomplete in the file ({e})") from None
        out[f"{name}.weight"] = c.dequantized().reshape(shape)
        if mask is not None:
            out[f"{name}.weight_mask"] = mask.reshape(shape)
        codes_by_layer[name] = c
    return out, codes_by_layer


def save_compressed(
    model: nn.Module, out_dir: str | Path, recipe: Recipe, model_name: str | None, model_kwargs: dict,
    classes: list[str] | None = None, dense_dtype: str | None = None,
) -> Path:
    """Write ``model.safetensors``, ``model.yaml`` and ``recipe.yaml`` into ``out_dir`` atomically.

    ``classes``: the class names in label order (``read_compressed_dir`` returns them as
    ``info["classes"]``). ``dense_dtype`` overrides the recipe's ``deploy.dense_dtype`` for the
    uncompressed tensors (the stage-1 intermediate keeps ``fp32``)."""
    state, _, meta = _encode(model, recipe, model_name, model_kwargs, classes, dense_dtype)
    return write_compressed(state, meta, out_dir, recipe)


def _encode(model: nn.Module, recipe: Recipe, model_name: str | None, model_kwargs: dict,
            classes: list[str] | None, dense_dtype: str | None = None,
            ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """(tensors, per-layer metadata, file metadata) of ``model`` in format 2."""
    dense_dtype = dense_dtype or recipe.deploy.dense_dtype
    state, layers_meta = export_state(model, dense_dtype)
    return state, layers_meta, _metadata(recipe, model_name, model_kwargs, classes, layers_meta, dense_dtype)


def write_compressed(state: dict[str, torch.Tensor], meta: dict[str, str], out_dir: str | Path,
                     recipe: Recipe) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    m = file_metadata(meta)
    info: dict[str, Any] = {"model": m["model"] or None, "model_kwargs": m["model_kwargs"],
                            "gpusq_format": FORMAT_VERSION}
    if m.get("classes") is not None:
        info["classes"] = m["classes"]
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
    atomic_write_text(out / "model.yaml", yaml.safe_dump(info))
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return out


def stored_model(model: nn.Module, recipe: Recipe, model_name: str | None, model_kwargs: dict,
                 classes: list[str] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, str]]:
    """(the model exactly as ``save_compressed`` would store it, its tensors, its metadata): a copy of
    ``model`` rebuilt from its encoded state, so metrics measured on it are the saved model's."""
    import copy

    state, layers_meta, meta = _encode(model, recipe, model_name, model_kwargs, classes)
    decoded, codes = decode_state(state, layers_meta)
    m = copy.deepcopy(model)
    build_compressed(m, decoded, recipe, source="the encoded model", names=list(layers_meta), codes=codes)
    return m, state, meta


def read_compressed_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Recipe]:
    """The fake-quant state (effective weights, masks, scales), model info and recipe of a
    ``gpusq compress`` output; ``info["codes"]`` holds each layer's stored codes (format 2).
    One-line errors if the directory is not one, or is damaged."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(path)
    f = d / "model.safetensors" if d.is_dir() else d
    if not f.is_file():
        raise GpusqError(f"{path} is not a gpusq output directory (no model.safetensors)")
    try:
        with safe_open(str(f), "pt") as sf:
            meta = file_metadata(sf.metadata())
    except Exception:  # noqa: BLE001
        raise GpusqError(f"{f} is not a readable safetensors file (truncated or damaged?)") from None
    fmt = meta.get("gpusq_format")
    if fmt is None:
        raise GpusqError(f"{f} was not written by gpusq (no gpusq_format metadata)")
    if fmt not in READABLE_FORMATS:
        kind = "a dense (uncompressed) model" if fmt.startswith("dense") else f"format {fmt!r}"
        raise GpusqError(f"{f} holds {kind}, not a compressed gpusq output this version reads "
                         f"(formats {', '.join(READABLE_FORMATS)}); re-run `gpusq compress` or upgrade gpusq")
    recipe_file = f.parent / "recipe.yaml"
    if not recipe_file.is_file():
        raise GpusqError(f"{f.parent} is not a complete gpusq output directory (no recipe.yaml)")
    recipe = load_recipe(str(recipe_file))
    info = {"model": meta.get("model") or None, "model_kwargs": meta.get("model_kwargs") or {},
            "classes": meta.get("classes"), "format": fmt, "codes": {}, "layers": None}
    try:
        state = load_file(str(f))
    except Exception:  # noqa: BLE001
        raise GpusqError(f"{f} is not a readable safetensors file (truncated or damaged?)") from None
    if fmt == "2":
        layers_meta = meta.get("layers") or {}
        state, info["codes"] = decode_state(state, layers_meta)
        info["layers"] = list(layers_meta)
    return state, info, recipe


def build_compressed(
    model: nn.Module, state: dict[str, torch.Tensor], recipe: Recipe, source: str = "checkpoint",
    names: list[str] | None = None, codes: dict[str, LayerCodes] | None = None,
) -> nn.Module:
    """Give ``model`` the compressed structure recorded in ``state`` and load it (in place).

    Weight quantizers get their stored scales frozen, so the model computes exactly what the
    compressed model that was saved computed; ``codes`` (format 2) are attached to their layers.
    """
    if names is None:  # format 1: the layers are those with a mask or a weight scale
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
        set_quant_(layer, wq, aq)
    load_weights_(model, _add_quantizer_state(model, plain), source)
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.weight_quant is not None:
                layer.weight_quant.freeze_scale_(state[f"{name}.weight_scale"].to(layer.weight.device))
            if layer.input_quant is not None:
                layer.input_quant.scale.data.copy_(state[f"{name}.input_scale"].reshape(()))
                layer.input_quant.calibrated.fill_(True)
            if codes and name in codes:  # format 2: the codes the layer was stored with
                attach_codes(layer, codes[name])
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

    ``model``: an already constructed architecture (for models not built by a ``gpusq.families`` name).
    """
    from gpusq import families

    state, info, recipe = read_compressed_dir(path)
    if model is None:
        if not info["model"]:
            raise GpusqError(f"{path} does not name its model; pass the architecture through the Python API")
        task_file = Path(path) / "task.yaml" if Path(path).is_dir() else None
        task = None
        if task_file is not None and task_file.is_file():  # detection / segmentation outputs name their task
            task = (yaml.safe_load(task_file.read_text()) or {}).get("task")
            info["task"] = task
        model = families.build(info["model"], task, **info["model_kwargs"])
    build_compressed(model, state, recipe, source=str(path), names=info["layers"], codes=info["codes"])
    model.eval()
    return model, recipe, info


# -- weights files (teachers, foreign checkpoints) -----------------------------------------------------
def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a timm/torch ``.pth`` (loaded with weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise GpusqError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise GpusqError(f"checkpoint {p} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GpusqError(f"checkpoint {p} could not be read with weights_only=True ({first})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GpusqError(f"checkpoint {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                  target: str = "the model") -> None:
    """Load ``state`` strictly; a mismatch is a one-line error (``source does not match target: ...``)
    naming the first problem."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        what = []
        if shape:
            k = shape[0]
            what.append(f"shape of '{k}' is {tuple(state[k].shape)}, model has {tuple(own[k].shape)}")
        if missing:
            what.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        raise GpusqError(f"{source} does not match {target}: " + "; ".join(what))
    model.load_state_dict(state, strict=True)
