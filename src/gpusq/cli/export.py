"""``gpusq export``: ONNX with explicit Q/DQ and 2:4 weights, optionally verified in onnxruntime (``gpusq.export``);
``--format hf``: a Hugging Face ``save_pretrained`` directory of a compressed HF classifier (``gpusq.hf``).

The HF directory is an export, not a compress option: like ONNX it turns an existing gpusq output into
another tool's format, works on any output (no re-training to get it) and keeps one place for formats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpusq.errors import GpusqError
from gpusq.export import MAX_OPSET, MIN_OPSET, export_onnx, load_model, verify


def cli_main(argv: list[str], prog: str = "gpusq export", command: str = "export") -> int:  # noqa: ARG001
    ap = argparse.ArgumentParser(prog=prog, description="Export a gpusq compressed model to ONNX with "
                                 "explicit Q/DQ (TensorRT explicit quantization) and 2:4 sparse weights, or (--format "
                                 "hf, Hugging Face models) to a directory transformers loads, effective weights "
                                 "as dense floats.")
    ap.add_argument("--checkpoint", required=True, help="a `gpusq compress` output directory (--format hf: of a "
                    "Hugging Face model)")
    ap.add_argument("--format", default="onnx", choices=["onnx", "hf"],
                    help="onnx (default) or hf: a save_pretrained directory (AutoModelForImageClassification "
                         "loads it; 2:4 zeros and on-grid weights as dense floats, no activation quantization)")
    ap.add_argument("--out", required=True, help="output .onnx file, or directory with --format hf "
                    "(not replaced unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--opset", type=int, default=None,
                    help=f"{MIN_OPSET}..{MAX_OPSET} (default: 21 with int4 weights, 19 with fp8, else 17)")
    ap.add_argument("--verify", metavar="DATA", default=None,
                    help="compare onnxruntime with PyTorch on DATA: 'random', 'mnist5k', "
                    "an ImageFolder dir or .zip (--format hf: 'random', transformers vs gpusq)")
    ap.add_argument("--verify-samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of the verification")
    args = ap.parse_args(argv)
    if args.verify_samples <= 0 or args.batch_size <= 0:
        raise GpusqError("--verify-samples and --batch-size must be > 0")
    if args.format == "hf":
        return _export_hf(args)
    if Path(args.out).is_file() and not args.overwrite:  # checked before the work, so nothing is lost
        raise GpusqError(f"{args.out} already exists; pass --overwrite to replace it")
    model = load_model(args.checkpoint)
    if args.verify and args.verify != "random":  # the checkpoint's classes must be the data's (gpusq.classes)
        from gpusq.classes import check_classes, head_size, recorded_classes
        from gpusq.data import build_dataset
        from gpusq.families import model_input_size

        _, info = build_dataset(args.verify, "val", model_input_size(model))
        check_classes(recorded_classes(args.checkpoint), head_size(model), info.classes,
                      who=f"checkpoint {args.checkpoint}", data=args.verify)
    res = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {res.path}  opset {res.opset}  {res.layers} compressed layers  "
          f"weights {res.weight_formats}  inputs {res.act_formats}")
    print(f"Q/DQ: {res.qdq['QuantizeLinear']} QuantizeLinear, {res.qdq['DequantizeLinear']} DequantizeLinear "
          f"({res.qdq['weight_dq']} weight DQ + {res.qdq['act_qdq']} activation Q/DQ pairs)")
    if res.fallbacks:
        print(f"fallback: {res.fallbacks[0]}" + (f" (and {len(res.fallbacks) - 1} more layers)"
                                                  if len(res.fallbacks) > 1 else ""))
    if args.verify:
        r = verify(model, res.path, args.verify, n=args.verify_samples, batch_size=args.batch_size, floor=True)
        print(f"onnxruntime vs PyTorch on {args.verify} ({r['n']} images): top-1 agreement "
              f"{100 * r['top1_agree']:.2f}%  logits rel. error {r['rel_err']:.2e}  "
              f"max abs {r['max_abs_err']:.2e}")
        if "torch_top1" in r:
            print(f"accuracy on the labels: PyTorch {100 * r['torch_top1']:.2f}%  "
                  f"onnxruntime {100 * r['ort_top1']:.2f}%")
        print(f"noise floor, PyTorch vs itself: fused vs math SDPA: top-1 agreement "
              f"{100 * r['floor_top1_agree']:.2f}%, rel. error {r['floor_rel_err']:.2e};  input x (1 + 1e-6 noise): "
              f"top-1 agreement {100 * r['noise_top1_agree']:.2f}%, rel. error {r['noise_rel_err']:.2e}")
    sys.stdout.flush()
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    """``--format hf``: write the directory, then (``--verify``) reload it in transformers against the model."""
    import shutil

    from gpusq import hf
    from gpusq.classes import recorded_classes
    from gpusq.recipes import load_recipe

    out = Path(args.out)
    replace = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if replace:
        if not args.overwrite:
            raise GpusqError(f"{out} already exists; pass --overwrite to replace it (or choose a new directory)")
        if not (out / "config.json").is_file():
            raise GpusqError(f"--overwrite: {out} is not a Hugging Face directory written before; not replacing it")
    from gpusq.pipeline import load_any

    model = load_any(args.checkpoint)  # a compressed output, or a dense one (`gpusq train` of an HF model)
    hf.check_hf_model(model)  # refused before the old directory is removed
    if replace:
        shutil.rmtree(out)
    recipe = Path(args.checkpoint) / "recipe.yaml"
    name = load_recipe(str(recipe)).name if recipe.is_file() else ""
    hf.save_hf_dir(model, out, name, recorded_classes(args.checkpoint))
    from gpusq.layers import compressed_layers

    what = ("effective weights as dense float32, activation quantization left out: README.md there"
            if compressed_layers(model) else "a dense model, its weights as they are")
    print(f"wrote {out}  (transformers AutoModelForImageClassification; {what})")
    if args.verify:
        if args.verify != "random":
            raise GpusqError("--format hf verifies on random inputs: pass --verify random")
        r = hf.verify_hf_dir(model, out, n=min(args.verify_samples, 64))
        print(f"transformers vs gpusq (activation quantizers off) on {r['n']} random inputs: top-1 agreement "
              f"{100 * r['top1_agree']:.2f}%  max abs {r['max_abs_err']:.2e}  rel. error {r['rel_err']:.2e}")
    sys.stdout.flush()
    return 0
