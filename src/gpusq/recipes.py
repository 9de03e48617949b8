"""Recipes as data: YAML files naming what to compress and how to train it.

Shipped recipes (``gpusq/recipes/*.yaml``): ``sparse`` (2:4, no quantization), ``int8`` (W8A8
2:4), ``int4`` (W4A8 2:4), ``fp8`` (E4M3 2:4). A user YAML may start from one (``base: int8``)
and override any field; unknown keys and bad values are errors naming the key. A shipped name
(``int8``) always means the shipped recipe, even where the working directory holds a file or an
output directory called ``int8``; a local file is named by a path (``./int8``, ``mine.yaml``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpusq.augment import AugmentConfig
from gpusq.distill import DistillConfig
from gpusq.errors import GpusqError, close_matches
from gpusq.quant import QuantConfig, QuantSpec
from gpusq.sparsity import SparsityConfig


@dataclass
class StageConfig:
    """Optimization of one training stage (AdamW + warmup + cosine).

    Length: ``epochs`` passes over the training split, but never fewer than ``min_steps`` optimizer
    steps (when ``epochs > 0``): on a small dataset a few epochs are a few dozen steps, too few to
    recover from pruning or quantization, so the shipped recipes set a floor that only small datasets
    reach. ``min_steps: 0`` gives exactly ``epochs``; ``epochs: 0`` skips the stage.
    """

    epochs: float = 1.0
    min_steps: int = 0
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    batch_size: int = 128
    clip_grad: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainConfig:
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=2e-4))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=5e-5))
    calib_batches: int = 16
    importance_batches: int = 8


@dataclass
class DeployConfig:
    # Precision of everything left uncompressed (norms, head, attention) in the deployed model.
    dense_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dense_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dense_dtype must be bf16, fp16 or fp32, got {self.dense_dtype!r}")

    @property
    def dense_bits(self) -> int:
        return 32 if self.dense_dtype == "fp32" else 16


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(QuantSpec(), QuantSpec()))
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation (gpusq.augment)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    @property
    def sparse(self) -> bool:
        return self.sparsity.pattern == "2:4"

    @property
    def quantized(self) -> bool:
        return self.quant.weight.enabled or self.quant.act.enabled

    def loader_batch_size(self, override: int | None = None) -> int:
        """The training loader's batch size: ``override`` (``--batch-size``), else the stages' one.
        Both stages train on one loader, so a stage-2 size that differs is refused, not ignored."""
        s1, s2 = self.train.stage1.batch_size, self.train.stage2.batch_size
        stage2_trains = self.quantized and self.train.stage2.epochs > 0  # as gpusq.engine.stage_steps counts
        if override is None and s2 != s1 and stage2_trains:
            raise GpusqError(f"recipe: train.stage2.batch_size ({s2}) differs from train.stage1.batch_size ({s1}); "
                             "both stages train on one loader: set them equal or pass --batch-size")
        return override or s1

    def to_dict(self) -> dict[str, Any]:
        def conv(v):
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v

        return conv(self)


def recipe_dir() -> Path:
    return Path(str(resources.files("gpusq") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, data: Any, path: str):
    """Strictly build dataclass ``cls`` from a mapping: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise GpusqError(f"recipe: '{path or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            hint = close_matches(str(key), names)
            raise GpusqError(f"recipe: unknown key '{where}'" + (f" (did you mean: {hint}?)" if hint else ""))
        kwargs[key] = _coerce(hints[key], value, where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise GpusqError(f"recipe: bad value in '{path or 'recipe'}': {e}") from None


def _coerce(hint, value: Any, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):  # an optional field: null
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    bad = GpusqError(f"recipe: bad value for '{where}': {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad
    elif origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise bad
        value = [str(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise GpusqError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GpusqError(f"recipe {path}: top level must be a mapping")
    return data


YAML_SUFFIXES = (".yaml", ".yml")


def resolve_recipe_source(name_or_path: str) -> Path:
    """The YAML file ``name_or_path`` stands for (what ``--recipe`` and ``base:`` accept).

    * a name ending in ``.yaml`` / ``.yml`` is a file path (relative to the working directory);
    * a bare name (no path separator) of a shipped recipe is that shipped recipe, whatever the working
      directory holds: after ``gpusq compress ... --out int8``, ``--recipe int8`` and the shipped
      ``base: int8`` still mean the shipped ``int8``, not the output directory ``./int8``;
    * anything else names a file, with or without a suffix: ``./int8`` or ``recipes/int8`` is the
      YAML file of that name (write the path that way to use a local file that is called like a
      shipped recipe). A directory is an error naming it, never searched.
    """
    text = str(name_or_path)
    p = Path(text)
    shipped = recipe_dir() / f"{text}.yaml"
    explicit_path = p.suffix in YAML_SUFFIXES or any(sep in text for sep in ("/", os.sep, os.altsep or "/"))
    if not explicit_path and shipped.is_file():
        return shipped
    if p.is_dir():
        hint = f"; for the shipped recipe write {p.name}" if (recipe_dir() / f"{p.name}.yaml").is_file() else ""
        raise GpusqError(f"recipe {text} is a directory, not a YAML file{hint}")
    if p.is_file():
        return p
    if explicit_path:
        raise GpusqError(f"recipe file not found: {text}")
    raise GpusqError(f"unknown recipe '{text}' (available: {', '.join(list_recipes())})")


def _raw(name_or_path: str, depth: int = 0) -> dict:
    f = resolve_recipe_source(name_or_path)
    data = _read_yaml(f)
    if f.parent == recipe_dir() and f.stem == str(name_or_path):  # a shipped recipe by name
        data.setdefault("name", str(name_or_path))
    base = data.pop("base", None)
    if base is not None:
        if depth > 8:
            raise GpusqError("recipe: 'base' chain too deep")
        data = _merge(_raw(str(base), depth + 1), data)
    return data


def load_recipe(name_or_path: str | Recipe, overrides: dict | None = None) -> Recipe:
    """A shipped recipe by name, or a YAML file (optionally ``base:``-ing on one), plus overrides.

    Names and paths resolve as ``resolve_recipe_source`` says: a shipped name never means a file
    or directory of that name in the working directory."""
    if isinstance(name_or_path, Recipe):
        data = name_or_path.to_dict()
    else:
        data = _raw(str(name_or_path))
    if overrides:
        data = _merge(data, overrides)
    return _build(Recipe, data, "")


def parse_override(text: str) -> dict:
    """``train.stage1.epochs=3`` → nested dict, value parsed as YAML."""
    if "=" not in text:
        raise GpusqError(f"override '{text}' is not KEY=VALUE")
    key, value = text.split("=", 1)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = yaml.safe_load(value)
    return out
