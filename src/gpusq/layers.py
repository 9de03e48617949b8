"""Compressed GEMM modules: drop-in swaps for ``nn.Linear`` / ``nn.Conv2d`` (torchao-style).

A compressed layer keeps its float weight (the trainable master copy) and adds:

* ``weight_mask`` (bool buffer, 2:4 along the GEMM input dim) applied in every forward;
* ``weight_quant`` (per-channel fake quantizer) applied after the mask;
* ``input_quant`` (per-tensor static activation fake quantizer) applied to the input.

``effective_weight()`` is exactly the weight the layer multiplies with: what the deployment
kernels and the exporter store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CompressedLayer(nn.Module):
    """Mixin shared by the compressed Linear and Conv2d."""

    weight: nn.Parameter
    weight_mask: torch.Tensor | None
    weight_quant: nn.Module | None  # a gpusq.quant.WeightQuantizer, installed by quant.set_quant_
    input_quant: nn.Module | None  # a gpusq.quant.ActQuantizer

    def _init_compression(self) -> None:
        self.register_buffer("weight_mask", None)
        self.weight_quant = None
        self.input_quant = None

    def set_mask_(self, mask: torch.Tensor) -> None:
        """Install a mask and zero the pruned weights, so they also read as zero at rest."""
        with torch.no_grad():
            self.weight_mask = mask.to(device=self.weight.device, dtype=torch.bool)
            self.weight.mul_(self.weight_mask)

    def masked_weight(self) -> torch.Tensor:
        w = self.weight
        return w * self.weight_mask if self.weight_mask is not None else w

    def effective_weight(self) -> torch.Tensor:
        w = self.masked_weight()
        return self.weight_quant(w) if self.weight_quant is not None else w

    def weight_scale(self) -> torch.Tensor | None:
        """Per-output-channel scale of the quantized weight (shape [out]), or None."""
        if self.weight_quant is None:
            return None
        return self.weight_quant.scale(self.masked_weight().detach()).reshape(-1)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x


class CompressedLinear(nn.Linear, CompressedLayer):
    """``nn.Linear`` with a 2:4 mask and optional weight / input fake quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_compression()

    @classmethod
    def from_float(cls, mod: nn.Linear) -> CompressedLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new.weight, new.bias = mod.weight, mod.bias  # share the Parameters (optimizer-safe)
        new._init_compression()
        new.train(mod.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.effective_weight(), self.bias)


class CompressedConv2d(nn.Conv2d, CompressedLayer):
    """``nn.Conv2d`` (groups=1) seen as an implicit GEMM, compressed like a Linear."""

    @classmethod
    def from_float(cls, mod: nn.Conv2d) -> CompressedConv2d:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(new, attr, getattr(mod, attr))
        new.weight, new.bias = mod.weight, mod.bias
        new._init_compression()
        new.train(mod.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.effective_weight(), self.bias)


def to_compressed(mod: nn.Module) -> CompressedLayer:
    if isinstance(mod, CompressedLayer):
        return mod
    if isinstance(mod, nn.Linear):
        return CompressedLinear.from_float(mod)
    if isinstance(mod, nn.Conv2d):
        return CompressedConv2d.from_float(mod)
    raise TypeError(f"cannot compress a {type(mod).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Name → compressed layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLayer)}


def ensure_compressed(model: nn.Module, names: list[str]) -> dict[str, CompressedLayer]:
    """Swap the named layers for their compressed versions (idempotent); returns them."""
    out = {}
    for name in names:
        mod = model.get_submodule(name)
        new = to_compressed(mod)
        if new is not mod:
            replace_module(model, name, new)
        out[name] = new
    return out
