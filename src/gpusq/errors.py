"""User-facing errors: one line that names the problem, printed by the CLI without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GpusqError(Exception):
    """An error caused by user input (a path, a name, a setting) rather than a bug in gpusq."""

    exit_code = 2


class InternalError(RuntimeError):
    """A broken invariant inside gpusq: a bug, not bad input. The CLI shows its traceback."""


def close_matches(word: str, choices: Iterable[str], n: int = 5) -> str:
    """A ', '-joined list of the choices closest to ``word`` (empty if none is close)."""
    return ", ".join(difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5))
