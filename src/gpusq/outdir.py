"""``--out`` directories: nothing is overwritten unless asked, and nothing that is not gpusq's is touched.

``gpusq train`` / ``gpusq compress`` (also with ``--task``) and ``gpusq demo`` write into ``--out``:

* a missing or empty directory is used as is;
* a directory holding a gpusq output (a model, a report, checkpoints of an interrupted run) is
  refused with one line, unless ``--overwrite`` (its gpusq files are removed when the run starts;
  other files in it are kept) or ``--resume`` (continue the interrupted run it holds);
* a non-empty directory that holds no gpusq output is always refused, naming what is there: a
  user pointing ``--out`` at a folder of their own (their home directory) loses nothing.

Under ``torchrun`` only global rank 0 (``RANK``) checks and clears; the other ranks never write.
The Python API (``gpusq.compress(..., out=, resume=, overwrite=)``) checks the same way, its messages
naming its own arguments (``PYTHON_FLAGS``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from gpusq.errors import GpusqError

# what `gpusq train|compress` (with or without --task) write into --out
OUTPUT_ENTRIES = ("model.safetensors", "model.yaml", "recipe.yaml", "task.yaml", "report.json", "report.md",
                  "training.png", "stage1", "checkpoints", ".train")
RUN_STATE = ("checkpoints", ".train", "stage1")  # what an interrupted run leaves for --resume
# what `gpusq demo` writes into its --out (each variant directory is an output as above)
DEMO_ENTRIES = ("summary.json", "teacher", "sparse", "int8", "int4")
SCAFFOLDING = ("classes.json", "run.json")  # what a run writes into its checkpoint folder before any checkpoint
CLI_FLAGS = ("--out", "--resume", "--overwrite")  # how messages name out / resume / overwrite
PYTHON_FLAGS = ("out", "resume=True", "overwrite=True")


def _is_gpusq_model(f: Path) -> bool:
    if not f.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours
        return False
    from gpusq.checkpoint import META_KEY

    return "gpusq_format" in meta or "gpusq_task" in meta or META_KEY in meta


def _has_run_state(d: Path) -> bool:
    """Training checkpoints or a finished stage 1: what ``--resume`` continues from."""
    return (any((d / "checkpoints").glob("*.safetensors*")) or any((d / ".train").glob("*.safetensors*"))
            or (d / "stage1" / "stage1.json").is_file())


def is_scaffolding(p: Path) -> bool:
    """A checkpoint folder that holds no checkpoint (left by a run that failed before saving one)."""
    return (p.name in ("checkpoints", ".train") and p.is_dir() and not p.is_symlink()
            and all(f.name in SCAFFOLDING and f.is_file() for f in p.iterdir()))


def is_gpusq_output(d: Path) -> bool:
    """``d`` holds a gpusq train/compress output, finished (model written by gpusq, or its report) or
    interrupted (checkpoints, a finished stage 1)."""
    if _is_gpusq_model(d / "model.safetensors") or _has_run_state(d):
        return True
    try:
        rep = json.loads((d / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rep, dict) and ("kind" in rep or "task" in rep) and "metrics" in rep


def is_demo_output(d: Path) -> bool:
    return (d / "summary.json").is_file() or any(is_gpusq_output(d / n) for n in DEMO_ENTRIES[1:])


def _listing(names: Sequence[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_out_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False,
                  entries: Sequence[str] = OUTPUT_ENTRIES, recognise: Callable[[Path], bool] = is_gpusq_output,
                  what: str = "a gpusq output", can_resume: bool = True,
                  flags: tuple[str, str, str] = CLI_FLAGS) -> Callable[[], None]:
    """Refuse ``out`` (one-line ``GpusqError``) unless a run may write there; returns the function that
    clears the old gpusq files under ``--overwrite`` (a no-op otherwise), to call when the run starts.
    ``flags``: the names of out / resume / overwrite in the messages."""
    o, res, ow = flags
    if overwrite and resume:
        raise GpusqError(f"{ow} starts over and {res} continues: pass one of them")
    if int(os.environ.get("RANK", "0")) != 0:
        return lambda: None
    out = Path(out)
    if not out.exists():
        return lambda: None
    if not out.is_dir():
        raise GpusqError(f"{o} {out} exists and is not a directory")
    present = sorted(p.name for p in out.iterdir())
    if all(is_scaffolding(out / n) for n in present):  # empty, or only what a failed run left
        for n in present:
            shutil.rmtree(out / n)
        return lambda: None
    shown = [n + "/" if (out / n).is_dir() else n for n in present]
    if not recognise(out):
        raise GpusqError(f"{o} {out} is not empty and holds no gpusq output ({_listing(shown)}); "
                         "choose a new or empty directory")
    if resume:
        return lambda: None
    ours = [n for n in present if n in entries]
    if not overwrite:
        if can_resume and _has_run_state(out) and not _is_gpusq_model(out / "model.safetensors"):
            state = [n for n in shown if n.rstrip("/") in RUN_STATE]
            raise GpusqError(f"{o} {out} holds an interrupted run ({_listing(state)}); "
                             f"pass {res} to continue it or {ow} to start over")
        mine = [n for n in shown if n.rstrip("/") in entries]
        raise GpusqError(f"{o} {out} already holds {what} ({_listing(mine)}); pass {ow} to replace it")

    def clear() -> None:
        for n in ours:
            p = out / n
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    return clear
