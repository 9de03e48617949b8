"""``gpusq bench``: parse the options, run the variants of ``gpusq.bench`` side by side, print and save.

(The variants, timing and profiling live in ``gpusq.bench``; its module docstring says what each
variant is.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from gpusq import bench
from gpusq.bench import (
    CATEGORIES,
    SWEEP,
    VARIANTS,
    Variant,
    _version,
    add_ratios,
    first_block_call,
    format_table,
    plot,
    profile,
    task_parts,
    time_runner,
)
from gpusq.cli.args import add_json, add_model_arg, parse_batches, parse_hw
from gpusq.errors import GpusqError


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=bench.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_base_patch16_224",
                    help="model name(s), comma-separated: timm classifiers, Hugging Face ViTForImageClassification / "
                         "SwinForImageClassification / a local HF directory, maskrcnn_swin_t, upernet_swin_t, ... "
                         "(default deit_base_patch16_224)")
    add_model_arg(ap, "classifier constructor keyword (repeatable, or comma-separated)")
    ap.add_argument("--input-size", default=None, metavar="H,W",
                    help="image size for detection/segmentation models (default 800,1344 for Mask R-CNN, "
                         "512,512 for UPerNet)")
    ap.add_argument("--recipe", default="int8",
                    help="recipe of the gpusq variant (int8, int4, fp8, sparse, a YAML)")
    ap.add_argument("--batch", default="1,256", help="batch sizes, comma-separated (default 1,256)")
    ap.add_argument("--sweep", action="store_true", help=f"batch sweep {','.join(map(str, SWEEP))}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="torch.compile each transformer block (default; fast to compile) or the whole model")
    ap.add_argument("--fp8-kernel", default="auto", choices=("auto", "sparse", "dense"),
                    help="for --recipe fp8: time 2:4 cuSPARSELt vs dense per shape (auto) or force one")
    ap.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                    help="fused transformer blocks for gpusq and fp8-dense: where they qualify (auto), required "
                         "(on), or never (off: the per-layer path)")
    ap.add_argument("--fused-attn", default="off", choices=("on", "off"),
                    help="attention through SDPA in every variant where timm has the switch (Swin's window "
                         "attention; default off, as gpusq.deploy: slower on the H100)")
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timing sample (default 0.02)")
    ap.add_argument("--reps", type=int, default=15, help="timing samples per measurement (median reported)")
    add_json(ap, "all results (environment, timings, profiles, kernel choices)")
    ap.add_argument("--plot", metavar="FILE", help="write a plot (PNG) of the results")
    ap.add_argument("--profile", action="store_true", help="per-op GPU time breakdown at the largest batch")
    return ap


def cli_main(argv: list[str], prog: str = "gpusq bench", command: str = "bench") -> int:

    args = build_parser(prog).parse_args(argv)
    batches = list(SWEEP) if args.sweep else parse_batches(args.batch)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise GpusqError(f"unknown variant(s) {', '.join(bad)} (choose from {', '.join(VARIANTS)})")
    from gpusq import families
    from gpusq.cli.args import parse_model_kwargs
    from gpusq.deploy import check_gpu, enable_fused_attention, searched_algs
    from gpusq.recipes import load_recipe

    check_gpu()
    import torch

    recipe = load_recipe(args.recipe)
    kwargs = parse_model_kwargs(args.model_arg)
    torch.manual_seed(0)
    rows: list[dict] = []
    profiles: dict = {}
    kernels: dict = {}
    setup: dict = {}
    hw = parse_hw(args.input_size)
    for model_name in [m.strip() for m in args.model.split(",") if m.strip()]:
        task = task_parts(model_name, hw)
        extra = select = None
        if task is not None:  # the family's GEMMs (minus the recipe's exclude patterns), in the part timed
            base, size, extra, regions = task.base, task.size, task.extra, task.family.compile_regions
            select = task.select(recipe.sparsity.exclude)
            rec = recipe
            label = f"{model_name}:{task.part}"
        else:
            fam = families.lookup(model_name, "classification")
            base = fam.build(model_name, **kwargs).eval()
            size, regions = fam.input_size_of(base), fam.compile_regions
            rec = dataclasses.replace(recipe, sparsity=fam.sparsity_config(recipe.sparsity))  # as gpusq compress
            label = model_name
        if args.fused_attn == "on":  # on the shared base: every variant, deployed ones included, is a copy
            enable_fused_attention(base)
        for vname in variants:
            print(f"[{label}] building {vname} ...", file=sys.stderr, flush=True)
            var = Variant(vname, base, args, rec, size, select=select, regions=regions)
            setup[f"{model_name}/{vname}"] = {"build_s": var.setup_s}
            for b in batches:
                xs = [torch.randn(b, *size, device="cuda") for _ in range(2)]
                t0 = time.perf_counter()
                try:
                    runner, fn = var.runner(xs[0])
                except torch.cuda.OutOfMemoryError:
                    print(f"[{model_name}] {vname} batch {b}: out of GPU memory, skipped", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                setup[f"{model_name}/{vname}"][f"capture_s_b{b}"] = time.perf_counter() - t0
                t = time_runner(runner, xs, args.min_time, args.reps)
                row = {"model": label, "variant": vname, "batch": b, **t, "img_s": b / t["ms"] * 1e3}
                rows.append(row)
                print(f"[{label}] {vname:<13} batch {b:>4}: {t['ms']:.3f} ms  {row['img_s']:.0f} img/s",
                      file=sys.stderr, flush=True)
                if extra is not None:
                    part2, timer = extra
                    t2 = timer(var, runner, b, args.min_time, args.reps)
                    row2 = {"model": f"{model_name}:{part2}", "variant": vname, "batch": b, **t2,
                            "img_s": b / t2["ms"] * 1e3}
                    rows.append(row2)
                    print(f"[{model_name}:{part2}] {vname:<13} batch {b:>4}: {t2['ms']:.3f} ms  "
                          f"{row2['img_s']:.0f} img/s", file=sys.stderr, flush=True)
                if args.profile:
                    var._set_tf32()
                    if b == max(batches):
                        profiles[f"{label}/{vname}/b{b}"] = p = profile(fn, xs[0])
                    else:  # smaller batches: the kernel count only (the latency target is a count target)
                        p = {"kernels_per_forward": profile(fn, xs[0])["kernels_per_forward"]}
                        profiles[f"{label}/{vname}/b{b}"] = p
                    p["graph_ms"] = t["ms"]
                    m = var.deployed.model if var.deployed is not None else var.model
                    blk = first_block_call(m, xs[0].to(var.deployed.input_dtype if var.deployed is not None
                                                       else var.dtype))
                    if blk is not None:
                        p["kernels_per_block"] = profile(blk, xs[0])["kernels_per_forward"]
                del runner, fn
            if var.deployed is not None:
                kernels[f"{label}/{vname}"] = var.deployed.kernel_report()
                path = {"blocks": var.deployed.fused, "embed_and_head": var.deployed.fused_forward}
                setup[f"{model_name}/{vname}"]["path"] = path
                print(f"[{label}] {vname}: {path}", file=sys.stderr)
            del var
            torch.cuda.empty_cache()
        if len(args.model.split(",")) > 1:  # each model's table as soon as it is done
            add_ratios(rows)
            print(format_table([r for r in rows if r["model"].split(":")[0] == model_name]) + "\n", flush=True)
    add_ratios(rows)
    print(format_table(rows))
    if profiles:
        print("\nGPU kernel time per forward (ms) by category, largest batch (eager calls, profiler); kernel "
              "launches per forward and per transformer block:")
        print(f"{'run':<48} " + " ".join(f"{c:>12}" for c in CATEGORIES)
              + f" {'sum':>8} {'graph':>8} {'kern/fwd':>8} {'kern/blk':>8}")
        for k, p in profiles.items():
            cats = p.get("by_category_ms")
            cols = " ".join(f"{cats[c]:>12.3f}" for c in CATEGORIES) if cats else " ".join(f"{'':>12}" for _ in
                                                                                           CATEGORIES)
            tot = f"{p['total_kernel_ms']:>8.3f}" if cats else f"{'':>8}"
            kb = p.get("kernels_per_block")
            print(f"{k:<48} {cols} {tot} {p['graph_ms']:>8.3f} {p['kernels_per_forward']:>8.0f} "
                  + (f"{kb:>8.0f}" if kb is not None else f"{'-':>8}"))
    for key, rep in kernels.items():
        kinds: dict[str, int] = {}
        for layer in rep:
            for kern, _alg in layer["choice"].values():
                tag = f"{layer['kind']}:{kern}"
                kinds[tag] = kinds.get(tag, 0) + 1
        print(f"kernels {key}: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    if args.json:
        from gpusq.cli.args import emit_json
        from gpusq.deploy.cusparselt import cusparselt_version

        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cusparselt": cusparselt_version(), "nvmath": _version("nvmath-python"),
               "triton": _version("triton"), "timm": _version("timm"), "argv": ["gpusq", command, *argv]}
        emit_json({"env": env, "results": rows, "profiles": profiles, "kernels": kernels, "setup": setup,
                   "cslt_algs": searched_algs()}, args.json, indent=1)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return 0
