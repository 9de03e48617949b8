"""Fused transformer blocks: the memory-bound glue moved into the sparse GEMMs.

A timm ViT/DeiT block ``x + attn(LN1(x)); x + mlp(LN2(x))`` with every Linear compressed to INT8
2:4 runs as eight kernels:

1. LayerNorm1 + quantize -> INT8 (one Triton kernel, ``kernels.layernorm_quant``);
2. qkv: 2:4 GEMM, alpha vector + bias in the epilogue, bf16 out;
3. attention (``scaled_dot_product_attention`` on strided q/k/v views of the qkv output);
4. heads transposed back + quantize -> INT8 (one Triton kernel, ``kernels.quantize_heads``);
5. proj: 2:4 GEMM, bias + the residual stream through C (beta = 1), bf16 out = the new stream;
6. LayerNorm2 + quantize -> INT8;
7. fc1: 2:4 GEMM with GELU in the epilogue, written as INT8 on fc2's input scale;
8. fc2: 2:4 GEMM, bias + residual through C.

Only INT8 crosses memory into each GEMM, fc1's 4x-wide output is written once as INT8 and never
as bf16, and the residual adds cost nothing. The residual stream is kept as one [Mp, Cp] bf16
buffer for all blocks (rows padded to a multiple of 32 once, before the first block; padding
rows are zeroed by each LayerNorm kernel so they stay finite). A LayerScale gamma folds into the
epilogue's alpha and bias. Numerics are the fake-quant model's: erf-GELU, round-half-even,
saturating INT8 (cuSPARSELt's INT8 output matches that on 99.97% of codes, the rest one away).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpusq.deploy import cusparselt as cs
from gpusq.deploy.modules import layer_codes

GEMMS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _is_identity(m) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout))


def why_not_gemm_block(block: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str | None:
    """What every fused timm block needs (ViT and Swin alike): affine LayerNorms ``norm1``/``norm2``, a
    plain erf-GELU ``mlp``, and ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` compressed to a format
    with a fused kernel; ``None`` or the reason."""
    for ln in (block.norm1, block.norm2):
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
            return f"{prefix}: norms are not affine LayerNorms"
    mlp = block.mlp
    if not all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")) or not _is_identity(getattr(mlp, "norm", None)):
        return f"{prefix}.mlp is not a plain Mlp"
    if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
        return f"{prefix}.mlp activation is {mlp.act}, not erf GELU"
    return why_not_gemm_layers(compressed, [f"{prefix}.{rel}" for rel in GEMMS])


def submodule(mod: nn.Module, path: str) -> nn.Module | None:
    """``mod``'s submodule at a dotted path, or None where any part is missing."""
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def find_layout(layer: nn.Module, layouts: tuple[dict[str, str], ...]) -> dict[str, str] | None:
    """The first of ``layouts`` (module paths by role) whose paths all exist in ``layer``, or None."""
    for lay in layouts:
        if all(submodule(layer, path) is not None for path in lay.values()):
            return lay
    return None


def erf_gelu(act) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers' GELUActivation is F.gelu (erf) unless it was built with use_gelu_python
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu


def why_not_hf_block(layer: nn.Module, lay: dict[str, str], compressed: dict[str, nn.Module],
                     prefix: str) -> str | None:
    """What every fused Hugging Face encoder layer needs (ViT, DeiT and Swin alike; ``lay``: its module
    paths): affine LayerNorms, erf GELU, query / key / value / output / intermediate / output dense compressed
    to a format with a fused kernel, and query, key and value quantizing their one input with one scale
    (they run as one qkv GEMM); ``None`` or the reason."""
    for ln in (layer.layernorm_before, layer.layernorm_after):
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
            return f"{prefix}: norms are not affine LayerNorms"
    if not erf_gelu(submodule(layer, lay["act"])):
        return f"{prefix}: the MLP activation is not erf GELU"
    names = [f"{prefix}.{lay[k]}" for k in ("q", "k", "v", "proj", "fc1", "fc2")]
    why = why_not_gemm_layers(compressed, names)
    if why is not None:
        return why
    scales = [layer_codes(compressed[n])[3].float() for n in names[:3]]
    if not all(torch.equal(scales[0], t) for t in scales[1:]):
        return (f"{prefix}: query, key and value quantize their shared input with different scales "
                "(one INT8 input cannot serve all three)")
    return None


def why_not_gemm_layers(compressed: dict[str, nn.Module], names: list[str]) -> str | None:
    """``None`` if every named layer is compressed to a format with a fused kernel, else the reason."""
    from gpusq.layers import CompressedLayer

    for name in names:
        layer = compressed.get(name)
        if not isinstance(layer, CompressedLayer):
            return f"{name} is not compressed"
        try:
            kind = layer_codes(layer)[0]
        except Exception as e:  # noqa: BLE001 - an unsupported format is a reason, not a crash
            return f"{name}: {e}"
        sparse = layer.weight_mask is not None
        if not ((kind == "int8" and sparse) or (kind == "fp8" and not sparse)):
            return (f"{name} is {kind} {'2:4' if sparse else 'dense'}; fused kernels exist for INT8/INT4 "
                    "2:4 (cuSPARSELt) and dense FP8 (cuBLASLt)")
    return None


def why_not_fusable(block: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str | None:
    """``None`` if ``block`` is a plain timm ViT ``Block`` whose four Linears are INT8 2:4 layers,
    else the reason it is not (the model then runs on the per-layer path)."""
    need = ("norm1", "attn", "norm2", "mlp")
    if any(not hasattr(block, a) for a in need) or type(block).__name__ != "Block":
        return f"{prefix} is a {type(block).__name__}, not a timm ViT Block"
    attn = block.attn
    if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim", "scale")):
        return f"{prefix}.attn is not timm's Attention"
    if not (_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None))
            and _is_identity(getattr(attn, "norm", None)) and getattr(attn, "gate", None) is None):
        return f"{prefix}.attn has q/k norms, a scale norm or a gate"
    for part in ("ls1", "ls2"):
        ls = getattr(block, part, None)
        if not (_is_identity(ls) or hasattr(ls, "gamma")):
            return f"{prefix}.{part} is neither Identity nor LayerScale"
    return why_not_gemm_block(block, compressed, prefix)


def block_backend(block: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str:
    """``int8`` (2:4 on cuSPARSELt) or ``fp8`` (dense on cuBLASLt) for a block ``why_not_fusable`` accepted."""

    return layer_codes(compressed[f"{prefix}.attn.qkv"])[0]


def timm_specs(compressed: dict[str, nn.Module], prefix: str) -> dict[str, GemmSpec]:
    """``gemm_specs`` of a timm block (ViT or Swin): ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``."""
    return gemm_specs(compressed, {k: f"{prefix}.{rel}" for k, rel in zip(("qkv", "proj", "fc1", "fc2"), GEMMS)})


def hf_specs(compressed: dict[str, nn.Module], lay: dict[str, str], prefix: str) -> dict[str, GemmSpec]:
    """``gemm_specs`` of a Hugging Face encoder layer (ViT, DeiT or Swin; ``lay``: its module paths): query,
    key and value as one qkv GEMM, then the attention output, intermediate and output dense."""
    return gemm_specs(compressed, {"qkv": tuple(f"{prefix}.{lay[k]}" for k in "qkv"), "proj": f"{prefix}.{lay['proj']}",
                                   "fc1": f"{prefix}.{lay['fc1']}", "fc2": f"{prefix}.{lay['fc2']}"})


def one_backend(backends: set[str]) -> tuple[str, str | None]:
    """(the backend all fused blocks share, None), or (``""``, why they cannot run fused): mixed formats,
    or FP8 without nvmath-python's cuBLASLt."""
    if len(backends) != 1:
        return "", f"blocks mix formats ({', '.join(sorted(backends))})"
    backend = next(iter(backends))
    if backend == "fp8":
        from gpusq.deploy import cublaslt

        if not cublaslt.available():
            return "", "nvmath-python is not installed (pip install 'gpusq[gpu]')"
    return backend, None


def _gamma(ls) -> torch.Tensor | None:
    return ls.gamma.detach().float() if hasattr(ls, "gamma") else None


GemmSpec = tuple  # (codes [N, K] float, weight scale [N], input scale, bias [N] or None)


def gemm_specs(compressed: dict[str, nn.Module], names: dict[str, str | tuple[str, ...]]) -> dict[str, GemmSpec]:
    """``{rel: (codes, weight scale, input scale, bias)}`` for the fused GEMMs ``qkv``/``proj``/``fc1``/``fc2``
    from compressed layer names; a tuple of names (Hugging Face's separate q, k, v) is concatenated
    along the outputs, which is exact only when they quantize their shared input with one scale."""

    out = {}
    for rel, nm in names.items():
        parts = [compressed[n] for n in (nm if isinstance(nm, tuple) else (nm,))]
        cs_ = [layer_codes(p) for p in parts]
        s_in = cs_[0][3]
        if any(not torch.equal(c[3].float(), s_in.float()) for c in cs_[1:]):
            raise ValueError(f"{', '.join(nm)} quantize their shared input with different scales")
        biases = [p.bias.detach().float() if p.bias is not None else torch.zeros(c[1].shape[0])
                  for p, c in zip(parts, cs_)]
        has_bias = any(p.bias is not None for p in parts)
        out[rel] = (torch.cat([c[1] for c in cs_]), torch.cat([c[2].float().reshape(-1) for c in cs_]), s_in,
                    torch.cat(biases) if has_bias else None)
    return out


class GemmBlock(nn.Module):
    """The four GEMMs of a transformer block (qkv, proj + residual, fc1 + GELU -> codes, fc2 + residual)
    on the fused kernels of ``backend``, its two LayerNorms and the input scales: what the ViT and the
    Swin fused blocks share. ``specs`` from ``gemm_specs``; ``gamma1``/``gamma2`` (LayerScale) fold into
    proj's / fc2's alpha and bias."""

    def __init__(self, norm1: nn.LayerNorm, norm2: nn.LayerNorm, specs: dict[str, GemmSpec], prefix: str,
                 device: torch.device, backend: str = "int8", gamma1: torch.Tensor | None = None,
                 gamma2: torch.Tensor | None = None):
        super().__init__()
        self.backend = backend
        self.act_dtype = torch.int8 if backend == "int8" else torch.float8_e4m3fn
        self.dim = norm1.weight.shape[0]

        def alpha(rel, gamma=None):
            _, ws, s_in, _ = specs[rel]
            a = ws.float() * s_in.float()
            return a * gamma if gamma is not None else a

        def bias(rel, gamma=None):
            b = specs[rel][3]
            if b is None:
                return None
            return b * gamma if gamma is not None else b

        def inv_in(rel):
            return (1.0 / specs[rel][2].float()).reshape(()).to(device)

        s_fc2 = float(specs["fc2"][2])

        def gemm(rel, gamma=None, **kw):
            name = f"{prefix}.{rel}"
            codes, ws, s_in, _ = specs[rel]
            if backend == "int8":
                from gpusq.deploy.cslt import SparseGemm

                if kw.pop("act_out", False):
                    kw.update(out="int8", gelu=True, gelu_scale=1.0 / s_fc2)
                return SparseGemm(codes, alpha(rel, gamma), bias(rel, gamma), device=device, name=name, **kw)
            from gpusq.deploy.cublaslt import DenseFp8Gemm

            if kw.pop("act_out", False):
                kw.update(out="fp8", gelu=True, out_scale=s_fc2)
            w = codes.float() * ws.float()[:, None]
            if gamma is not None:
                w = w * gamma.float()[:, None]
            return DenseFp8Gemm(w, bias(rel, gamma), float(s_in), device=device, **kw)

        self.qkv = gemm("qkv")
        self.proj = gemm("proj", gamma1, residual=True)
        self.fc1 = gemm("fc1", act_out=True)
        self.fc2 = gemm("fc2", gamma2, residual=True)
        # plain float32 attributes, not buffers: deploy() casts the model to bf16 afterwards
        for i, ln in ((1, norm1), (2, norm2)):
            setattr(self, f"ln{i}_w", ln.weight.detach().float().to(device))
            setattr(self, f"ln{i}_b", (ln.bias.detach().float() if ln.bias is not None
                                       else torch.zeros_like(ln.weight).float()).to(device))
            setattr(self, f"ln{i}_eps", float(ln.eps))
        self.inv_s_qkv, self.inv_s_proj, self.inv_s_fc1 = inv_in("qkv"), inv_in("proj"), inv_in("fc1")

    def mlp(self, xr: torch.Tensor, rows: int) -> torch.Tensor:
        """``xr + fc2(GELU(fc1(LN2(xr))))`` on the padded residual stream (3 kernels)."""
        from gpusq.deploy.kernels import layernorm_quant

        h = layernorm_quant(xr, self.ln2_w, self.ln2_b, self.ln2_eps, self.inv_s_fc1, rows, self.dim,
                            out_dtype=self.act_dtype)
        return self.fc2(self.fc1(h), xr)

    def gemms(self) -> dict[str, object]:
        return {"qkv": self.qkv, "proj": self.proj, "fc1": self.fc1, "fc2": self.fc2}


class FusedBlock(GemmBlock):
    """One ViT block on the eight kernels listed in the module docstring."""

    def __init__(self, block: nn.Module, compressed: dict[str, nn.Module], prefix: str, device: torch.device,
                 backend: str = "int8"):
        super().__init__(block.norm1, block.norm2, timm_specs(compressed, prefix), prefix, device, backend,
                         _gamma(getattr(block, "ls1", None)), _gamma(getattr(block, "ls2", None)))
        attn = block.attn
        self.heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, float(attn.scale)
        if self.qkv.np_ != cs.round_up(3 * self.heads * self.head_dim) or self.proj.np_ != cs.round_up(self.dim):
            raise ValueError(f"{prefix}: unexpected qkv/proj widths")

    def forward(self, xr: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        from gpusq.deploy.kernels import layernorm_quant, quantize_heads

        m, c = batch * tokens, self.dim
        mp = xr.shape[0]
        dt = self.act_dtype
        h = layernorm_quant(xr, self.ln1_w, self.ln1_b, self.ln1_eps, self.inv_s_qkv, m, c, out_dtype=dt)
        qkv = self.qkv(h)
        width = 3 * self.heads * self.head_dim
        q, k, v = qkv[:m, :width].reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        a = quantize_heads(o, self.inv_s_proj, mp, self.proj.kp, out_dtype=dt)
        return self.mlp(self.proj(a, xr), m)


class FusedBlocks(nn.Module):
    """Replaces a ViT's ``blocks`` (``nn.Sequential``): pads the tokens once to the GEMMs' row
    alignment, runs every ``FusedBlock`` on the padded residual stream, and un-pads at the end."""

    gpusq_fused = True  # compile_regions leaves this subtree alone (no torch.compile inside)

    def __init__(self, blocks: list[FusedBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.dim = blocks[0].dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return self.run(self.pad(x), b, n)[: b * n, :c].reshape(b, n, c).to(x.dtype)

    @staticmethod
    def pad(x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, C] -> the padded bf16 residual stream [Mp, Cp] the blocks run on."""
        b, n, c = x.shape
        m, mp, cp = b * n, cs.round_up(b * n), cs.round_up(c)
        xr = x.reshape(m, c).to(torch.bfloat16)
        if (mp, cp) != (m, c):
            xr = F.pad(xr, (0, cp - c, 0, mp - m))
        xr = xr.contiguous()
        return xr if xr.data_ptr() % 16 == 0 else xr.clone()  # a view at an odd offset: the GEMMs need 16 B

    def run(self, xr: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """All blocks on the padded residual stream [Mp, Cp] (bf16) of ``batch`` x ``tokens`` rows."""
        for blk in self.blocks:
            xr = blk(xr, batch, tokens)
        return xr

    def gemms(self) -> dict[str, object]:
        out = {}
        for i, blk in enumerate(self.blocks):
            for k, g in blk.gemms().items():
                out[f"blocks.{i}.{k}"] = g
        return out


def fuse_vit_blocks(model: nn.Module, compressed: dict[str, nn.Module], device: torch.device) -> str | None:
    """Swap ``model.blocks`` for ``FusedBlocks`` in place when every block qualifies; returns
    ``None`` on success, else the first reason it does not (the model is then left unchanged)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return "the model has no timm-style 'blocks' sequence"
    for i, blk in enumerate(blocks):
        why = why_not_fusable(blk, compressed, f"blocks.{i}")
        if why is not None:
            return why
    backend, why = one_backend({block_backend(blk, compressed, f"blocks.{i}") for i, blk in enumerate(blocks)})
    if why is not None:
        return why
    fused = [FusedBlock(blk, compressed, f"blocks.{i}", device, backend) for i, blk in enumerate(blocks)]
    model.blocks = FusedBlocks(fused)
    return None


def why_not_fused_forward(model: nn.Module) -> str | None:
    """``None`` if ``model`` is a timm ViT / DeiT whose whole forward can run on the padded token matrix
    (class-token pooling, absolute position embeddings, no register tokens), else why not."""
    name = type(model).__name__
    if name not in ("VisionTransformer", "VisionTransformerDistilled"):
        return f"{name} is not a timm VisionTransformer"
    if not isinstance(getattr(model, "blocks", None), FusedBlocks):
        return "its blocks are not fused"
    checks = {
        "class-token pooling": getattr(model, "global_pool", None) == "token"
        and getattr(model, "attn_pool", None) is None,
        "a class token": getattr(model, "cls_token", None) is not None,
        "no register tokens": getattr(model, "reg_token", None) is None,
        "position embeddings added after the class token": getattr(model, "pos_embed", None) is not None
        and not getattr(model, "no_embed_class", True) and not getattr(model, "dynamic_img_size", True),
        "no pre-norm / patch dropout": _is_identity(getattr(model, "norm_pre", None))
        and _is_identity(getattr(model, "patch_drop", None)) and _is_identity(getattr(model, "pos_drop", None)),
        "a LayerNorm before the head": isinstance(getattr(model, "norm", None), nn.LayerNorm),
    }
    missing = [k for k, ok in checks.items() if not ok]
    return f"the model lacks {', '.join(missing)}" if missing else None


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT forward with the token concat, position add and row padding as one kernel, and the
    final LayerNorm on the class (and distillation) tokens only: the head reads nothing else."""
    from gpusq.deploy.kernels import assemble_tokens

    t = self.patch_embed(x)
    b, n_patch, c = t.shape
    prefix, pos = self._gpusq_prefix, self._gpusq_pos
    p = prefix.shape[0]
    n = n_patch + p
    xr = assemble_tokens(t.to(pos.dtype), prefix, pos, cs.round_up(b * n), cs.round_up(c))
    xr = self.blocks.run(xr, b, n)
    y = self.norm(xr[: b * n].view(b, n, xr.shape[1])[:, :p, :c].to(pos.dtype))
    return self.forward_head(y)


def fuse_vit_forward(model: nn.Module) -> str | None:
    """Install ``_fused_forward`` on ``model`` (after its dtype is final); ``None`` or why not."""
    import types

    why = why_not_fused_forward(model)
    if why is not None:
        return why
    prefix = [model.cls_token]
    if getattr(model, "dist_token", None) is not None:
        prefix.append(model.dist_token)
    dt = model.pos_embed.dtype
    model._gpusq_prefix = torch.cat([t.detach().reshape(1, -1) for t in prefix]).to(dt).contiguous()
    model._gpusq_pos = model.pos_embed.detach()[0].contiguous()
    model.forward = types.MethodType(_fused_forward, model)
    return None
