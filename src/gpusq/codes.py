"""Weight codes: what a compressed layer stores and what every kernel multiplies — one source.

``layer_codes(layer)`` gives the integer (INT8 / INT4) or E4M3 codes, per-channel weight scale and
static input scale of a compressed layer, such that ``codes * weight_scale`` is *bit for bit* the
weight the fake-quant layer multiplies. The output format (``gpusq.checkpoint``), the deployed
kernels (``gpusq.deploy``) and ONNX export (``gpusq.export``) all take their codes from here; a
model loaded from disk carries the codes it was stored with (``attach_codes``), and they are used
as long as they still reproduce the layer (a model trained further gets fresh ones).

Storage layouts (docs/format.md):

* INT4 packing: two signed 4-bit codes per byte along the last dim, element ``2i`` in the low
  nibble, ``2i+1`` in the high nibble, two's complement (ONNX ``INT4``'s layout). The H100/H200 have
  no INT4 tensor cores: deployment unpacks to INT8 and runs the INT8 2:4 kernel (same integers).
* 2:4 compaction: per group of 4 along K only the 2 kept values (``values`` [N, K/2], in position
  order) and their positions, 2 bits each: ``idx0 | idx1 << 2`` per group (idx0 < idx1), two
  groups per byte (group ``2j`` in the low nibble) — ``index`` [N, ceil(K/8)] uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpusq.errors import InternalError


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], last dim even -> uint8 with last dim halved."""
    if codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4 takes integer codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes outside [-8, 7]")
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 from ``pack_int4`` -> int8 codes in [-8, 7] (last dim doubled)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


# ------------------------------------------------------------------------------------------------
# 2:4 compaction
# ------------------------------------------------------------------------------------------------
def pack_2to4(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight (any dtype) + its 2:4 mask -> (kept values [N, K/2], positions [N, ceil(K/8)] uint8)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 compaction needs K % 4 == 0, got K = {k}")
    m = mask.reshape(n, k // 4, 4).bool()
    if not bool((m.sum(-1) == 2).all()):
        raise ValueError("the mask is not 2:4 (exactly two kept values in every group of four)")
    pos = torch.arange(4, dtype=torch.int64).expand(n, k // 4, 4)
    kept = pos[m].reshape(n, k // 4, 2)  # ascending positions of the two kept values
    raw = w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w  # (no gather kernel for fp8)
    values = torch.gather(raw.reshape(n, k // 4, 4), 2, kept.to(w.device)).reshape(n, k // 2)
    if w.dtype == torch.float8_e4m3fn:
        values = values.view(torch.float8_e4m3fn)
    nib = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    index = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return values.contiguous(), index


def unpack_2to4(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_2to4``: (dense [N, K] with zeros, bool mask [N, K])."""
    n = values.shape[0]
    if k % 4 or values.shape[1] != k // 2 or index.shape != (n, (k // 4 + 1) // 2) or index.dtype != torch.uint8:
        raise ValueError(f"2:4 values {tuple(values.shape)} / index {tuple(index.shape)} do not fit K = {k}")
    nib = torch.stack((index & 0xF, index >> 4), dim=-1).reshape(n, -1)[:, : k // 4].to(torch.int64)
    kept = torch.stack((nib & 3, nib >> 2), dim=-1)  # [N, K/4, 2]
    if not bool((kept[..., 0] < kept[..., 1]).all()):
        raise ValueError("corrupt 2:4 index (positions not increasing within a group)")
    fp8 = values.dtype == torch.float8_e4m3fn
    v = values.view(torch.uint8) if fp8 else values  # (no scatter kernel for fp8; 0x00 is +0.0)
    dense = torch.zeros(n, k // 4, 4, dtype=v.dtype)
    dense.scatter_(2, kept, v.reshape(n, k // 4, 2))
    if fp8:
        dense = dense.view(torch.float8_e4m3fn)
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask.scatter_(2, kept, True)
    return dense.reshape(n, k), mask.reshape(n, k)


# ------------------------------------------------------------------------------------------------
# the codes of a layer
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerCodes:
    """A compressed layer as a kernel sees it (weights flattened to [N, K], conv in PyTorch order).

    ``w_fmt``: ``int8`` | ``int4`` | ``fp8_e4m3`` | ``none`` (weights not quantized: ``codes`` is the
    float weight itself); ``codes``: int8 (INT4 codes in [-7, 7] too), float8_e4m3fn or float32;
    ``weight_scale`` [N] float32 or None; ``input_scale`` 0-d float32 or None; ``a_fmt`` the input
    format; ``mask`` [N, K] bool or None (dense).
    """

    w_fmt: str
    a_fmt: str
    codes: torch.Tensor
    weight_scale: torch.Tensor | None
    input_scale: torch.Tensor | None
    mask: torch.Tensor | None

    def dequantized(self) -> torch.Tensor:
        """``codes * weight_scale`` in float32 ([N, K]): the layer's effective weight."""
        w = self.codes.float()
        return w * self.weight_scale.float()[:, None] if self.weight_scale is not None else w


def _compute_codes(layer: nn.Module) -> LayerCodes:
    from gpusq.quant import FP8_MAX, quantize_to_int

    with torch.no_grad():
        w = layer.masked_weight().detach().float().cpu()
        w = w.reshape(w.shape[0], -1)
        mask = layer.weight_mask.detach().cpu().reshape(w.shape).bool() if layer.weight_mask is not None else None
        wq = layer.weight_quant.spec.dtype if layer.weight_quant is not None else "none"
        aq = layer.input_quant.spec.dtype if layer.input_quant is not None else "none"
        s_in = layer.input_quant.scale.detach().abs().float().cpu().reshape(()) if aq != "none" else None
        if wq == "none":
            return LayerCodes("none", aq, w, None, s_in, mask)
        ws = layer.weight_scale().detach().float().cpu().reshape(-1)
        if wq == "fp8_e4m3":
            codes = torch.clamp(w / ws[:, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            codes = quantize_to_int(w, ws[:, None], wq, weight=True)
        return LayerCodes(wq, aq, codes, ws, s_in, mask)


def _reproduces(c: LayerCodes, layer: nn.Module) -> bool:
    with torch.no_grad():
        eff = layer.effective_weight().detach().float().cpu()
    eff = eff.reshape(eff.shape[0], -1)
    return tuple(eff.shape) == tuple(c.codes.shape) and torch.equal(c.dequantized(), eff)


def attach_codes(layer: nn.Module, codes: LayerCodes) -> None:
    """Remember the codes a layer was loaded from (not part of its state_dict)."""
    layer._gpusq_codes = codes


def layer_codes(layer: nn.Module) -> LayerCodes:
    """The layer's codes: those it was loaded with while they still reproduce it, else computed
    from its current weight. Either way checked: ``codes * weight_scale`` must equal the effective
    weight bit for bit (a mismatch is a bug, raised as RuntimeError)."""
    stored = getattr(layer, "_gpusq_codes", None)
    if stored is not None and _reproduces(stored, layer):
        return stored
    c = _compute_codes(layer)
    if not _reproduces(c, layer):
        raise InternalError(f"{c.w_fmt} codes do not reproduce the layer's effective weight")
    return c
