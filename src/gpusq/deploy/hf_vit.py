"""Hugging Face ViT / DeiT encoder layers on the fused ViT blocks (``gpusq.deploy.vit``).

Why: an HF ``ViTLayer`` is a timm ViT ``Block`` under other names (pre-norm, one attention, a GELU MLP,
two residual adds), but per layer it runs q, k and v as three GEMMs and leaves the LayerNorm + quantize,
GELU + quantize and residual adds to torch. Here each layer becomes a ``FusedBlock``: q/k/v concatenated
into one qkv GEMM (exact: the three quantize their one input with one scale, checked), the same eight
kernels as timm's, the residual stream padded once for the whole encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from gpusq.deploy import cusparselt as cs
from gpusq.deploy.modules import layer_codes
from gpusq.deploy.vit import (
    FusedBlock,
    FusedBlocks,
    GemmBlock,
    find_layout,
    hf_specs,
    one_backend,
    submodule,
    why_not_hf_block,
)

# module paths inside one encoder layer: transformers 5.x, then 4.x
HF_VIT_LAYOUTS = (
    dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", proj="attention.o_proj",
         fc1="mlp.fc1", fc2="mlp.fc2", act="mlp.activation_fn", heads="attention"),
    dict(q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
         proj="attention.output.dense", fc1="intermediate.dense", fc2="output.dense",
         act="intermediate.intermediate_act_fn", heads="attention.attention"),
)
LAYER_TYPES = ("ViTLayer", "DeiTLayer")


def hf_vit_layout(layer: nn.Module) -> dict[str, str] | None:
    return find_layout(layer, HF_VIT_LAYOUTS)


def hf_vit_layers(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """(name prefix, the module holding the encoder's layer list, the list's attribute) of an HF ViT / DeiT
    classifier (``vit.layers`` in transformers 5.x, ``vit.encoder.layer`` in 4.x), or None."""
    for base in ("vit", "deit"):
        root = getattr(model, base, None)
        for sub in ("", "encoder"):
            holder = root if not sub else getattr(root, sub, None)
            for attr in ("layers", "layer"):
                lst = getattr(holder, attr, None)
                if isinstance(lst, nn.ModuleList) and len(lst) and all(type(m).__name__ in LAYER_TYPES for m in lst):
                    return ".".join(p for p in (base, sub, attr) if p), holder, attr
    return None


def why_not_hf_vit_layer(layer: nn.Module, compressed: dict[str, nn.Module], prefix: str) -> str | None:
    """``None`` if an HF ViT / DeiT encoder layer runs exactly on the fused path, else why not."""
    lay = hf_vit_layout(layer)
    if lay is None or not all(hasattr(layer, a) for a in ("layernorm_before", "layernorm_after")):
        return f"{prefix}: a {type(layer).__name__} of an unknown transformers layout"
    return why_not_hf_block(layer, lay, compressed, prefix)


class FusedHFViTBlock(FusedBlock):
    """One HF ViT / DeiT encoder layer as a ``FusedBlock`` (its forward: the eight kernels)."""

    def __init__(self, layer: nn.Module, compressed: dict[str, nn.Module], prefix: str, device: torch.device,
                 backend: str = "int8"):
        lay = hf_vit_layout(layer)
        GemmBlock.__init__(self, layer.layernorm_before, layer.layernorm_after, hf_specs(compressed, lay, prefix),
                           prefix, device, backend)
        attn = submodule(layer, lay["heads"])
        self.heads = int(attn.num_attention_heads)
        self.head_dim = submodule(layer, lay["q"]).out_features // self.heads
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        if self.qkv.np_ != cs.round_up(3 * self.heads * self.head_dim) or self.proj.np_ != cs.round_up(self.dim):
            raise ValueError(f"{prefix}: unexpected q/k/v or output widths")


class FusedHFViTLayers(FusedBlocks):
    """Stands in for an HF encoder's whole layer list (as its single entry): takes the hidden states [B, N, C]
    (and whatever else the encoder passes, unused: images have no attention mask) and returns them as an HF
    layer does (a tensor in transformers 5.x, a 1-tuple in 4.x)."""

    def __init__(self, blocks: list[FusedHFViTBlock], returns_tuple: bool):
        super().__init__(blocks)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        out = super().forward(hidden_states)
        return (out,) if self.returns_tuple else out


def fuse_hf_vit_layers(model: nn.Module, compressed: dict[str, nn.Module], device: torch.device) -> str | None:
    """Swap an HF ViT / DeiT encoder's layers for ``FusedHFViTLayers`` in place when every layer qualifies;
    ``None`` on success, else the first reason (the model is then left unchanged)."""
    found = hf_vit_layers(model)
    if found is None:
        return "the model has no Hugging Face ViT / DeiT encoder layers"
    prefix, holder, attr = found
    layers = getattr(holder, attr)
    for i, layer in enumerate(layers):
        why = why_not_hf_vit_layer(layer, compressed, f"{prefix}.{i}")
        if why is not None:
            return why
    lay = hf_vit_layout(layers[0])
    backend, why = one_backend({layer_codes(compressed[f"{prefix}.{i}.{lay['q']}"])[0] for i in range(len(layers))})
    if why is not None:
        return why
    blocks = [FusedHFViTBlock(layer, compressed, f"{prefix}.{i}", device, backend) for i, layer in enumerate(layers)]
    setattr(holder, attr, nn.ModuleList([FusedHFViTLayers(blocks, returns_tuple=lay is HF_VIT_LAYOUTS[1])]))
    return None
