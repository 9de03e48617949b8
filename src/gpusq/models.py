"""Model creation by timm name (with keyword overrides) and checkpoint loading, no hub access."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from gpusq.errors import GpusqError, close_matches


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


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model by name, randomly initialized (no weights are downloaded)."""
    import timm

    if not timm.is_model(name):
        hint = close_matches(name, timm.list_models())
        raise GpusqError(f"unknown model '{name}'" + (f" (close matches: {hint})" if hint else ""))
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise GpusqError(f"model '{name}' does not take these arguments: {e}") from None


def model_input_size(model: nn.Module, default: int = 224) -> tuple[int, int, int]:
    """(C, H, W) the model expects, read from timm's pretrained_cfg / patch_embed."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (chans, int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, default, default)))  # type: ignore[return-value]


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a timm/torch ``.pth`` (loaded with weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise GpusqError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise GpusqError(f"checkpoint {p} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GpusqError(f"checkpoint {p} could not be read with weights_only=True ({first})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GpusqError(f"checkpoint {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` strictly; a mismatch is a one-line error naming the first problem."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        what = []
        if shape:
            k = shape[0]
            what.append(f"shape of '{k}' is {tuple(state[k].shape)}, model has {tuple(own[k].shape)}")
        if missing:
            what.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        raise GpusqError(f"{source} does not match the model: " + "; ".join(what))
    model.load_state_dict(state, strict=True)
