"""``prepare_(model, recipe)``: a recipe's compression applied to a model without training.

Sparsify (2:4 masks) if the recipe is sparse, attach the fake quantizers if it quantizes, and
calibrate the activation scales on the caller's batches (``calibrate_fn(model)`` runs them, ModelOpt
style) — the order ``compress`` follows around its training stages. What the speed benchmark, the
accounting and anyone deploying a post-training-quantized model need; the stages that ran are
recorded on the model (``model.gpusq_prepared``) and returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from gpusq.recipes import Recipe
from gpusq.sparsity import FilterFn


@dataclass
class Prepared:
    """What ``prepare_`` did: the stages in order, the layers it compressed and those it had to skip."""

    stages: list[str] = field(default_factory=list)  # of "sparsify", "quantize", "calibrate"
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def prepare_(model: nn.Module, recipe: Recipe, *, calibrate_fn: Callable[[nn.Module], object] | None = None,
             filter_fn: FilterFn | None = None) -> Prepared:
    """Apply ``recipe`` to ``model`` in place (see the module docstring). ``filter_fn(name, module)``
    selects the layers instead of the recipe's include/exclude patterns, for sparsity and quantization
    alike. Without ``calibrate_fn`` a quantizing recipe leaves the activation scales uncalibrated."""
    from gpusq.quant import calibrate, quantize_
    from gpusq.sparsity import sparsify_

    done = Prepared()
    sel = sparsify_(model, recipe.sparsity, filter_fn)  # pattern "none": the layers are swapped, not masked
    if recipe.sparse:
        done.stages.append("sparsify")
    done.layers, done.skipped = list(sel.selected), dict(sel.skipped)
    if recipe.quantized:
        quantize_(model, recipe.quant, layers=done.layers)
        done.stages.append("quantize")
        if calibrate_fn is not None:
            calibrate(model, calibrate_fn)
            done.stages.append("calibrate")
    model.gpusq_prepared = list(done.stages)
    return done
