"""Class names travel with every model: a model is only used on data with the same classes, in order.

Every output (``gpusq train`` and ``gpusq compress``, dense and compressed) records the class names
of its training data in label order: safetensors metadata ``classes`` (JSON) and ``classes:`` in
``model.yaml``. ``check_classes`` compares them with the classes of the data a command is given
(``gpusq.data.DataInfo.classes``) and stops with one line naming the difference. Where a model
records no names (outputs of older versions, a teacher given as a timm ``.pth`` file), only the
number of classes is checked, against the model's head, and a note says so.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from gpusq.errors import GpusqError

SHOWN = 5  # class names shown in a message before "..."


def recorded_classes(path: str | Path) -> list[str] | None:
    """The class names recorded with a gpusq output directory or ``.safetensors`` file; None if none
    (older outputs, foreign weights files)."""
    p = Path(path)
    f = p / "model.safetensors" if p.is_dir() else p
    if f.suffix == ".safetensors" and f.is_file():
        from safetensors import safe_open

        from gpusq.checkpoint import file_metadata

        try:
            with safe_open(str(f), "pt") as sf:
                raw = sf.metadata() or {}
        except Exception:  # noqa: BLE001 - an unreadable file is reported by whoever loads its tensors
            raw = {}
        try:
            names = file_metadata(raw).get("classes")  # any format version (JSON in the metadata)
        except json.JSONDecodeError:
            raise GpusqError(f"{f}: its metadata is not JSON") from None
        if names:
            return [str(c) for c in names]
    info_file = (p if p.is_dir() else p.parent) / "model.yaml"
    if info_file.is_file():
        import yaml

        try:
            info = yaml.safe_load(info_file.read_text()) or {}
        except yaml.YAMLError:
            return None
        names = info.get("classes") if isinstance(info, dict) else None
        if isinstance(names, list):
            return [str(c) for c in names]
    return None


def head_size(model: nn.Module) -> int | None:
    """The number of classes the model's classifier predicts (None when it has no classifier)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    n = getattr(head, "out_features", None)
    return n if isinstance(n, int) and n > 0 else None


def show(names: Sequence[str], limit: int = SHOWN) -> str:
    """``[a, b, c, d, e, ...]``: the first ``limit`` names."""
    names = list(names)
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + "]"


def _only(a: list[str], a_label: str, b: list[str], b_label: str) -> str:
    """``[x, y] only in A, [z] only in B``, leaving out an empty side."""
    parts = [f"{show(names)} only in {label}" for names, label in ((a, a_label), (b, b_label)) if names]
    return ", ".join(parts)


def check_classes(model_classes: Sequence[str] | None, head: int | None, data_classes: Sequence[str], *,
                  who: str, data: str, note: bool = True, hint: str = "",
                  label_names: Sequence[str] | None = None) -> None:
    """Stop (one-line ``GpusqError``) unless the data's classes are the model's, in the same order.

    ``model_classes``: the names recorded with the model (None: unknown; then only ``head``, the size
    of the model's classifier, is checked against the number of data classes, and with ``note`` a
    line on stderr says so). ``who`` names the model (``the teacher``), ``data`` the data; ``hint`` is
    added to a head-size mismatch. ``label_names``: names a model carries that need not be folder names
    (a Hugging Face config's ``id2label``, e.g. "tabby cat" for folder ``n02123045``): only the data's own
    names in another order stop the run (its predictions would be scored against the wrong classes)."""
    data_classes = [str(c) for c in data_classes]
    nd = len(data_classes)
    if model_classes is None and label_names:
        ln = [str(c) for c in label_names]
        if ln != data_classes and sorted(ln) == sorted(data_classes):
            i = next(k for k, (a, b) in enumerate(zip(ln, data_classes)) if a != b)
            raise GpusqError(f"class order differs at index {i}: {who} labels it '{ln[i]}' (its id2label), the "
                             f"data ({data}) has '{data_classes[i]}' there; reorder the model's labels or the data")
        if ln == data_classes:
            return
    if model_classes is not None:
        mc = [str(c) for c in model_classes]
        if len(mc) != nd:
            raise GpusqError(f"{who} was trained on {len(mc)} classes {show(mc)}; the data ({data}) has "
                             f"{nd} {show(data_classes)}")
        if mc != data_classes:
            only_m = [c for c in mc if c not in data_classes]
            only_d = [c for c in data_classes if c not in mc]
            if not only_m and not only_d:
                i = next(k for k, (a, b) in enumerate(zip(mc, data_classes)) if a != b)
                raise GpusqError(f"class order differs at index {i}: {who} has '{mc[i]}' there, the data ({data}) "
                                 f"has '{data_classes[i]}'")
            raise GpusqError(f"{who} was trained on other classes than the data ({data}) has: "
                             + _only(only_m, who, only_d, "the data"))
    if head is not None and head != nd:
        why = ""
        if model_classes is None and note:
            why = f" ({who} records no class names, so only their number is checked)"
        raise GpusqError(f"{who} has a {head}-class head; the data ({data}) has {nd} classes "
                         f"{show(data_classes)}{why}{hint}")
    if model_classes is None and note and int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
        counted = f"their number ({nd}) matches its head" if head is not None else "they could not be checked"
        what = ("labels other names than the data's classes (its id2label)" if label_names
                else "records no class names")
        print(f"note: {who} {what}; {counted}", file=sys.stderr, flush=True)


def check_same_classes(a: Sequence[str], b: Sequence[str], a_label: str, b_label: str) -> None:
    """Two datasets (or splits) meant to be used together label the same classes the same way."""
    a, b = [str(c) for c in a], [str(c) for c in b]
    if a == b:
        return
    only_a = [c for c in a if c not in b]
    only_b = [c for c in b if c not in a]
    if only_a or only_b:
        raise GpusqError(f"{a_label} and {b_label} have different classes: " + _only(only_a, a_label, only_b, b_label))
    i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
    raise GpusqError(f"class order differs at index {i}: {a_label} has '{a[i]}' there, {b_label} has '{b[i]}'")


def check_same_split_classes(train: Sequence[str], val: Sequence[str], data: str) -> None:
    """The train and val splits of one dataset label the same classes the same way."""
    check_same_classes(train, val, f"the train split of {data}", "its val split")
