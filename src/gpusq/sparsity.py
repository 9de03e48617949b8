"""2:4 fine-grained structured sparsity (GPUSQ-ViT step 1).

In every group of 4 consecutive weights along the GEMM's reduction (input) dimension, the two of
largest magnitude are kept. That is the pattern NVIDIA sparse Tensor Cores (and cuSPARSELt)
execute. A ``Conv2d`` (the patch embedding) is treated as the implicit GEMM its kernel computes:
its weight ``[out, in, kh, kw]`` is viewed as ``[out, in*kh*kw]`` in PyTorch's memory order
(``in`` slowest, ``kw`` fastest), the same order the deployment path flattens image patches in.

Masks live in the ``weight_mask`` buffer of each compressed module (see ``gpusq.layers``), so they
travel with ``state_dict`` and are applied inside ``forward`` (thus also under ``torch.compile``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gpusq.layers import CompressedLayer, compressed_layers, ensure_compressed

# A Linear inside a transformer block, plus the patch embedding's projection.
DEFAULT_INCLUDE = (r"(^|\.)blocks\.\d+(\.|$)", r"(^|\.)patch_embed\.proj$")
# Classifier heads and everything a user names stay dense.
DEFAULT_EXCLUDE = (r"(^|\.)head(\.|$)", r"(^|\.)fc_norm$", r"(^|\.)classifier(\.|$)")


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the [N, K] matrix of the GEMM it takes part in (a view, no copy)."""
    return weight.reshape(weight.shape[0], -1)


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest |w| in each group of 4 along the input dimension.

    Ties are broken by position (the earlier weight wins), so the mask is deterministic.
    """
    w = gemm_view(weight.detach())
    n, k = w.shape
    if k % 4:
        raise ValueError(f"input dim {k} is not a multiple of 4")
    groups = w.abs().float().reshape(n, k // 4, 4)
    idx = groups.sort(dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(weight.shape)


def is_2to4(weight: torch.Tensor) -> bool:
    """True if every group of 4 input-dim weights has at most 2 non-zeros."""
    w = gemm_view(weight.detach())
    if w.shape[1] % 4:
        return False
    nnz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    return bool((nnz <= 2).all())


@dataclass
class SparsityConfig:
    """What to prune. ``include``/``exclude`` are regexes on module names (``re.search``)."""

    pattern: str = "2:4"
    include: Sequence[str] = DEFAULT_INCLUDE
    exclude: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pattern not in ("2:4", "none"):
            raise ValueError(f"sparsity pattern {self.pattern!r} is not supported (use '2:4' or 'none')")

    def on_family(self, include: Sequence[str] | None) -> SparsityConfig:
        """This selection on a model family whose GEMMs are ``include`` (None: the default ones): the
        family's patterns replace the default include, a recipe's own include is kept."""
        if include is None or tuple(self.include) != tuple(DEFAULT_INCLUDE) or tuple(include) == tuple(DEFAULT_INCLUDE):
            return self
        return SparsityConfig(pattern=self.pattern, include=include, exclude=list(self.exclude))


@dataclass
class LayerSelection:
    """Which GEMM layers a config selects, and which it had to skip (with the reason)."""

    selected: list[str]
    skipped: dict[str, str]


def gemm_in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    raise TypeError(type(module).__name__)


FilterFn = Callable[[str, nn.Module], bool]


def select_layers(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    filter_fn: FilterFn | None = None,
) -> LayerSelection:
    """Pick the GEMM-shaped layers to compress: Linear (and groups=1 Conv2d) matching ``include``.

    Heads (``DEFAULT_EXCLUDE``) and user ``exclude`` patterns stay dense; a layer whose input
    dimension is not a multiple of 4 cannot be 2:4 and is reported in ``skipped``. ``filter_fn(name,
    module)`` (torchao's selection style), when given, decides instead of the patterns.
    """
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *exclude)]
    selected: list[str] = []
    skipped: dict[str, str] = {}
    for name, mod in model.named_modules():
        is_gemm = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
        if not is_gemm:
            continue
        if filter_fn is not None:
            if not filter_fn(name, mod):
                continue
        elif not any(p.search(name) for p in inc) or any(p.search(name) for p in exc):
            continue
        k = gemm_in_features(mod)
        if k % 4:
            skipped[name] = f"input dim {k} is not a multiple of 4"
            continue
        selected.append(name)
    return LayerSelection(selected, skipped)


def check_2to4(model: nn.Module) -> dict[str, bool]:
    """Per compressed layer: does its effective weight hold the 2:4 pattern exactly?

    Checks the weight the layer actually uses (masked and, if quantized, on the quantization grid).
    """
    return {
        name: is_2to4(mod.effective_weight())
        for name, mod in model.named_modules()
        if isinstance(mod, CompressedLayer) and mod.weight_mask is not None
    }


def sparsify_(model: nn.Module, config: SparsityConfig | None = None,
              filter_fn: FilterFn | None = None) -> LayerSelection:
    """Prune the selected layers of ``model`` to 2:4 in place (magnitude masks), swapping each for
    a compressed layer that keeps enforcing its mask. Returns what was selected and skipped.
    ``filter_fn(name, module)`` selects instead of ``config``'s include/exclude patterns."""
    config = config or SparsityConfig()
    sel = select_layers(model, config.include, config.exclude, filter_fn)
    layers = ensure_compressed(model, sel.selected)
    if config.pattern == "2:4":
        for layer in layers.values():
            layer.set_mask_(mask_2to4(layer.weight))
    return sel


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Re-zero pruned weights (e.g. after loading foreign weights into a sparse model)."""
    for layer in compressed_layers(model).values():
        if layer.weight_mask is not None:
            layer.weight.mul_(layer.weight_mask)
