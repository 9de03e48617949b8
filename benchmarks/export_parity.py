"""ONNX export parity: gpusq fake-quant PyTorch vs the exported Q/DQ graph in onnxruntime (CPU).

For each model and recipe: random weights (no downloads), 2:4 sparsify, quantize, calibrate on
random images, export with ``gpusq.export.export_onnx``, check the graph (Q/DQ counts, 2:4 in every
weight initializer), then run onnxruntime next to PyTorch and print top-1 agreement and the
logits' relative error ``||ort - torch|| / ||torch||``.

    python benchmarks/export_parity.py                       # deit_tiny + swin_tiny, int8 + int4
    python benchmarks/export_parity.py --data /work/shared/data/cifar10-jpeg-20k.zip --samples 128
    # a trained dense model (gpusq train output): 2:4 + quantize + calibrate on its training data
    # (no fine-tuning), then parity and accuracy on its test split
    python benchmarks/export_parity.py --teacher runs/mnist-teacher --data mnist5k --samples 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx
import torch

from gpusq import families
from gpusq.export import export_onnx, is_2to4_array, qdq_summary, verify, weight_initializers
from gpusq.families import model_input_size
from gpusq.layers import compressed_layers
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import load_recipe
from gpusq.sparsity import sparsify_

MODELS = ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]


def calib_images(args, size) -> list[torch.Tensor]:
    """Random images, or the first training images of ``--data`` when a trained teacher is used."""
    if args.teacher is None:
        g = torch.Generator().manual_seed(args.seed + 1)
        return [torch.randn(args.calib_batch, *size, generator=g) for _ in range(args.calib_batches)]
    from gpusq.data import Batches, build_dataset, prepare_batch

    ds, _ = build_dataset(args.data, "train", size)
    out = []
    for x, _, _ in Batches(ds, args.calib_batch, shuffle=True, seed=args.seed, workers=0):
        out.append(prepare_batch(x, torch.device("cpu"), train=False, flip=False))
        if len(out) == args.calib_batches:
            break
    return out


def run_one(name: str, recipe: str, args, tmp: Path) -> dict:
    torch.manual_seed(args.seed)
    if args.teacher is None:
        model = families.build(name, num_classes=args.num_classes).eval()
    else:
        from gpusq.pipeline import load_any

        model = load_any(args.teacher).eval()
    size = model_input_size(model)
    r = load_recipe(recipe)
    sparsify_(model, r.sparsity)
    quantize_(model, r.quant)
    calib = calib_images(args, size)

    def loop(m):
        for x in calib:
            m(x)

    calibrate(model, loop)
    model.eval()
    path = tmp / f"{name}-{recipe}.onnx"
    t0 = time.perf_counter()
    res = export_onnx(model, path)
    t_export = time.perf_counter() - t0
    proto = onnx.load(str(path))
    n_layers = len(compressed_layers(model))
    q = qdq_summary(proto)
    inits = weight_initializers(proto)
    ok_24 = len(inits) == n_layers and all(is_2to4_array(a) for a in inits.values())
    t0 = time.perf_counter()
    v = verify(model, path, args.data, n=args.samples, batch_size=args.batch_size, floor=True)
    t_verify = time.perf_counter() - t0
    return dict(model=name, recipe=recipe, opset=res.opset, layers=n_layers, Q=q["QuantizeLinear"],
                DQ=q["DequantizeLinear"], two_four=ok_24, mb=path.stat().st_size / 2**20, export_s=t_export,
                verify_s=t_verify, **v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--recipes", nargs="+", default=["int8", "int4"])
    ap.add_argument("--data", default="random", help="'random', 'mnist5k', an ImageFolder dir or .zip")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default=None, help="a trained dense model (gpusq train output) instead of "
                    "random-weight --models; calibrated on --data's training split")
    args = ap.parse_args()
    if args.teacher is not None:
        args.models = [f"teacher:{Path(args.teacher).name}"]
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  "
          f"onnxruntime {__import__('onnxruntime').__version__}  data={args.data}  samples={args.samples}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            for recipe in args.recipes:
                rows.append(run_one(name, recipe, args, Path(d)))
                r = rows[-1]
                print(f"  done {name} {recipe}: agree {r['top1_agree']:.4f} rel {r['rel_err']:.2e} "
                      f"(floor sdpa {r['floor_top1_agree']:.4f} / {r['floor_rel_err']:.2e}, "
                      f"noise {r['noise_top1_agree']:.4f} / {r['noise_rel_err']:.2e})", flush=True)
    print()
    acc = "torch_top1" in rows[0]
    print("| model | recipe | opset | layers | Q | DQ | 2:4 weights | MB | images "
          "| ORT vs torch: top-1 agree | rel. error | max abs | torch fused vs math SDPA: top-1 agree "
          "| rel. error | torch vs torch on input·(1+1e-6 noise): top-1 agree | rel. error |"
          + (" top-1 acc torch / ORT |" if acc else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if acc else ""))
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['opset']} | {r['layers']} | {r['Q']} | {r['DQ']} | "
              f"{'yes' if r['two_four'] else 'NO'} | {r['mb']:.1f} | {r['n']} | {100 * r['top1_agree']:.2f}% "
              f"| {r['rel_err']:.2e} | {r['max_abs_err']:.2e} | {100 * r['floor_top1_agree']:.2f}% "
              f"| {r['floor_rel_err']:.2e} | {100 * r['noise_top1_agree']:.2f}% | {r['noise_rel_err']:.2e} |"
              + (f" {100 * r['torch_top1']:.2f}% / {100 * r['ort_top1']:.2f}% |" if acc else ""))


if __name__ == "__main__":
    main()
