"""Fused Swin blocks: window attention in one kernel, the GEMM glue in the GEMMs.

A timm ``SwinTransformerBlock`` (``x + attn(LN1(x)); x + mlp(LN2(x))`` with the attention on
(shifted) windows) with its four Linears compressed runs as seven kernels:

1. LayerNorm1 + quantize, reading the token-order residual stream in window order
   (``kernels.layernorm_quant_gather``): the cyclic shift, the padding to whole windows and the
   window partition are a row map, not passes over memory;
2. qkv: 2:4 GEMM (alpha + bias epilogue), bf16 out, rows in window order;
3. window attention (``kernels.window_attention``): per (window, head) softmax(q kᵀ·scale + B) v
   with B = relative-position bias + shift mask (one bf16 table per block, windows padded to a
   power of two with -inf keys), written as proj's INT8 input straight to each token's own row:
   the window reverse and the reverse shift are the same row map;
4. proj: 2:4 GEMM + the residual through C;
5. LayerNorm2 + quantize; 6. fc1 + GELU -> INT8; 7. fc2 + residual (``GemmBlock.mlp``, as ViT).

The residual stream stays in token (NHWC) order, [B*H*W rows padded to 32, C] bf16, so a stage's
blocks run back to back and the stage hands timm's patch merging an ordinary [B, H, W, C] tensor.
Numerics are those of the fake-quant model (timm's window attention with the bias in bf16, float32
scores and softmax).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpusq.deploy import cusparselt as cs
from gpusq.deploy.vit import FusedBlocks, GemmBlock, why_not_gemm_block

NEG_MASK = -100.0  # timm's value for keys outside a shifted window's region


def window_row_map(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """int32 [windows * wh*ww]: for each row of one image in (shifted, padded) window order, the token
    (``y * w + x``) it holds, or -1 for padding: timm's roll(-shift) -> pad -> window_partition."""
    wh, ww = window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    ys, xs = torch.arange(hp), torch.arange(wp)
    src = ((ys + shift[0]) % h)[:, None] * w + ((xs + shift[1]) % w)[None, :]
    src = torch.where((ys < h)[:, None] & (xs < w)[None, :], src, torch.full_like(src, -1))
    return src.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1).to(torch.int32)


def shift_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """timm's SW-MSA mask [windows, N, N] (0 or -100), or None for an unshifted block."""
    if not any(shift):
        return None
    wh, ww = window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    region = torch.zeros(hp, wp)
    cnt = 0
    for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = cnt
            cnt += 1
    win = region.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, NEG_MASK, 0.0)


def bias_table(rel_bias: torch.Tensor, mask: torch.Tensor | None, bn: int) -> torch.Tensor:
    """[windows or 1, heads, BN, BN] bf16: bias (+ mask), -inf in the padding keys, 0 in padding queries."""
    heads, n, _ = rel_bias.shape
    full = rel_bias[None] if mask is None else rel_bias[None] + mask[:, None].to(rel_bias)
    t = torch.zeros(full.shape[0], heads, bn, bn, dtype=torch.float32, device=rel_bias.device)
    t[:, :, :n, :n] = full
    t[:, :, :, n:] = float("-inf")
    return t.to(torch.bfloat16).contiguous()


def _rel_pos_bias(attn: nn.Module) -> torch.Tensor:
    """[heads, N, N] float32 relative-position bias of a timm ``WindowAttention``."""
    n = attn.relative_position_index.shape[0]
    table = attn.relative_position_bias_table.detach().float()
    return table[attn.relative_position_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


def why_not_swin_block(block: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str | None:
    """``None`` if ``block`` is a timm ``SwinTransformerBlock`` the fused path runs exactly, else why not."""
    if type(block).__name__ != "SwinTransformerBlock" or not all(
            hasattr(block, a) for a in ("norm1", "attn", "norm2", "mlp", "window_size", "shift_size")):
        return f"{prefix} is a {type(block).__name__}, not a timm SwinTransformerBlock"
    attn = block.attn
    if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scale", "relative_position_bias_table",
                                          "relative_position_index")):
        return f"{prefix}.attn is not timm's WindowAttention"
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"{prefix}: head dim {head_dim} is not a power of two >= 16 (the window-attention kernel's tiles)"
    return why_not_gemm_block(block, compressed, prefix)


class FusedSwinBlock(GemmBlock):
    """One Swin block on the seven kernels of the module docstring."""

    def __init__(self, block: nn.Module, compressed: dict[str, nn.Module], prefix: str, device: torch.device,
                 backend: str = "int8"):
        super().__init__(block, compressed, prefix, device, backend)
        attn = block.attn
        self.heads = attn.num_heads
        self.head_dim = attn.qkv.out_features // 3 // self.heads
        self.scale = float(attn.scale)
        self.window, self.shift = tuple(block.window_size), tuple(block.shift_size)
        self.n = self.window[0] * self.window[1]
        self.bn = max(16, 1 << (self.n - 1).bit_length())
        self.rel_bias = _rel_pos_bias(attn).to(device)  # plain attribute: stays float32 through deploy()
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.qkv.np_ != cs.round_up(3 * self.heads * self.head_dim) or self.proj.kp != cs.round_up(self.dim):
            raise ValueError(f"{prefix}: unexpected qkv/proj widths")

    def tables(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row map, bias table) for an h x w input, built once per size (outside any CUDA graph)."""
        key = (h, w, str(device))
        if key not in self._tables:
            mask = shift_mask(h, w, self.window, self.shift)
            table = bias_table(self.rel_bias.to(device), None if mask is None else mask.to(device), self.bn)
            self._tables[key] = (window_row_map(h, w, self.window, self.shift).to(device), table)
        return self._tables[key]

    def forward(self, xr: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
        from gpusq.deploy.kernels import layernorm_quant_gather, window_attention

        rmap, table = self.tables(h, w, xr.device)
        dt = self.act_dtype
        rows_win = cs.round_up(batch * rmap.numel())
        x = layernorm_quant_gather(xr, self.ln1_w, self.ln1_b, self.ln1_eps, self.inv_s_qkv, self.dim, rmap,
                                   batch, h * w, rows_win, out_dtype=dt)
        qkv = self.qkv(x)
        m = batch * h * w
        # every token row is written below; padding rows/columns must hold finite codes (int8 always does)
        a = torch.empty(xr.shape[0], self.proj.kp, dtype=dt, device=xr.device)
        if self.proj.kp != self.heads * self.head_dim:
            a.zero_()
        elif dt != torch.int8 and xr.shape[0] > m:  # garbage fp8 bytes can be NaN
            a[m:].zero_()
        window_attention(qkv, table, rmap, self.inv_s_proj, a, images=batch, window_tokens=self.n, heads=self.heads,
                         head_dim=self.head_dim, scale=self.scale, src_rows=h * w)
        return self.mlp(self.proj(a, xr), m)


class FusedSwinBlocks(nn.Module):
    """Replaces a Swin stage's ``blocks``: [B, H, W, C] in and out, the blocks in between on one padded
    token-order residual stream (no copy when B*H*W is a multiple of 32 and C of 32)."""

    gpusq_fused = True  # compile_regions leaves this subtree alone

    def __init__(self, blocks: list[FusedSwinBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.dim = blocks[0].dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        xr = FusedBlocks.pad(x.reshape(b, h * w, c))
        for blk in self.blocks:
            xr = blk(xr, b, h, w)
        return xr[: b * h * w, :c].reshape(b, h, w, c).to(x.dtype)

    def gemms(self) -> dict[str, object]:
        return {f"blocks.{i}.{k}": g for i, blk in enumerate(self.blocks) for k, g in blk.gemms().items()}


def swin_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose ``blocks`` is a sequence of timm Swin blocks (timm's
    ``SwinTransformerStage``, also inside a ``features_only`` backbone)."""
    out = []
    for name, mod in model.named_modules():
        blocks = getattr(mod, "blocks", None)
        if isinstance(blocks, nn.Sequential) and len(blocks) and all(
                type(b).__name__ == "SwinTransformerBlock" for b in blocks):
            out.append((name, mod))
    return out


def fuse_swin_blocks(model: nn.Module, compressed: dict[str, nn.Module], device: torch.device) -> str | None:
    """Swap every Swin stage's ``blocks`` for ``FusedSwinBlocks`` in place when all blocks qualify;
    ``None`` on success, else the first reason (the model is then left unchanged)."""
    from gpusq.deploy.vit import block_backend

    stages = swin_stages(model)
    if not stages:
        return "the model has no timm Swin stages"
    backends = set()
    for sname, stage in stages:
        for i, blk in enumerate(stage.blocks):
            prefix = f"{sname}.blocks.{i}" if sname else f"blocks.{i}"
            why = why_not_swin_block(blk, compressed, prefix)
            if why is not None:
                return why
            backends.add(block_backend(blk, compressed, prefix))
    if len(backends) != 1:
        return f"blocks mix formats ({', '.join(sorted(backends))})"
    backend = backends.pop()
    if backend == "fp8":
        from gpusq.deploy import cublaslt

        if not cublaslt.available():
            return "nvmath-python is not installed (pip install 'gpusq[gpu]')"
    for sname, stage in stages:
        pre = f"{sname}.blocks" if sname else "blocks"
        stage.blocks = FusedSwinBlocks([FusedSwinBlock(b, compressed, f"{pre}.{i}", device, backend)
                                        for i, b in enumerate(stage.blocks)])
    return None
