"""Deployed GEMM layers: what a ``CompressedLinear`` / ``CompressedConv2d`` becomes on the GPU.

``DeployedLinear`` holds the weight once, in the kernel's own format (cuSPARSELt-compressed 2:4
int8/fp8/bf16, or dense fp8 for ``torch._scaled_mm``), plus the static activation scale and the
epilogue vectors, and computes ``y = (s_x * s_w[n]) * (q_x @ q_w.T) + b`` with the scale vector and
the bias inside the GEMM's epilogue where cuSPARSELt applies them correctly (see
``cusparselt.epilogue_mode``). Rows (tokens) are zero-padded to a multiple of 32, as cuSPARSELt
requires; the kernel (and cuSPARSELt algorithm id) is chosen per padded row count by timing, in
an eager pass before compilation (``DeployedModel.prepare``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpusq.deploy import cusparselt as cs
from gpusq.deploy.fused import pad_rows_cols, quantize_fp8, quantize_int8
from gpusq.errors import GpusqError

_OPS_DEFINED = False


def _define_ops() -> None:
    """``gpusq::cslt_mm``: the cuSPARSELt GEMM as an opaque custom op, so Inductor hands it the
    row-major int8 activation it was traced with and never re-lays it out."""
    global _OPS_DEFINED
    if _OPS_DEFINED:
        return

    @torch.library.custom_op("gpusq::cslt_mm", mutates_args=())
    def cslt_mm_op(w_c: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor | None,
                   alg_id: int, n: int) -> torch.Tensor:
        return cs.cslt_mm(w_c, x.contiguous(), bias, alpha, alg_id)

    @cslt_mm_op.register_fake
    def _(w_c, x, bias, alpha, alg_id, n):
        return x.new_empty((x.shape[0], n), dtype=torch.bfloat16)

    _OPS_DEFINED = True


def layer_codes(layer: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(kernel kind, weight codes [N, K] as float, weight scale [N], input scale) of a compressed layer.

    The codes come from ``gpusq.codes.layer_codes``: the ones a loaded model was stored with (or,
    for a model in memory, computed once), exactly the integers / E4M3 values the fake-quant layer
    multiplies (``effective_weight = codes * weight_scale``). INT4 codes run on the INT8 kernel.
    """
    from gpusq.codes import layer_codes as stored_codes

    c = stored_codes(layer)
    sparse = c.mask is not None
    if c.w_fmt in ("int8", "int4") and c.a_fmt == "int8" and sparse:
        return "int8", c.codes.float(), c.weight_scale, c.input_scale
    if c.w_fmt == "fp8_e4m3" and c.a_fmt == "fp8_e4m3":
        return "fp8", c.codes.float(), c.weight_scale, c.input_scale
    if c.w_fmt == "none" and c.a_fmt == "none" and sparse:
        return "bf16", c.codes.float(), None, None
    what = f"{c.w_fmt} weights, {c.a_fmt} activations, {'2:4' if sparse else 'dense'}"
    raise GpusqError(
        f"no deployment kernel for a layer with {what} (supported: int8/int4 weights + int8 activations "
        "with 2:4; fp8 weights + fp8 activations; 2:4 without quantization)")


class DeployedLinear(nn.Module):
    """A 2:4 / low-precision GEMM layer on real kernels (built by ``gpusq.deploy.deploy``).

    ``kind``: ``int8`` (INT8 codes, INT8 activations, cuSPARSELt 2:4), ``fp8`` (E4M3, 2:4 through
    cuSPARSELt or dense ``torch._scaled_mm``, whichever is faster at the shape), ``bf16`` (2:4
    without quantization: cuSPARSELt or dense, whichever is faster).
    ``fp8_kernel``/``bf16_kernel``: ``auto`` (time both), ``sparse`` or ``dense`` (force one).
    """

    def __init__(self, codes: torch.Tensor, kind: str, *, weight_scale: torch.Tensor | None,
                 input_scale: torch.Tensor | None, bias: torch.Tensor | None, sparse: bool,
                 device: torch.device, kernel: str = "auto", name: str = ""):
        super().__init__()
        _define_ops()
        n, k = codes.shape
        self.name, self.kind, self.sparse = name, kind, sparse
        self.in_features, self.out_features = k, n
        self.kp, self.np_ = cs.round_up(k), cs.round_up(n)
        if kind == "int8" and not sparse:
            raise ValueError("dense int8 has no kernel here")
        self.kernels = ["sparse"] if kind == "int8" else (
            ["sparse", "dense"] if sparse and kernel == "auto" else ["dense"] if not sparse else [kernel])
        if kind == "fp8" and sparse and kernel == "auto" and cs.epilogue_mode(kind) not in cs.FULL_EPILOGUE:
            # Measured on the H100 (docs/deploy.md): FP8 2:4 GEMMs alone beat dense FP8, but with
            # the scale and bias applied outside the GEMM the model is slower than dense FP8.
            self.kernels = ["dense"]
        dt = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kind]
        self.act_dtype = dt
        w = pad_rows_cols(codes.to(device), self.np_, self.kp)
        w = w.float().to(dt) if kind != "int8" else w.to(torch.int8)
        b = None if bias is None else F.pad(bias.detach().float().to(device), (0, self.np_ - n))
        if weight_scale is not None:
            ws = F.pad(weight_scale.detach().float().to(device).reshape(-1), (0, self.np_ - n))
            alpha = ws * input_scale.float().to(device)
        else:
            ws = alpha = None
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.detach().float().to(device).reshape(()))
        self.register_buffer("inv_scale", None if input_scale is None else 1.0 / self.input_scale)
        # sparse path: compressed weight + what cuSPARSELt's epilogue takes (the rest goes after)
        self.register_buffer("w_c", None)
        self.register_buffer("ep_alpha", None)
        self.register_buffer("ep_bias", None)
        self.register_buffer("post_alpha", None)
        self.register_buffer("post_bias", None)
        if "sparse" in self.kernels:
            self.w_c = cs.compress(w.contiguous())
            self.epilogue = cs.epilogue_mode(kind)
            a, bb = cs._apply_epilogue(w, alpha, b, self.epilogue, torch.bfloat16)
            self.ep_alpha, self.ep_bias = a, bb
            self.post_alpha = alpha if (a is None and alpha is not None) else None
            self.post_bias = b.to(torch.bfloat16) if (bb is None and b is not None) else None
        else:
            self.epilogue = "none"
        # dense path
        self.register_buffer("w_dense", None)
        self.register_buffer("sb", None)
        self.register_buffer("sa", None)
        self.register_buffer("dense_bias", None if b is None else b.to(torch.bfloat16))
        if "dense" in self.kernels:
            self.w_dense = w.contiguous()
            if kind == "fp8":
                self.sb = ws.reshape(1, -1).contiguous()
                self.sa = torch.empty(0, 1, device=device)
        self.choice: dict[int, tuple[str, int]] = {}
        self.timings: dict[int, dict[str, float]] = {}

    # -- kernel choice (eager, before compilation) ------------------------------------------------
    def _ensure_sa(self, mp: int) -> None:
        if self.sa is not None and self.sa.shape[0] < mp:
            self.sa = self.input_scale.reshape(1, 1).expand(mp, 1).contiguous()

    @torch.no_grad()
    def choose(self, mp: int) -> tuple[str, int]:
        """Pick (kernel, alg id) for ``mp`` padded rows: cuSPARSELt's fastest algorithm, and, where
        a dense kernel is also allowed, whichever of the two is faster (timed under CUDA graphs)."""
        if mp in self.choice:
            return self.choice[mp]
        self._ensure_sa(mp)
        t: dict[str, float] = {}
        alg = 0
        if "sparse" in self.kernels:
            alg, t["sparse"] = cs.search_alg(self.w_c, mp, self.kp, self.kind, self.ep_bias, self.ep_alpha,
                                             self.np_)
        if "dense" in self.kernels:
            x = torch.randn(mp, self.kp, device=self.w_dense.device).to(self.act_dtype)
            t["dense"] = cs.time_graph(lambda: self._dense(x, mp))
        best = min(t, key=t.get)
        self.choice[mp] = (best, alg if best == "sparse" else -1)
        self.timings[mp] = t
        return self.choice[mp]

    # -- forward ----------------------------------------------------------------------------------
    def _quantize(self, x2: torch.Tensor, mp: int) -> torch.Tensor:
        if self.kind == "int8":
            return quantize_int8(x2, self.inv_scale, mp, self.kp)
        if self.kind == "fp8":
            return quantize_fp8(x2, self.inv_scale, mp, self.kp)
        return pad_rows_cols(x2.to(torch.bfloat16), mp, self.kp)

    def _dense(self, q: torch.Tensor, mp: int) -> torch.Tensor:
        if self.kind == "fp8":
            return torch._scaled_mm(q, self.w_dense.t(), scale_a=self.sa[:mp], scale_b=self.sb,
                                    bias=self.dense_bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        return F.linear(q, self.w_dense, self.dense_bias)

    def _sparse(self, q: torch.Tensor, alg: int) -> torch.Tensor:
        y = torch.ops.gpusq.cslt_mm(self.w_c, q, self.ep_bias, self.ep_alpha, alg, self.np_)
        if self.post_alpha is not None:
            y = (y.float() * self.post_alpha).to(torch.bfloat16)
        if self.post_bias is not None:
            y = y + self.post_bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        mp = cs.round_up(m)
        if mp not in self.choice:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"{self.name}: {mp} rows were not prepared (DeployedModel.prepare)")
            self.choose(mp)
        kernel, alg = self.choice[mp]
        q = self._quantize(x2, mp)
        y = self._sparse(q, alg) if kernel == "sparse" else self._dense(q, mp)
        if mp != m or self.np_ != self.out_features:
            y = y[:m, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, {self.kind}, {'2:4' if self.sparse else 'dense'}, "
                f"kernels={self.kernels}, epilogue={self.epilogue}, choice={self.choice}")


class DeployedPatchEmbed(nn.Module):
    """A compressed non-overlapping patch conv (kernel = stride, no padding) as a GEMM.

    im2col of non-overlapping patches is a reshape: patches are flattened in PyTorch's
    ``[in, kh, kw]`` order, the order of the conv weight's GEMM view that the 2:4 mask follows.
    """

    def __init__(self, conv: nn.Conv2d, linear: DeployedLinear):
        super().__init__()
        self.kernel_size = tuple(conv.kernel_size)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.lin = linear

    @property
    def weight(self) -> torch.Tensor:
        """An empty float32 tensor: Hugging Face ViT / DeiT cast the images to their patch projection's
        ``weight.dtype``, and this GEMM takes float32 images (quantized, or cast, inside)."""
        return torch.empty(0, dtype=torch.float32)

    @staticmethod
    def supported(conv: nn.Conv2d) -> bool:
        return (tuple(conv.stride) == tuple(conv.kernel_size) and tuple(conv.padding) == (0, 0)
                and tuple(conv.dilation) == (1, 1) and conv.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p1, p2 = self.kernel_size
        hp, wp = h // p1, w // p2
        x = x[:, :, : hp * p1, : wp * p2]  # what a stride = kernel conv without padding sees
        cols = x.reshape(b, c, hp, p1, wp, p2).permute(0, 2, 4, 1, 3, 5).reshape(b * hp * wp, c * p1 * p2)
        y = self.lin(cols)
        return y.reshape(b, hp, wp, self.out_channels).permute(0, 3, 1, 2)
