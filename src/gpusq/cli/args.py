"""Argument groups every ``gpusq`` command spells the same way.

``--json [FILE]``: the command's result as JSON, on stdout (bare ``--json``) or written to FILE (then
the usual human-readable line is printed too). ``--model-arg KEY=VALUE``: a model constructor keyword
(repeatable, or comma-separated).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_json(ap: argparse.ArgumentParser, what: str = "the result") -> None:
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help=f"{what} as JSON: on stdout, or written to FILE")


def add_model_arg(ap: argparse.ArgumentParser, help: str | None = None) -> None:
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help=help or "model constructor keyword, e.g. img_size=32 (repeatable, or comma-separated)")


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
