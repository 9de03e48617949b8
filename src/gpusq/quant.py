"""Fake quantization with straight-through gradients (GPUSQ-ViT step 3).

Formats (all symmetric, zero-point 0, so a 2:4 zero stays exactly zero after quantization):

* weights, per output channel (axis 0):
  - ``int8``: integers in [-127, 127] (the symmetric range TensorRT uses for weights);
  - ``int4``: integers in [-7, 7]. We use the *narrow* symmetric range rather than [-8, 7]:
    with scale = amax/7 the grid is symmetric around zero, so w and -w quantize to opposite
    values, and the same integers run unchanged on the INT8 kernels the H100 has (it has no INT4
    tensor cores). -8 would only be reachable by clipping the positive side harder.
  - ``fp8_e4m3``: E4M3 values (max 448) times a per-channel scale.
* activations (inputs of compressed layers), per tensor, with a static scale:
  - ``int8``: scale = clip/127, values rounded and saturated to [-128, 127] (ONNX/TensorRT
    QuantizeLinear semantics, so the exported graph computes the same numbers);
  - ``fp8_e4m3``: scale = clip/448.
  The clip value comes from calibration (``max``, ``percentile`` or ``mse``) and can be learned
  during QAT (``learnable=True``, LSQ: Esser et al., 2020, with its gradient scale).

Rounding uses the straight-through estimator: forward rounds, backward passes the gradient
unchanged inside the clipping range and zero outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gpusq.layers import CompressedLayer, compressed_layers, ensure_compressed
from gpusq.sparsity import select_layers

FORMATS = ("none", "int8", "int4", "fp8_e4m3")
CALIB_METHODS = ("max", "percentile", "mse")
FP8_MAX = 448.0


@dataclass
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized."""

    dtype: str = "none"
    calib: str = "max"
    percentile: float = 99.99
    learnable: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in FORMATS:
            raise ValueError(f"quant dtype {self.dtype!r} is not one of {', '.join(FORMATS)}")
        if self.calib not in CALIB_METHODS:
            raise ValueError(f"calibration {self.calib!r} is not one of {', '.join(CALIB_METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def enabled(self) -> bool:
        return self.dtype != "none"

    @property
    def bits(self) -> int:
        return {"none": 16, "int8": 8, "int4": 4, "fp8_e4m3": 8}[self.dtype]


def int_range(dtype: str, *, weight: bool) -> tuple[int, int]:
    """Integer range [qmin, qmax] of an integer format (weights use the narrow symmetric range)."""
    if dtype == "int8":
        return (-127, 127) if weight else (-128, 127)
    if dtype == "int4":
        return (-7, 7) if weight else (-8, 7)
    raise ValueError(dtype)


def qmax_of(dtype: str) -> float:
    """Largest grid value: what ``amax`` maps to."""
    return FP8_MAX if dtype == "fp8_e4m3" else float(int_range(dtype, weight=True)[1])


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return x * g + (x - x * g).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str, *, weight: bool) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (broadcastable); STE gradients.

    Computed in float32 so the result is exactly ``q * scale`` with integer/E4M3 ``q``.
    """
    orig = x.dtype
    x = x.float()
    scale = scale.float()
    if dtype == "fp8_e4m3":
        y = torch.clamp(x / scale, -FP8_MAX, FP8_MAX)
        yq = y.to(torch.float8_e4m3fn).float()
        out = (y + (yq - y).detach()) * scale
    else:
        qmin, qmax = int_range(dtype, weight=weight)
        out = torch.clamp(round_ste(x / scale), qmin, qmax) * scale
    return out.to(orig)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, dtype: str, *, weight: bool) -> torch.Tensor:
    """The integer codes (as int8) that ``fake_quantize`` represents; for export and deployment."""
    qmin, qmax = int_range(dtype, weight=weight)
    return torch.clamp(torch.round(x.float() / scale.float()), qmin, qmax).to(torch.int8)


class WeightQuantizer(nn.Module):
    """Per-output-channel weight fake quantizer.

    The scale follows the weight as it trains: ``scale = clip * amax_c(|w|) / qmax`` with a
    per-channel ``clip`` ratio (1.0 for ``max``; searched once for ``mse`` at calibration).
    """

    def __init__(self, spec: QuantSpec, out_channels: int):
        super().__init__()
        self.spec = spec
        self.register_buffer("clip", torch.ones(out_channels))
        # Set when loading a saved compressed model: the stored per-channel scale, used as is.
        self.register_buffer("frozen", None)

    def freeze_scale_(self, scale: torch.Tensor) -> None:
        """Use exactly ``scale`` (shape [out]) from now on instead of following the weight."""
        self.frozen = scale.detach().float().reshape(-1).clone()

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen.reshape(-1, *([1] * (w.dim() - 1)))
        amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).float()
        s = (amax * self.clip / qmax_of(self.spec.dtype)).clamp_min(1e-12)
        return s.reshape(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale(w), self.spec.dtype, weight=True)

    @torch.no_grad()
    def calibrate_(self, w: torch.Tensor) -> None:
        """For ``mse``: per channel, the clip ratio in [0.5, 1] minimizing the quantization MSE."""
        if self.frozen is not None:
            return
        if self.spec.calib != "mse":
            self.clip.fill_(1.0)
            return
        w2 = w.reshape(w.shape[0], -1).float()
        best_err = torch.full((w2.shape[0],), float("inf"), device=w.device)
        best = torch.ones_like(best_err)
        self.clip.fill_(1.0)
        base = self.scale(w).reshape(-1, 1)
        for r in torch.linspace(0.5, 1.0, 51).tolist():
            err = (fake_quantize(w2, base * r, self.spec.dtype, weight=True) - w2).pow(2).sum(1)
            better = err < best_err
            best = torch.where(better, torch.full_like(best, r), best)
            best_err = torch.minimum(err, best_err)
        self.clip.copy_(best)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, per-channel, calib={self.spec.calib}"


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with a static scale.

    States: *observing* (calibration: records statistics, passes input through), then quantizing
    with ``scale``. With ``learnable`` the scale is an ``nn.Parameter`` trained by LSQ.
    """

    MAX_SAMPLES = 1 << 20

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.observing = False
        self.register_buffer("amax", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        if spec.learnable:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self._samples: list[torch.Tensor] = []
        self._n_seen = 0

    # -- calibration ---------------------------------------------------------------------------
    def start_observing(self) -> None:
        self.observing = True
        self.amax.zero_()
        self._samples = []
        self._n_seen = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        self.amax.copy_(torch.maximum(self.amax, x.abs().max()))
        if self.spec.calib != "max":
            # Evenly strided subsample: deterministic, and unbiased for i.i.d.-like activations.
            step = max(1, x.numel() // (self.MAX_SAMPLES // 16))
            self._samples.append(x[::step].cpu())
            self._n_seen += 1

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Turn the recorded statistics into the static scale (and stop observing)."""
        self.observing = False
        from gpusq.distributed import sync_observer_stats  # no-op unless running under torchrun

        self._samples = sync_observer_stats(self.amax, self._samples)
        samples = torch.cat(self._samples) if self._samples else None
        self._samples = []
        if samples is not None and samples.numel() > self.MAX_SAMPLES:
            samples = samples[:: samples.numel() // self.MAX_SAMPLES + 1]
        clip = compute_clip(self.spec, float(self.amax), samples)
        self.scale.data.fill_(max(clip, 1e-8) / qmax_of(self.spec.dtype))
        self.calibrated.fill_(True)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        scale = self.scale
        if self.spec.learnable and self.training:
            qmax = qmax_of(self.spec.dtype)
            scale = _grad_scale(scale.abs().clamp_min(1e-8), 1.0 / math.sqrt(x.numel() * qmax))
        return fake_quantize(x, scale, self.spec.dtype, weight=False)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, per-tensor, calib={self.spec.calib}, learnable={self.spec.learnable}"


def compute_clip(spec: QuantSpec, amax: float, samples: torch.Tensor | None) -> float:
    """Clipping value for a per-tensor scale from calibration statistics.

    ``max``: the largest |x| seen. ``percentile``: that percentile of |x|. ``mse``: the clip in
    [0.05·amax, amax] minimizing the mean squared quantization error over the samples.
    """
    if spec.calib == "max" or samples is None or samples.numel() == 0 or amax == 0.0:
        return amax
    a = samples.abs()
    if spec.calib == "percentile":
        k = max(1, min(a.numel(), math.ceil(a.numel() * spec.percentile / 100.0)))
        return float(a.kthvalue(k).values)
    best, best_err = amax, float("inf")
    for r in torch.linspace(0.05, 1.0, 96).tolist():
        clip = amax * r
        err = float((fake_quantize(samples, torch.tensor(clip / qmax_of(spec.dtype)), spec.dtype,
                                   weight=False) - samples).pow(2).mean())
        if err < best_err:
            best, best_err = clip, err
    return best


@dataclass
class QuantConfig:
    """What to quantize: a spec for the weights and one for the inputs of compressed layers."""

    weight: QuantSpec
    act: QuantSpec


def set_quant_(layer: CompressedLayer, weight: QuantSpec | None, act: QuantSpec | None) -> None:
    """Install (or, with ``None`` / disabled specs, remove) ``layer``'s weight and input quantizers.
    Here, not in ``gpusq.layers``: the layers know nothing of quantization formats."""
    dev = layer.weight.device
    layer.weight_quant = (
        WeightQuantizer(weight, layer.weight.shape[0]).to(dev) if weight and weight.enabled else None
    )
    layer.input_quant = ActQuantizer(act).to(dev) if act and act.enabled else None


def quantize_(model: nn.Module, config: QuantConfig, layers: list[str] | None = None,
              filter_fn=None) -> list[str]:
    """Attach fake quantizers to compressed layers in place (torchao-style ``quantize_``).

    ``layers``: names to quantize; or ``filter_fn(name, module)``, the same selection ``sparsify_``
    takes; by default every layer ``sparsify_`` compressed, or, on a model never sparsified, the
    default GEMM selection. Activation scales need ``calibrate`` next.
    """
    if layers is not None and filter_fn is not None:
        raise ValueError("pass layers or filter_fn, not both")
    if filter_fn is not None:  # (a layer sparsify_ swapped is still a Linear / Conv2d: selected alike)
        layers = select_layers(model, filter_fn=filter_fn).selected
    if layers is None:
        layers = list(compressed_layers(model)) or select_layers(model).selected
    for layer in ensure_compressed(model, layers).values():
        set_quant_(layer, config.weight, config.act)
        if layer.weight_quant is not None:
            layer.weight_quant.calibrate_(layer.masked_weight().detach())
    return layers


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop) -> None:
    """Set static activation scales: run ``forward_loop(model)`` (the user's batches, ModelOpt
    style) with every activation quantizer observing, then compute each scale.

    Weight clip ratios (``mse``) are refreshed from the current weights too.
    """
    quantizers = act_quantizers(model)
    was_training = model.training
    model.eval()
    for q in quantizers.values():
        q.start_observing()
    try:
        forward_loop(model)
    finally:
        for q in quantizers.values():
            q.observing = False
    for q in quantizers.values():
        q.finish_observing()
    for layer in compressed_layers(model).values():
        if layer.weight_quant is not None:
            layer.weight_quant.calibrate_(layer.masked_weight().detach())
    model.train(was_training)
