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
from gpusq.deploy.modules import layer_codes
from gpusq.deploy.vit import (
    FusedBlocks,
    GemmBlock,
    find_layout,
    hf_specs,
    one_backend,
    submodule,
    timm_specs,
    why_not_gemm_block,
    why_not_hf_block,
)

NEG_MASK = -100.0  # timm's value for keys outside a shifted window's region


def window_row_map(h: int, w: int, window: tuple[int, int], shift: tuple[int, int],
                   pad_first: bool = False) -> torch.Tensor:
    """int32 [windows * wh*ww]: for each row of one image in (shifted, padded) window order, the token
    (``y * w + x``) it holds, or -1 for padding: timm's roll(-shift) -> pad -> window_partition, or with
    ``pad_first`` Hugging Face's pad -> roll(-shift) -> window_partition (the two differ when the map is
    padded)."""
    wh, ww = window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    ys, xs = torch.arange(hp), torch.arange(wp)
    if pad_first:
        sy, sx = (ys + shift[0]) % hp, (xs + shift[1]) % wp
        ok = (sy < h)[:, None] & (sx < w)[None, :]
    else:
        sy, sx = (ys + shift[0]) % h, (xs + shift[1]) % w
        ok = (ys < h)[:, None] & (xs < w)[None, :]
    src = sy[:, None] * w + sx[None, :]
    src = torch.where(ok, src, torch.full_like(src, -1))
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
    """[heads, N, N] float32 relative-position bias of a timm ``WindowAttention`` (or of the module that
    holds Hugging Face's table and index)."""
    n = math.isqrt(attn.relative_position_index.numel())
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


# Hugging Face ``SwinLayer`` module paths, newest transformers first (the layout changed in 5.x).
HF_LAYOUTS = (
    dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", proj="attention.o_proj",
         fc1="mlp.fc1", fc2="mlp.fc2", act="mlp.activation_fn", rel="attention.relative_position_bias",
         heads="attention"),
    dict(q="attention.self.query", k="attention.self.key", v="attention.self.value", proj="attention.output.dense",
         fc1="intermediate.dense", fc2="output.dense", act="intermediate.intermediate_act_fn",
         rel="attention.self", heads="attention.self"),
)


def hf_layout(layer: nn.Module) -> dict[str, str] | None:
    """The ``HF_LAYOUTS`` entry whose module paths all exist in ``layer``, or None."""
    return find_layout(layer, HF_LAYOUTS)


def why_not_hf_layer(layer: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str | None:
    """``None`` if a Hugging Face ``SwinLayer`` runs exactly on the fused path, else why not."""
    lay = hf_layout(layer)
    if lay is None or not all(hasattr(layer, a) for a in ("layernorm_before", "layernorm_after", "window_size",
                                                          "shift_size")):
        return f"{prefix}: a SwinLayer of an unknown transformers layout"
    heads = submodule(layer, lay["heads"]).num_attention_heads
    head_dim = submodule(layer, lay["q"]).out_features // heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"{prefix}: head dim {head_dim} is not a power of two >= 16 (the window-attention kernel's tiles)"
    return why_not_hf_block(layer, lay, compressed, prefix)


class FusedSwinBlock(GemmBlock):
    """One Swin block on the seven kernels of the module docstring (``from_timm`` / ``from_hf``)."""

    def __init__(self, norm1: nn.LayerNorm, norm2: nn.LayerNorm, specs: dict, prefix: str, device: torch.device,
                 backend: str, *, heads: int, scale: float, window: tuple[int, int], shift: tuple[int, int],
                 rel_bias: torch.Tensor, hf_order: bool = False):
        super().__init__(norm1, norm2, specs, prefix, device, backend)
        self.prefix = prefix
        self.heads = heads
        self.head_dim = specs["qkv"][0].shape[0] // 3 // heads
        self.scale = float(scale)
        # hf_order (Hugging Face's SwinLayer): a window larger than the feature map shrinks to it,
        # unshifted; and the map is padded before the shift
        self.window, self.shift, self.hf_order = tuple(window), tuple(shift), hf_order
        self.rel_bias = rel_bias.float().to(device)  # plain attribute: stays float32 through deploy()
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        if self.qkv.np_ != cs.round_up(3 * self.heads * self.head_dim) or self.proj.kp != cs.round_up(self.dim):
            raise ValueError(f"{prefix}: unexpected qkv/proj widths")

    @classmethod
    def from_timm(cls, block: nn.Module, compressed: dict, prefix: str, device: torch.device, backend: str):
        attn = block.attn
        return cls(block.norm1, block.norm2, timm_specs(compressed, prefix), prefix, device, backend,
                   heads=attn.num_heads, scale=attn.scale, window=block.window_size, shift=block.shift_size,
                   rel_bias=_rel_pos_bias(attn))

    @classmethod
    def from_hf(cls, layer: nn.Module, compressed: dict, prefix: str, device: torch.device, backend: str):
        lay = hf_layout(layer)
        heads = submodule(layer, lay["heads"]).num_attention_heads
        specs = hf_specs(compressed, lay, prefix)
        head_dim = specs["qkv"][0].shape[0] // 3 // heads
        ws, sh = int(layer.window_size), int(layer.shift_size)
        return cls(layer.layernorm_before, layer.layernorm_after, specs, prefix, device, backend, heads=heads,
                   scale=head_dim ** -0.5, window=(ws, ws), shift=(sh, sh),
                   rel_bias=_rel_pos_bias(submodule(layer, lay["rel"])), hf_order=True)

    def tables(self, h: int, w: int, device: torch.device,
               always_partition: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(row map, bias table, tokens per window) for an h x w input, built once per size (outside any
        CUDA graph). ``always_partition``: Hugging Face's flag (its backbones set it) to keep the window and
        shift on a feature map no larger than the window."""
        key = (h, w, str(device), always_partition)
        if key not in self._tables:
            window, shift = self.window, self.shift
            if self.hf_order and not always_partition and min(h, w) <= window[0]:
                window, shift = (min(h, w),) * 2, (0, 0)
            n = window[0] * window[1]
            if n != self.rel_bias.shape[-1]:
                raise ValueError(f"{self.prefix}: a {h}x{w} input shrinks the {self.window} window to {window}, "
                                 "which its relative-position bias does not cover")
            mask = shift_mask(h, w, window, shift)
            bn = max(16, 1 << (n - 1).bit_length())
            table = bias_table(self.rel_bias.to(device), None if mask is None else mask.to(device), bn)
            rmap = window_row_map(h, w, window, shift, pad_first=self.hf_order)  # HF pads, then shifts
            self._tables[key] = (rmap.to(device), table, n)
        return self._tables[key]

    def forward(self, xr: torch.Tensor, batch: int, h: int, w: int, always_partition: bool = False) -> torch.Tensor:
        from gpusq.deploy.kernels import layernorm_quant_gather, window_attention

        rmap, table, n = self.tables(h, w, xr.device, always_partition)
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
        window_attention(qkv, table, rmap, self.inv_s_proj, a, images=batch, window_tokens=n, heads=self.heads,
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
        return self.run(x.reshape(b, h * w, c), h, w).reshape(b, h, w, c)

    def run(self, tokens: torch.Tensor, h: int, w: int, always_partition: bool = False) -> torch.Tensor:
        """[B, H*W, C] tokens (token order) through every block; same shape and dtype out."""
        b, hw, c = tokens.shape
        xr = FusedBlocks.pad(tokens)
        for blk in self.blocks:
            xr = blk(xr, b, h, w, always_partition)
        return xr[: b * hw, :c].reshape(b, hw, c).to(tokens.dtype)

    def gemms(self) -> dict[str, object]:
        return {f"blocks.{i}.{k}": g for i, blk in enumerate(self.blocks) for k, g in blk.gemms().items()}


class FusedHFSwinBlocks(FusedSwinBlocks):
    """Replaces a Hugging Face ``SwinStage``'s ``blocks`` (as the single entry of its ModuleList): takes
    and returns what its ``SwinLayer``s do, [B, H*W, C] and the (height, width) beside it."""

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], *args, **kwargs):
        # always_partition: a keyword in transformers 5.x, the 5th positional argument before
        always = bool(kwargs.get("always_partition", args[2] if len(args) > 2 else False))
        return self.run(hidden_states, int(input_dimensions[0]), int(input_dimensions[1]), always), None


def swin_stages(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "timm" or "hf") of every module whose ``blocks`` are Swin blocks: timm's
    ``SwinTransformerStage`` (also inside a ``features_only`` backbone) or a Hugging Face ``SwinStage``."""
    out = []
    for name, mod in model.named_modules():
        blocks = getattr(mod, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
            continue
        kinds = {type(b).__name__ for b in blocks}
        if kinds == {"SwinTransformerBlock"}:
            out.append((name, mod, "timm"))
        elif kinds == {"SwinLayer"}:
            out.append((name, mod, "hf"))
    return out


def fuse_swin_blocks(model: nn.Module, compressed: dict[str, nn.Module], device: torch.device) -> str | None:
    """Swap every Swin stage's ``blocks`` for fused ones in place when all blocks qualify; ``None`` on
    success, else the first reason (the model is then left unchanged)."""

    stages = swin_stages(model)
    if not stages:
        return "the model has no timm or Hugging Face Swin stages"
    backends = set()
    for sname, stage, kind in stages:
        for i, blk in enumerate(stage.blocks):
            prefix = f"{sname}.blocks.{i}" if sname else f"blocks.{i}"
            why = (why_not_swin_block if kind == "timm" else why_not_hf_layer)(blk, compressed, prefix)
            if why is not None:
                return why
            first = f"{prefix}.attn.qkv" if kind == "timm" else f"{prefix}.{hf_layout(blk)['q']}"
            backends.add(layer_codes(compressed[first])[0])
    backend, why = one_backend(backends)
    if why is not None:
        return why
    for sname, stage, kind in stages:
        pre = f"{sname}.blocks" if sname else "blocks"
        if kind == "timm":
            stage.blocks = FusedSwinBlocks([FusedSwinBlock.from_timm(b, compressed, f"{pre}.{i}", device, backend)
                                            for i, b in enumerate(stage.blocks)])
        else:
            stage.blocks = nn.ModuleList([FusedHFSwinBlocks([
                FusedSwinBlock.from_hf(b, compressed, f"{pre}.{i}", device, backend)
                for i, b in enumerate(stage.blocks)])])
    return None
