"""gpusq: GPUSQ-ViT compression (2:4 sparsity + INT8/INT4/FP8 QAT with distillation) for ViTs.

Lifecycle: ``sparsify_`` → sparse KD fine-tune → ``quantize_`` + ``calibrate`` → QAT with KD →
``save_compressed`` → deploy (GPU kernels) or export (ONNX). ``prepare_(model, recipe)`` applies a
recipe without training (the same steps, post-training). ``Distiller`` is the method's KD for your own
training loop; ``compress(teacher, recipe, train=loader, val=loader, out=DIR)`` the whole method on
your own DataLoaders (or ``data=DataOptions(PATH)``). ``compress`` / ``DataOptions`` load the training
code (timm, the engine) when first used, not on ``import gpusq``.
"""

__version__ = "0.1.0"

from gpusq.distill import DistillationLoss, DistillConfig, Distiller  # noqa: E402
from gpusq.prepare import Prepared, prepare_  # noqa: E402
from gpusq.quant import QuantConfig, QuantSpec, calibrate, quantize_  # noqa: E402
from gpusq.recipes import Recipe, list_recipes, load_recipe  # noqa: E402
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_  # noqa: E402

_LAZY = {"compress": "gpusq.pipeline", "DataOptions": "gpusq.pipeline"}  # the training code, on first use


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpusq' has no attribute {name!r}")


__all__ = [
    "DataOptions",
    "DistillConfig",
    "DistillationLoss",
    "Distiller",
    "Prepared",
    "QuantConfig",
    "QuantSpec",
    "Recipe",
    "SparsityConfig",
    "calibrate",
    "check_2to4",
    "compress",
    "list_recipes",
    "load_recipe",
    "prepare_",
    "quantize_",
    "sparsify_",
]
