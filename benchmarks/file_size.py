"""Size on disk of compressed outputs vs the accounting (`gpusq stats`) vs the FP32 state dict.

For each model x recipe (random timm weights, through the Python API: sparsify_ + quantize_ +
calibrate on random images, then ``save_compressed``), prints the FP32 safetensors file of the dense
model, the compressed model.safetensors, ``stats.size_bytes_compressed``, and the ratios.

    python benchmarks/file_size.py [--model deit_base_patch16_224,swin_tiny_patch4_window7_224]
                                   [--recipe int8,int4,fp8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def measure(model_name: str, recipe_name: str) -> dict:
    from safetensors.torch import save_file

    from gpusq import families
    from gpusq.checkpoint import save_compressed
    from gpusq.families import model_input_size
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_
    from gpusq.stats import model_stats

    torch.manual_seed(0)
    model = families.build(model_name).eval()
    recipe = load_recipe(recipe_name)
    with tempfile.TemporaryDirectory() as d:
        dense_file = Path(d) / "dense.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_file))
        dense_bytes = dense_file.stat().st_size
        sparsify_(model, recipe.sparsity)
        if recipe.quantized:
            quantize_(model, recipe.quant)
            x = torch.randn(2, *model_input_size(model))
            calibrate(model, lambda m: m(x))
        save_compressed(model, Path(d) / "out", recipe, model_name, {})
        file_bytes = (Path(d) / "out" / "model.safetensors").stat().st_size
    st = model_stats(model, recipe, flops=False)
    return {"model": model_name, "recipe": recipe_name, "fp32_file_bytes": dense_bytes,
            "fp32_param_bytes": st["size_bytes_fp32"], "file_bytes": file_bytes,
            "stats_bytes": st["size_bytes_compressed"], "file_vs_stats": file_bytes / st["size_bytes_compressed"],
            "x_vs_fp32_file": dense_bytes / file_bytes, "x_stats": st["size_ratio"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_base_patch16_224,swin_tiny_patch4_window7_224")
    ap.add_argument("--recipe", default="int8,int4,fp8")
    ap.add_argument("--json")
    a = ap.parse_args()
    print(f"{'model':<30} {'recipe':<6} {'FP32 file MB':>12} {'file MB':>9} {'stats MB':>9} {'file/stats':>10} "
          f"{'x FP32 file':>11} {'x stats':>8}", flush=True)
    rows = []
    for m in a.model.split(","):
        for rn in a.recipe.split(","):
            r = measure(m, rn)
            rows.append(r)
            print(f"{r['model']:<30} {r['recipe']:<6} {r['fp32_file_bytes'] / 1e6:>12.2f} "
                  f"{r['file_bytes'] / 1e6:>9.2f} {r['stats_bytes'] / 1e6:>9.2f} {r['file_vs_stats']:>10.3f} "
                  f"{r['x_vs_fp32_file']:>11.2f} {r['x_stats']:>8.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
