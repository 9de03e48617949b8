"""gpusq: GPUSQ-ViT compression (2:4 sparsity + INT8/INT4/FP8 QAT with distillation) for ViTs.

Lifecycle: ``sparsify_`` → sparse KD fine-tune → ``quantize_`` + ``calibrate`` → QAT with KD →
``save_compressed`` → deploy (GPU kernels) or export (ONNX). ``prepare_(model, recipe)`` applies a
recipe without training (the same steps, post-training).
"""

__version__ = "0.1.0"

from gpusq.distill import DistillationLoss, DistillConfig  # noqa: E402
from gpusq.prepare import Prepared, prepare_  # noqa: E402
from gpusq.quant import QuantConfig, QuantSpec, calibrate, quantize_  # noqa: E402
from gpusq.recipes import Recipe, list_recipes, load_recipe  # noqa: E402
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_  # noqa: E402

__all__ = [
    "DistillConfig",
    "DistillationLoss",
    "Prepared",
    "QuantConfig",
    "QuantSpec",
    "Recipe",
    "SparsityConfig",
    "calibrate",
    "check_2to4",
    "list_recipes",
    "load_recipe",
    "prepare_",
    "quantize_",
    "sparsify_",
]
