"""Argument groups every ``gpusq`` command spells the same way.

``--json [FILE]``: the command's result as JSON, on stdout (bare ``--json``) or written to FILE (then
the usual human-readable line is printed too). ``--model-arg KEY=VALUE``: a model constructor keyword
(repeatable, or comma-separated). ``--out`` / ``--overwrite`` / ``--resume``: where an output goes.
``--set KEY=VALUE``: a recipe field (``train`` has no recipe: only its ``augment.*`` fields);
``--no-flip``: ``augment.hflip=0``.
``--batch`` lists: ``parse_batches``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from gpusq.errors import GpusqError


def add_json(ap: argparse.ArgumentParser, what: str = "the result") -> None:
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help=f"{what} as JSON: on stdout, or written to FILE")


def add_model_arg(ap: argparse.ArgumentParser, help: str | None = None) -> None:
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help=help or "model constructor keyword, e.g. img_size=32 (repeatable, or comma-separated)")


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["img_size=32", "patch_size=4"]`` → ``{"img_size": 32, "patch_size": 4}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise GpusqError(f"model argument '{part}' is not KEY=VALUE")
            k, v = part.split("=", 1)
            out[k.strip()] = yaml.safe_load(v)
    return out


def device_of(args: argparse.Namespace):
    """The run's device from ``--device``: under torchrun this rank's (joining the process group),
    else ``--device``, default CUDA when available (``gpusq.engine.device_of``)."""
    from gpusq.engine import device_of as engine_device

    return engine_device(args.device)


def add_recipe_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--recipe", default="int8", help="int8 | int4 | fp8 | sparse | a YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. train.stage1.epochs=2 or augment.mixup=0.8 (repeatable)")


def add_augment_args(ap: argparse.ArgumentParser) -> None:
    """``gpusq train`` (no recipe): ``--set augment.FIELD=VALUE`` and ``--no-flip``."""
    ap.add_argument("--set", action="append", default=[], metavar="augment.FIELD=VALUE",
                    help="training augmentation, e.g. augment.auto_augment=rand-m9-mstd0.5-inc1, augment.mixup=0.8 "
                         "(repeatable; the recipe's augment section: docs/augment.md)")
    add_no_flip(ap)


def add_no_flip(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-flip", action="store_true",
                    help="no horizontal flips in training (digits, text, many medical images): augment.hflip=0")


def _overrides(args: argparse.Namespace) -> dict:
    from gpusq.recipes import _merge, parse_override

    overrides: dict = {}
    for s in args.set:
        overrides = _merge(overrides, parse_override(s))
    if getattr(args, "no_flip", False):
        overrides = _merge(overrides, {"augment": {"hflip": 0.0}})
    return overrides


def recipe_of(args: argparse.Namespace):
    """The ``--recipe`` with every ``--set`` override (and ``--no-flip``) merged in (strictly checked by
    ``load_recipe``)."""
    from gpusq.recipes import load_recipe

    return load_recipe(args.recipe, _overrides(args))


def augment_of(args: argparse.Namespace):
    """``gpusq train``'s augmentation: its ``--set augment.*`` and ``--no-flip`` over the defaults."""
    from gpusq.augment import AugmentConfig
    from gpusq.recipes import _build

    over = _overrides(args)
    other = next((k for k in over if k != "augment"), None)
    if other is not None:
        raise GpusqError(f"--set {other}...: gpusq train has no recipe, only augment.* fields can be set")
    return _build(AugmentConfig, over.get("augment", {}), "augment")


def add_stage_args(ap: argparse.ArgumentParser) -> None:
    """``gpusq compress``'s run controls, the same for every task."""
    ap.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps")
    ap.add_argument("--stage1-from", default=None, help="reuse the stage1/ dir of an earlier run (skip stage 1)")


def add_out_args(ap: argparse.ArgumentParser) -> None:
    """``--out`` with ``--overwrite`` / ``--resume``: every command that writes a gpusq output."""
    ap.add_argument("--out", required=True, help="output directory: new or empty, or see --overwrite / --resume")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the gpusq output already in --out (its files are removed when the run starts; "
                         "other files are kept)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")


def emit_json(obj: Any, dest: str | None, indent: int | None = None) -> bool:
    """Write ``obj`` where ``--json`` asked (stdout for ``-``, else the file, atomically); returns whether
    it went to stdout (the caller then prints nothing else)."""
    if dest is None:
        return False
    text = json.dumps(obj, indent=indent, default=str)
    if dest == "-":
        print(text)
        return True
    from gpusq.checkpoint import atomic_write_text

    atomic_write_text(dest, text + "\n")
    return False


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise GpusqError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not out or any(b <= 0 for b in out):
        raise GpusqError(f"--batch must list positive integers, got {text!r}")
    return out


def parse_hw(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise GpusqError(f"--input-size must be H,W (two integers), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise GpusqError(f"--input-size must be positive, got {text!r}")
    return h, w
