"""Activation quantization written so that ``torch.compile`` (Inductor) fuses it into the op that
produces the activation, and the regional compilation that makes that happen.

Why this works: the quantization below is a chain of pointwise ops (divide, round half to even,
clamp, cast, zero-pad to the row alignment). Inductor inlines pointwise chains into their
producer, so ``LayerNorm -> quantize`` becomes one Triton reduction kernel that reads bf16 and
writes int8, ``GELU -> quantize`` one pointwise kernel, and the head-merge transpose after
attention one copy kernel that writes int8. Only int8 (or fp8) crosses memory into each GEMM.
The semantics are those of ``gpusq.quant.fake_quantize`` on activations:
``clamp(round(x / scale), -128, 127)`` computed in float32 (``torch.round`` rounds half to even),
and ``clamp(x / scale, -448, 448)`` cast to E4M3 for FP8, except that ``x / scale`` is computed as
``x * (1 / scale)``: an IEEE float32 division costs ~20 instructions per element and made the
fused GELU+quantize kernel compute-bound on the H100 (0.30 ms vs 0.24 ms for the plain bf16 GELU
on DeiT-B batch 256). The two differ by at most one float32 ulp before rounding, which changes a
code only when ``x / scale`` lies within an ulp of a half-integer.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from gpusq.families import BLOCK_COMPILE_REGIONS
from gpusq.quant import FP8_MAX


def pad_rows_cols(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to [rows, cols] (a no-op when already that size)."""
    m, k = x.shape
    if rows == m and cols == k:
        return x
    return F.pad(x, (0, cols - k, 0, rows - m))


def quantize_int8(x: torch.Tensor, inv_scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[M, K] float -> [rows, cols] int8 codes of ``clamp(round(x/scale), -128, 127)``, zero-padded."""
    q = torch.clamp(torch.round(x.float() * inv_scale), -128.0, 127.0)
    return pad_rows_cols(q, rows, cols).to(torch.int8)


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[M, K] float -> [rows, cols] E4M3 of ``clamp(x/scale, -448, 448)``, zero-padded."""
    q = torch.clamp(x.float() * inv_scale, -FP8_MAX, FP8_MAX)
    return pad_rows_cols(q, rows, cols).to(torch.float8_e4m3fn)


def configure_dynamo() -> None:
    """Room for one compiled graph per (block shape, batch size): falling back to eager silently
    when the cache fills would turn the benchmark into an eager one."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(getattr(cfg, "cache_size_limit", 8), 256)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 2048)
    # inline_inbuilt_nn_modules (one graph reused by every block of a shape) is the default since torch 2.5


def compile_regions(model: nn.Module, scope: str = "blocks",
                    regions: tuple[str, ...] = BLOCK_COMPILE_REGIONS) -> list[str]:
    """Compile ``model`` in place: ``blocks`` = each module matching ``regions`` (its family's
    ``compile_regions``: the transformer blocks and the few modules around them) on its own,
    ``model`` = the whole forward at once, ``none`` = nothing. Returns what was compiled."""
    if scope == "none":
        return []
    configure_dynamo()
    # subtrees that run hand-fused kernels (gpusq.deploy.vit.FusedBlocks) are never traced
    fused = [n for n, m in model.named_modules() if getattr(m, "gpusq_fused", False)]
    if scope == "model":
        if not fused:
            model.compile(dynamic=False)
            return [""]
        names = [n for n, m in model.named_children()
                 if n not in fused and not isinstance(m, (nn.Identity, nn.Dropout))]
        for n in names:
            model.get_submodule(n).compile(dynamic=False)
        return names
    if scope != "blocks":
        raise ValueError(f"compile scope {scope!r} is not one of blocks, model, none")
    pats = [re.compile(p) for p in regions]
    names = []
    for name, mod in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f in fused):
            continue
        if name and any(p.search(name) for p in pats) and not any(name.startswith(n + ".") for n in names):
            mod.compile(dynamic=False)
            names.append(name)
    if not names and fused:
        return names
    if not names:
        model.compile(dynamic=False)
        names.append("")
    return names
