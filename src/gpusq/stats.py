"""Accounting of a model under a recipe: parameters, deployed size and bit-operations.

Nothing is trained: the recipe is applied to a fresh (random) model of any ``gpusq.families`` name (a
timm classifier, or a detection / segmentation model, on its family's GEMMs), so the layers counted
as compressed are exactly those ``gpusq compress`` would compress. One forward of one image under
``torch.utils.flop_counter.FlopCounterMode`` gives the FLOPs of every matrix product (Linear, conv
as implicit GEMM, attention's QKᵀ and AV), 2 FLOPs per multiply-accumulate.

Conventions (the paper's, made explicit):

* **Size.** A compressed layer stores its kept values at ``w_bits`` (``density`` of the weight),
  2 bits of position metadata per kept value when 2:4 sparse, one fp32 scale per output channel
  when weights are quantized, one fp32 activation scale when inputs are quantized, and its bias at
  the dense precision. Every other parameter is stored at ``recipe.deploy.dense_bits``.
* **Bit-ops.** ``FLOPs · density · w_bits · a_bits``; the ratio divides the dense FP32 figure
  (``FLOPs · 32 · 32``) by it. Compressed layers run at (density, w_bits, a_bits); everything else
  (head, attention products, Linear layers the recipe leaves dense) at ``dense_bits²``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import torch
from torch import nn

from gpusq.errors import GpusqError
from gpusq.layers import CompressedLayer, compressed_layers
from gpusq.recipes import Recipe, load_recipe

METADATA_BITS = 2  # per kept value of a 2:4 weight (index of its position in the group of 4)
SCALE_BYTES = 4  # fp32 scales (per output channel for weights, per tensor for activations)


def _is_gemm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)


def compress_for_accounting_(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Swap in the compressed layers ``recipe`` selects, without data.

    Weight clip search (``calib: mse``) is skipped: it changes scale values, never what is stored,
    and costs seconds on a base model.
    """
    from gpusq.prepare import prepare_
    from gpusq.quant import QuantConfig

    w, a = recipe.quant.weight, recipe.quant.act
    cfg = QuantConfig(dataclasses.replace(w, calib="max"), dataclasses.replace(a, calib="max"))
    prepare_(model, dataclasses.replace(recipe, quant=cfg))
    return model


def _layer_precision(layer: CompressedLayer, dense_bits: int) -> tuple[float, int, int]:
    """(density, w_bits, a_bits) the layer executes at, read from its state."""
    density = 0.5 if layer.weight_mask is not None else 1.0
    w_bits = layer.weight_quant.spec.bits if layer.weight_quant is not None else dense_bits
    a_bits = layer.input_quant.spec.bits if layer.input_quant is not None else dense_bits
    return density, w_bits, a_bits


@torch.no_grad()
def count_flops(
    model: nn.Module, input_size: tuple[int, ...], layers: list[str]
) -> tuple[int, dict[str, int]]:
    """Matmul FLOPs of one forward of one input (batch 1): total, and per named layer.

    Per-layer FLOPs are the growth of the global count between a module's pre- and post-forward
    hooks, so they do not depend on FlopCounterMode's module naming. Attention runs through the
    math SDPA backend, whose bmm's every torch version counts.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, *input_size, device=device)
    per_layer = dict.fromkeys(layers, 0)
    start: dict[str, int] = {}
    fc = FlopCounterMode(display=False)
    handles = []
    for name in layers:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, n=name: start.__setitem__(n, fc.get_total_flops())))
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=name: per_layer.__setitem__(n, per_layer[n] + fc.get_total_flops() - start[n])))
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), fc:
            model(x)
    except RuntimeError as e:
        raise GpusqError(f"forward of a {tuple(input_size)} input failed: {str(e).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(fc.get_total_flops()), per_layer


def _skip_reasons(model: nn.Module, recipe: Recipe, compressed: set[str]) -> dict[str, str]:
    """Every GEMM layer left dense, with why (so that the dense remainder is never a surprise)."""
    from gpusq.sparsity import DEFAULT_EXCLUDE, select_layers

    sel = select_layers(model, recipe.sparsity.include, recipe.sparsity.exclude)
    inc = [re.compile(p) for p in recipe.sparsity.include]
    exc = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *recipe.sparsity.exclude)]
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if name in compressed or not _is_gemm(mod) or isinstance(mod, CompressedLayer):
            continue
        if name in sel.skipped:
            out[name] = sel.skipped[name]
        elif any(p.search(name) for p in exc):
            out[name] = "excluded (classifier head or recipe exclude pattern)"
        elif not any(p.search(name) for p in inc):
            out[name] = "not matched by the recipe's include patterns"
        else:
            out[name] = "not compressed in this model"
    return out


def model_stats(model: nn.Module, recipe: Recipe | str, input_size: tuple[int, ...] | None = None,
                model_name: str | None = None, flops: bool = True) -> dict[str, Any]:
    """Parameters, deployed size and bit-op ratios of ``model`` deployed with ``recipe``.

    A model without compressed layers is compressed (a copy) the way ``recipe`` would; an already
    compressed model (e.g. from ``load_compressed``) is counted as it is, each layer at the
    precision its own quantizers say. ``input_size`` is (C, H, W) for images or any per-sample
    shape; by default the model's own (``gpusq.families.model_input_size``).
    """
    from gpusq.families import model_input_size

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dense_bits = recipe.deploy.dense_bits
    if not compressed_layers(model):
        model = compress_for_accounting_(copy.deepcopy(model), recipe)
    layers = compressed_layers(model)
    if flops:
        input_size = tuple(input_size) if input_size is not None else tuple(model_input_size(model))

    # Parameters: a compressed layer's own weight and bias; quantizer internals (e.g. a learnable
    # activation scale) are counted as scales below, not as model parameters.
    params_dense = params_masked = params_compressed = 0
    size_bits = 0
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        inside = next((ln for ln in layers if name.startswith(ln + ".")), None)
        if inside is None:
            params_dense += p.numel()
            size_bits += p.numel() * dense_bits
        elif owner == inside and leaf in ("weight", "bias"):
            params_dense += p.numel()
            if leaf == "bias":
                size_bits += p.numel() * dense_bits
    for layer in layers.values():
        density, w_bits, _ = _layer_precision(layer, dense_bits)
        kept = layer.weight.numel() * density
        params_compressed += layer.weight.numel()
        params_masked += layer.weight.numel() - int(kept)
        size_bits += kept * w_bits
        if layer.weight_mask is not None:
            size_bits += kept * METADATA_BITS
        if layer.weight_quant is not None:
            size_bits += layer.weight.shape[0] * SCALE_BYTES * 8
        if layer.input_quant is not None:
            size_bits += SCALE_BYTES * 8

    if not flops:  # sizes only (``flops=False``: models whose forward is not one image tensor)
        return _size_only(model, recipe, model_name, params_dense, params_masked, params_compressed, size_bits,
                          layers)
    flops_dense, per_layer = count_flops(model, input_size, list(layers))
    flops_compressed = sum(per_layer.values())
    flops_other = flops_dense - flops_compressed
    bitops_layers = 0.0
    for name, layer in layers.items():
        density, w_bits, a_bits = _layer_precision(layer, dense_bits)
        bitops_layers += per_layer[name] * density * w_bits * a_bits
    bitops_all = bitops_layers + flops_other * dense_bits * dense_bits
    size_compressed = size_bits / 8
    w_spec, a_spec = recipe.quant.weight, recipe.quant.act
    return {
        "model": model_name or type(model).__name__,
        "recipe": recipe.name,
        "input_size": list(input_size),
        "density": 0.5 if recipe.sparse else 1.0,
        "w_bits": w_spec.bits if w_spec.enabled else dense_bits,
        "a_bits": a_spec.bits if a_spec.enabled else dense_bits,
        "dense_bits": dense_bits,
        "params_dense": params_dense,
        "params_nonzero": params_dense - params_masked,
        "params_compressed": params_compressed,
        "size_bytes_fp32": 4 * params_dense,
        "size_bytes_compressed": size_compressed,
        "size_ratio": 4 * params_dense / size_compressed,
        "flops_dense": flops_dense,
        "flops_compressed": flops_compressed,
        "flops_other": flops_other,
        # None when the recipe compresses nothing in this model (no layer to take a ratio over).
        "bitops_ratio_linear": flops_compressed * 1024 / bitops_layers if bitops_layers else None,
        "bitops_ratio": flops_dense * 1024 / bitops_all if bitops_all else 1.0,
        "layers_compressed": len(layers),
        "layers_skipped": _skip_reasons(model, recipe, set(layers)),
    }


def _size_only(model, recipe: Recipe, model_name, params_dense, params_masked, params_compressed, size_bits,
               layers) -> dict[str, Any]:
    size = size_bits / 8
    return {"model": model_name or type(model).__name__, "recipe": recipe.name, "input_size": None,
            "dense_bits": recipe.deploy.dense_bits, "params_dense": params_dense,
            "params_nonzero": params_dense - params_masked, "params_compressed": params_compressed,
            "size_bytes_fp32": 4 * params_dense, "size_bytes_compressed": size, "size_ratio": 4 * params_dense / size,
            "flops_dense": None, "flops_compressed": None, "flops_other": None, "bitops_ratio_linear": None,
            "bitops_ratio": None, "layers_compressed": len(layers), "layers_skipped": {}}


def stats(model_name: str, recipe: Recipe | str, **model_kwargs: Any) -> dict[str, Any]:
    """``model_stats`` of a fresh model by ``gpusq.families`` name (nothing downloaded), compressed where
    its family's ``gpusq compress`` would compress it; FLOPs at the family's input size.

    The model is built on the ``meta`` device: accounting needs shapes only, and this skips
    seconds of random init, mask sorting and fake-quantized matmuls on a base model. A model whose
    forward needs real values falls back to CPU.
    """
    from gpusq import families

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fam = families.lookup(model_name)
    recipe = dataclasses.replace(recipe, sparsity=fam.sparsity_config(recipe.sparsity))
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = fam.build(model_name, **model_kwargs)
        compress_for_accounting_(model, recipe)
        try:
            return _counted(model, recipe, fam.input_size_of(model), model_name)
        except (NotImplementedError, RuntimeError, GpusqError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _counted(model: nn.Module, recipe: Recipe, size: tuple[int, ...] | None, name: str) -> dict[str, Any]:
    """``model_stats``; a model whose forward does not take one ``size`` image (a detector needing real
    values, say) is counted without FLOPs, ``flops_note`` saying why."""
    try:
        return model_stats(model, recipe, input_size=size, model_name=name)
    except GpusqError:
        raise
    except Exception as e:  # noqa: BLE001 - a task model whose forward takes other inputs
        if next(iter(model.parameters())).is_meta:
            raise NotImplementedError("forward on the meta device") from e
        row = model_stats(model, recipe, model_name=name, flops=False)
        row["flops_note"] = f"FLOPs not counted: one forward of a {size} image failed ({type(e).__name__})"
        return row


COLUMNS = [
    ("model", "model", "{}"),
    ("recipe", "recipe", "{}"),
    ("params M", "params_dense", "{:.2f}"),
    ("nonzero M", "params_nonzero", "{:.2f}"),
    ("FP32 MB", "size_bytes_fp32", "{:.1f}"),
    ("deployed MB", "size_bytes_compressed", "{:.2f}"),
    ("size x", "size_ratio", "{:.2f}"),
    ("GFLOPs", "flops_dense", "{:.2f}"),
    ("other %", "flops_other", "{:.1f}"),
    ("bitops x linear", "bitops_ratio_linear", "{:.1f}"),
    ("bitops x all", "bitops_ratio", "{:.1f}"),
    ("layers", "layers_compressed", "{}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table; params in millions, sizes in MB (10⁶ bytes), FLOPs per image."""
    scale = {"params_dense": 1e-6, "params_nonzero": 1e-6, "size_bytes_fp32": 1e-6,
             "size_bytes_compressed": 1e-6, "flops_dense": 1e-9, "file_bytes": 1e-6}
    cols = COLUMNS + ([("file MB", "file_bytes", "{:.2f}")] if any("file_bytes" in r for r in rows) else [])
    cells = []
    for r in rows:
        line = []
        for _, key, fmt in cols:
            v = r.get(key)
            if v is None:
                pass
            elif key == "flops_other":
                v = 100.0 * v / r["flops_dense"] if r["flops_dense"] else 0.0
            elif key in scale:
                v = v * scale[key]
            line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    heads = [h for h, _, _ in cols]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt_row = lambda cs: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([fmt_row(heads), "  ".join("-" * w for w in widths), *map(fmt_row, cells)])


def checkpoint_stats(path: str) -> dict[str, Any]:
    """``model_stats`` of a ``gpusq compress`` output as stored, plus ``file_bytes`` (its
    model.safetensors). Detection / segmentation models: FLOPs at their default input size where a
    forward on one image works, else the FLOP fields are None and ``flops_note`` says why."""
    from pathlib import Path

    from gpusq.checkpoint import load_compressed

    model, recipe, info = load_compressed(path)
    f = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    task = info.get("task")
    # classification: the model's own size; a task model: a small one (its family's 800 px would take a
    # CPU long on a full-size detector) that every task model takes (a multiple of 32)
    size = (3, 256, 256) if task is not None else None
    row = _counted(model, recipe, size, info["model"])
    row["file_bytes"] = f.stat().st_size
    row["file_ratio_vs_fp32"] = row["size_bytes_fp32"] / row["file_bytes"]
    if task is not None:
        row["task"] = task
    return row
