"""INT4 weight packing: two signed 4-bit codes per byte.

The W4A8 recipe stores weight codes in [-7, 7]; packed, they take half the bytes of INT8. The
H100 has no INT4 tensor cores, so ``deploy`` unpacks them at load time and runs the INT8 2:4
kernel (same integers, same result); the packing is the storage/transfer format.
Layout: along the last dim, element ``2i`` in the low nibble, ``2i+1`` in the high nibble, each
as 4-bit two's complement (the layout of ONNX ``INT4`` and of most INT4 GEMM libraries).
"""

from __future__ import annotations

import torch


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
