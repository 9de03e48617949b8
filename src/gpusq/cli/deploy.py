"""``gpusq deploy --warmup``: fill the algorithm cache for a model before serving it.

The first ``deploy()`` of a model times cuSPARSELt's algorithms for every new GEMM shape (about
10 s for Swin-T at batch sizes 1 and 256 on the H200, docs/deploy.md); the choices are kept in
``~/.cache/gpusq/cslt_algs.json`` (``GPUSQ_CACHE_DIR``) and every later process on the same GPU and
library versions starts without searching. This command does that first deploy ahead of time, for a
``gpusq compress`` output or, with random weights (speed does not depend on them), for a timm model
name under a recipe, and says how many shapes it searched and where they are kept.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser(prog: str) -> argparse.ArgumentParser:
    from gpusq.cli.args import add_model_arg

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a gpusq compress output directory")
    src.add_argument("--model", help="a classifier, e.g. a timm model name (random weights, compressed with --recipe)")
    add_model_arg(ap, "model constructor keyword with --model (repeatable, or comma-separated)")
    ap.add_argument("--recipe", default="int8", help="recipe for --model (default int8)")
    ap.add_argument("--batch", default="1,256", help="batch sizes to prepare, comma-separated (default 1,256)")
    ap.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                    help="fused transformer blocks where they qualify (auto), required (on), never (off)")
    ap.add_argument("--warmup", action="store_true", required=True,
                    help="prepare the batch sizes and fill the algorithm cache (the only action so far)")
    return ap


def cli_main(argv: list[str], prog: str = "gpusq deploy", command: str = "deploy") -> int:
    from gpusq.bench import _calibrated
    from gpusq.cli.args import parse_batches
    from gpusq.deploy import check_gpu, deploy
    from gpusq.deploy.cusparselt import _load_disk_cache, cache_path

    args = build_parser(prog).parse_args(argv)
    batches = parse_batches(args.batch)
    dev = check_gpu()  # a one-line error on a machine without a suitable GPU, before anything is built
    import torch

    fused = {"auto": "auto", "on": True, "off": False}[args.fused]
    before = len(_load_disk_cache())
    t0 = time.perf_counter()
    if args.checkpoint:
        dm = deploy(args.checkpoint, batch_sizes=batches, fused=fused)
        what = args.checkpoint
    else:
        from gpusq import families
        from gpusq.cli.args import parse_model_kwargs
        from gpusq.errors import GpusqError
        from gpusq.recipes import load_recipe

        recipe = load_recipe(args.recipe)
        fam = families.lookup(args.model)
        if fam.task != "classification":
            raise GpusqError(f"deploy builds classification models; {args.model} is a {fam.task} model: "
                             f"`gpusq bench --model {args.model}` measures it on the GPU kernels")
        base = fam.build(args.model, **parse_model_kwargs(args.model_arg)).eval()
        size = fam.input_size_of(base)
        calib = torch.randn(8, *size, generator=torch.Generator().manual_seed(1)).to(dev)
        fq = _calibrated(base.to(dev), recipe.quant, calib, sparse=recipe.sparse,
                         sparsity=fam.sparsity_config(recipe.sparsity))  # its family's GEMMs, as gpusq compress
        dm = deploy(fq, recipe, batch_sizes=batches, fused=fused, input_size=size)
        what = f"{args.model} ({recipe.name}, random weights)"
    seconds = time.perf_counter() - t0
    added = len(_load_disk_cache()) - before
    print(f"{what}: batch sizes {', '.join(map(str, batches))} prepared in {seconds:.1f} s; blocks {dm.fused}; "
          f"{added} new GEMM shape(s) searched, kept in {cache_path()}", file=sys.stderr)
    return 0
