"""``gpusq recipes``: list the shipped recipes, or print one as YAML (``gpusq.recipes``)."""

from __future__ import annotations

import argparse

import yaml

from gpusq.recipes import list_recipes, load_recipe


def cli_main(argv: list[str], prog: str = "gpusq recipes", command: str = "recipes") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="List the shipped recipes, or print one as YAML.")
    ap.add_argument("name", nargs="?", help="a recipe to print in full")
    args = ap.parse_args(argv)
    if args.name:
        print(yaml.safe_dump(load_recipe(args.name).to_dict(), sort_keys=False), end="")
        return 0
    for n in list_recipes():
        print(f"{n:<8} {load_recipe(n).description}")
    return 0
