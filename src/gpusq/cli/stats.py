"""``gpusq stats``: parameters, size and bit-op accounting of a model under a recipe (``gpusq.stats``)."""

from __future__ import annotations

import argparse

from gpusq.cli.args import add_json, add_model_arg, emit_json, parse_model_kwargs
from gpusq.errors import GpusqError
from gpusq.recipes import load_recipe
from gpusq.stats import checkpoint_stats, format_table, stats


def cli_main(argv: list[str], prog: str = "gpusq stats", command: str = "stats") -> int:
    from gpusq import families

    ap = argparse.ArgumentParser(
        prog=prog,
        description="Parameters, deployed size and bit-op ratios of a model under a recipe "
                    "(random weights, no training, CPU is fine).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model",
                     help="model name, or several separated by commas: a timm classifier (e.g. deit_base_patch16_224) "
                          f"or one of {', '.join(families.names())}")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a gpusq compress output (classification, detection or segmentation): counts the "
                          "model as stored and reports its model.safetensors size beside the accounting")
    add_model_arg(ap, "model constructor keyword (repeatable, or comma-separated), e.g. img_size=32")
    ap.add_argument("--recipe", default="int8",
                    help="recipe name or YAML file; several names separated by commas (default: int8)")
    add_json(ap, "one object, or a list when several models/recipes are given,")
    args = ap.parse_args(argv)
    if args.checkpoint:
        row = checkpoint_stats(args.checkpoint)
        if not emit_json(row, args.json, indent=2):
            print(format_table([row]))
        return 0
    kwargs = parse_model_kwargs(args.model_arg)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    recipe_names = [r.strip() for r in args.recipe.split(",") if r.strip()]
    if not models:
        raise GpusqError("--model is empty")
    if not recipe_names:
        raise GpusqError("--recipe is empty")
    recipes = [load_recipe(r) for r in recipe_names]  # fail on a bad name before any model work
    rows = [stats(m, r, **kwargs) for m in models for r in recipes]
    if not emit_json(rows[0] if len(rows) == 1 else rows, args.json, indent=2):
        print(format_table(rows))
    return 0
