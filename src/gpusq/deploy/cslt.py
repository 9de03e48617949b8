"""cuSPARSELt 2:4 INT8 GEMMs with the library's whole epilogue, through nvmath-python's bindings.

Why not ``torch._cslt_sparse_mm``: it exposes only bias, alpha, alg id and split-K, and rebuilds
its plan on every call. cuSPARSELt itself computes

    D = act(alpha[n] * (W_2:4 @ x^T) + beta[n] * C + bias[n]) * gelu_scaling

with INT8 or BF16 output. That lets fc1 write fc2's INT8 input directly (GELU in the epilogue,
``gelu_scaling`` = 1 / fc2's input scale, saturating round-half-even to INT8), and proj / fc2 add
the residual stream through C. Measured on the H200 (../shared/docs/GPU_FINDINGS.md): INT8 out +
GELU equals ``clamp(round_half_even(erf_gelu(y) / s), -128, 127)`` on 99.97% of outputs (the rest
one code away); with the per-channel alpha VECTOR, beta must be a device vector too (a host beta
beside an alpha vector silently gives wrong results).

A ``SparseGemm`` holds one compressed weight; ``prepare(mp)`` builds the plan for ``mp`` rows once
(outside any CUDA graph), picks the algorithm with ``cusparseLtMatmulSearch`` (algorithm id and
split-K cached per shape in memory and on disk), and ``__call__`` is a single ``cusparseLtMatmul``
on the current stream with raw pointers: nothing on the host but the launch, so it is captured in
the model's CUDA graph. Layout (as torch's own cuSPARSELt ops, so ``torch._cslt_compress`` gives the
compressed weight): W [N, K] row-major structured, x [M, K] row-major used transposed, D column-major
[N, M] = row-major [M, N].
"""

from __future__ import annotations

import numpy as np
import torch

from gpusq.deploy import cusparselt as cs
from gpusq.errors import GpusqError

R_32F, R_8I, R_16BF = 0, 3, 14  # cudaDataType_t
ORDER_COL, ORDER_ROW = 1, 2  # cusparseOrder_t
OP_N, OP_T = 0, 1  # cusparseOperation_t
OUT_DTYPES = {"bf16": (torch.bfloat16, R_16BF), "int8": (torch.int8, R_8I)}
ALIGN = 16  # bytes: the alignment every matrix descriptor declares (checked on each call's pointers)

_HANDLES: dict[int, int] = {}
_BIAS_DTYPE: dict[str, torch.dtype] = {}


def available() -> bool:
    """Whether nvmath-python's cuSPARSELt bindings can be imported (the ``gpu`` extra)."""
    try:
        import nvmath.bindings.cusparseLt  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _cl():
    try:
        from nvmath.bindings import cusparseLt
    except Exception as e:  # noqa: BLE001
        raise GpusqError("the fused cuSPARSELt path needs nvmath-python (pip install 'gpusq[gpu]'): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return cusparseLt


def handle() -> int:
    """The process's cuSPARSELt handle for the current CUDA device (created once)."""
    dev = torch.cuda.current_device()
    if dev not in _HANDLES:
        torch.cuda.init()
        _HANDLES[dev] = _cl().init()
    return _HANDLES[dev]


def _stream_array() -> np.ndarray:
    return np.array([torch.cuda.current_stream().cuda_stream], dtype=np.uint64)


class _Plan:
    """Descriptors, algorithm selection, plan and workspace of one GEMM at ``mp`` rows."""

    def __init__(self, g: SparseGemm, mp: int, bias_dtype: torch.dtype | None, alg: dict | None):
        cl = _cl()
        h = handle()
        self.keep: list[np.ndarray] = []
        self.mp = mp
        self.a = cl.structured_descriptor_init(h, g.np_, g.kp, g.kp, ALIGN, R_8I, ORDER_ROW,
                                               cl.Sparsity.SPARSITY_50_PERCENT)
        self.b = cl.dense_descriptor_init(h, mp, g.kp, g.kp, ALIGN, R_8I, ORDER_ROW)
        self.d = cl.dense_descriptor_init(h, g.np_, mp, g.np_, ALIGN, g.out_cuda, ORDER_COL)
        self.mm = cl.matmul_descriptor_init(h, OP_N, OP_T, self.a, self.b, self.d, self.d, cl.ComputeType.COMPUTE_32I)
        A = cl.MatmulDescAttribute
        self._set_desc(A.ALPHA_VECTOR_SCALING, 1)
        if g.residual:
            self._set_desc(A.BETA_VECTOR_SCALING, 1)
        if g.bias is not None:
            self.bias = g.bias.to(bias_dtype).contiguous()
            self._set_desc(A.BIAS_POINTER, self.bias.data_ptr(), np.uint64)
        if g.gelu:
            self._set_desc(A.ACTIVATION_GELU, 1)
            if g.gelu_scale is not None:
                self._set_desc(A.ACTIVATION_GELU_SCALING, g.gelu_scale, np.float32)
        self.sel = cl.matmul_alg_selection_init(h, self.mm, cl.MatmulAlg.DEFAULT)
        if alg is not None:
            for key, attr in _ALG_ATTRS.items():
                if key in alg:
                    self._set_alg(attr(), alg[key])
        self.plan = cl.matmul_plan_init(h, self.mm, self.sel)
        self.workspace = torch.empty(max(int(cl.matmul_get_workspace(h, self.plan)), 1), dtype=torch.uint8,
                                     device=g.device)

    def _set_desc(self, attr, value, dt=np.int32) -> None:
        v = np.array([value], dtype=dt)
        self.keep.append(v)
        _cl().matmul_desc_set_attribute(handle(), self.mm, attr, v.ctypes.data, v.nbytes)

    def _set_alg(self, attr, value: int) -> None:
        cl = _cl()
        v = np.array([value], dtype=cl.get_matmul_alg_attribute_dtype(attr))
        self.keep.append(v)
        cl.matmul_alg_set_attribute(handle(), self.sel, attr, v.ctypes.data, v.nbytes)

    def alg_attrs(self) -> dict:
        cl = _cl()
        out = {}
        for key, attr in _ALG_ATTRS.items():
            a = attr()
            v = np.zeros(1, dtype=cl.get_matmul_alg_attribute_dtype(a))
            cl.matmul_alg_get_attribute(handle(), self.sel, a, v.ctypes.data, v.nbytes)
            out[key] = int(v[0])
        return out

    def destroy(self) -> None:
        cl = _cl()
        for fn, obj in ((cl.matmul_plan_destroy, "plan"), (cl.matmul_alg_selection_destroy, "sel"),
                        (cl.matmul_descriptor_destroy, "mm"), (cl.mat_descriptor_destroy, "a"),
                        (cl.mat_descriptor_destroy, "b"), (cl.mat_descriptor_destroy, "d")):
            ptr = getattr(self, obj, None)
            if ptr:
                try:
                    fn(ptr)
                except Exception:  # noqa: BLE001 - teardown must not raise
                    pass
                setattr(self, obj, None)


def _alg_attr(name: str):
    return lambda: getattr(_cl().MatmulAlgAttribute, name)


_ALG_ATTRS = {"alg": _alg_attr("CONFIG_ID"), "split_k": _alg_attr("SPLIT_K"),
              "split_k_mode": _alg_attr("SPLIT_K_MODE"), "split_k_buffers": _alg_attr("SPLIT_K_BUFFERS")}


class SparseGemm:
    """One INT8 2:4 weight on cuSPARSELt: ``y[mp, np_] = act(alpha * (x @ W^T) + bias + C) * gelu_scale``.

    ``codes``: [N, K] integer weight codes (2:4 along K); ``alpha``: [N] float32, the per-channel
    dequantization ``s_x * s_w[n]`` (times a LayerScale gamma where one is folded in); ``bias``: [N]
    (scaled like alpha's extra factor, if any); ``out``: ``bf16`` or ``int8``; ``gelu_scale``: with
    ``gelu``, 1 / the next layer's input scale (INT8 out); ``residual``: ``__call__`` takes C, added
    with beta = 1. N and K are zero-padded to multiples of 32; rows ``mp`` must be a multiple of 32.
    """

    def __init__(self, codes: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, *, out: str = "bf16",
                 gelu: bool = False, gelu_scale: float | None = None, residual: bool = False,
                 device: torch.device | str = "cuda", name: str = ""):
        if out not in OUT_DTYPES:
            raise ValueError(f"out must be one of {', '.join(OUT_DTYPES)}, got {out!r}")
        if gelu and out == "bf16":
            raise ValueError("cuSPARSELt 0.8 has no GELU epilogue with bf16 output (measured: status 3)")
        self.name = name
        self.device = torch.device(device)
        self.n, self.k = codes.shape
        self.np_, self.kp = cs.round_up(self.n), cs.round_up(self.k)
        self.out = out
        self.out_dtype, self.out_cuda = OUT_DTYPES[out]
        self.gelu, self.gelu_scale, self.residual = gelu, gelu_scale, residual
        w = torch.zeros(self.np_, self.kp, dtype=torch.int8, device=self.device)
        w[: self.n, : self.k] = codes.to(self.device).round().to(torch.int8)
        self.w_c = cs.compress(w)
        self.alpha = torch.zeros(self.np_, dtype=torch.float32, device=self.device)
        self.alpha[: self.n] = alpha.detach().float().reshape(-1).to(self.device)
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(self.np_, dtype=torch.float32, device=self.device)
            self.bias[: self.n] = bias.detach().float().reshape(-1).to(self.device)
        self.beta = torch.ones(self.np_, dtype=torch.float32, device=self.device) if residual else None
        self._beta0 = np.zeros(1, dtype=np.float32)  # host beta = 0 when there is no C
        self.plans: dict[int, _Plan] = {}
        self.timings: dict[int, dict] = {}

    # -- plans ------------------------------------------------------------------------------------
    def _key(self, mp: int) -> str:
        ep = "+".join(t for t, on in (("bias", self.bias is not None), ("gelu", self.gelu),
                                      ("res", self.residual)) if on) or "plain"
        return cs.shape_key("int8nv", self.np_, self.kp, mp, self.out_dtype, ep)

    def prepare(self, mp: int, search: bool = True) -> None:
        """Build the plan for ``mp`` rows and choose its algorithm (cached per shape, on disk too)."""
        if mp in self.plans:
            return
        if mp % cs.ROW_ALIGN:
            raise ValueError(f"{self.name}: rows must be a multiple of {cs.ROW_ALIGN}, got {mp}")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self.name}: {mp} rows were not prepared before CUDA-graph capture")
        bias_dtype = bias_dtype_for(self.out) if self.bias is not None else None
        key = self._key(mp)
        cached = cs._SEARCHED.get(key) or (cs._load_disk_cache().get(key) if search else None)
        if cached is not None and "split_k" in cached:
            plan = _Plan(self, mp, bias_dtype, cached)
            self.plans[mp] = plan
            cs._SEARCHED[key] = cached
            self.timings[mp] = {"alg": cached["alg"], "split_k": cached["split_k"], "ms": cached.get("ms")}
            return
        plan = _Plan(self, mp, bias_dtype, None)
        entry = {"alg": 0, "split_k": 1}
        if search:
            x = torch.randint(-128, 128, (mp, self.kp), dtype=torch.int8, device=self.device)
            c = torch.randn(mp, self.np_, device=self.device).to(self.out_dtype) if self.residual else None
            y = torch.empty(mp, self.np_, dtype=self.out_dtype, device=self.device)
            cl = _cl()
            streams = _stream_array()  # a named array: its address must stay valid through the call
            cl.matmul_search(handle(), plan.plan, self.alpha.data_ptr(), self.w_c.data_ptr(), x.data_ptr(),
                             *self._beta_c(c, y), y.data_ptr(), plan.workspace.data_ptr(), streams.ctypes.data, 1)
            torch.cuda.synchronize()
            entry = plan.alg_attrs()
            plan.destroy()  # rebuilt with the chosen algorithm: its workspace may differ
            plan = _Plan(self, mp, bias_dtype, entry)
            self.plans[mp] = plan
            entry["ms"] = cs.time_graph(lambda: self(x, c))
            cs._SEARCHED[key] = entry
            cs._save_disk_cache({key: entry})
        self.plans[mp] = plan
        self.timings[mp] = {"alg": entry["alg"], "split_k": entry.get("split_k"), "ms": entry.get("ms")}

    def _beta_c(self, c: torch.Tensor | None, y: torch.Tensor) -> tuple[int, int]:
        if self.residual:
            if c is None:
                raise ValueError(f"{self.name}: this GEMM adds a residual; pass it")
            return self.beta.data_ptr(), c.data_ptr()
        return self._beta0.ctypes.data, y.data_ptr()

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        mp = x.shape[0]
        plan = self.plans.get(mp)
        if plan is None:
            self.prepare(mp)
            plan = self.plans[mp]
        if x.dtype != torch.int8 or tuple(x.shape) != (mp, self.kp) or not x.is_contiguous():
            raise ValueError(f"{self.name}: input must be contiguous int8 [{mp}, {self.kp}], got "
                             f"{x.dtype} {tuple(x.shape)}")
        if residual is not None and (residual.dtype != self.out_dtype or tuple(residual.shape) != (mp, self.np_)
                                     or not residual.is_contiguous()):
            raise ValueError(f"{self.name}: residual must be contiguous {self.out_dtype} [{mp}, {self.np_}]")
        if x.data_ptr() % ALIGN or (residual is not None and residual.data_ptr() % ALIGN):
            raise ValueError(f"{self.name}: input and residual must start on a {ALIGN}-byte boundary (the plan's "
                             "descriptors promise cuSPARSELt that alignment)")
        y = torch.empty(mp, self.np_, dtype=self.out_dtype, device=x.device)
        beta, c = self._beta_c(residual, y)
        streams = _stream_array()  # named: `_stream_array().ctypes.data` would point into a freed array
        _cl().matmul(handle(), plan.plan, self.alpha.data_ptr(), self.w_c.data_ptr(), x.data_ptr(), beta, c,
                     y.data_ptr(), plan.workspace.data_ptr(), streams.ctypes.data, 1)
        return y

    def report(self) -> dict:
        return {str(k): v for k, v in self.timings.items()}

    def __del__(self):
        for p in getattr(self, "plans", {}).values():
            p.destroy()

    def __repr__(self) -> str:
        ep = [t for t, on in (("bias", self.bias is not None), ("gelu", self.gelu), ("+C", self.residual)) if on]
        return f"SparseGemm({self.name}: {self.k}->{self.n}, int8 2:4 -> {self.out}, epilogue {ep})"


# ------------------------------------------------------------------------------------------------
# which bias dtype the epilogue reads, found by running it (a wrong one gives wrong numbers, no error)
# ------------------------------------------------------------------------------------------------
def reference(x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, *,
              gelu: bool = False, gelu_scale: float | None = None, residual: torch.Tensor | None = None,
              out: str = "bf16") -> torch.Tensor:
    """What a ``SparseGemm`` computes, in float64 (INT8 out: saturating round-half-even codes)."""
    y = (x.double() @ codes.double().t()) * alpha.double()
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    if gelu:
        y = torch.nn.functional.gelu(y)
        if gelu_scale is not None:
            y = y * gelu_scale
    if out == "int8":
        y = torch.clamp(torch.round(y), -128, 127)
    return y


def bias_dtype_for(out: str) -> torch.dtype:
    """The bias dtype cuSPARSELt's epilogue reads for INT8 inputs and ``out`` output (float32 or
    bf16), found once per process by comparing a small GEMM with ``reference``."""
    if out in _BIAS_DTYPE:
        return _BIAS_DTYPE[out]
    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, n = 64, 128, 96
    from gpusq.sparsity import mask_2to4

    w = torch.randint(-127, 128, (n, k), device="cuda", generator=g).float()
    w = w * mask_2to4(w)
    x = torch.randint(-128, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    alpha = torch.rand(n, device="cuda", generator=g) * 2e-4 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g)
    gelu, scale = out == "int8", 20.0
    ref = reference(x, w, alpha, bias, gelu=gelu, gelu_scale=scale if gelu else None, out=out)
    errors = {}
    for dt in (torch.float32, torch.bfloat16):
        _BIAS_DTYPE[out] = dt
        try:
            gm = SparseGemm(w, alpha, bias, out=out, gelu=gelu, gelu_scale=scale if gelu else None, name="selfcheck")
            gm.prepare(m, search=False)
            y = gm(x).double()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a refused configuration is a "no" for this dtype
            errors[str(dt)] = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        finally:
            _BIAS_DTYPE.pop(out, None)
        if out == "int8":
            ok = float((y - ref).abs().le(1).double().mean()) == 1.0 and float((y == ref).double().mean()) > 0.99
            errors[str(dt)] = f"int8 codes equal {float((y == ref).double().mean()):.4f}"
        else:
            rel = float((y - ref).norm() / ref.norm())
            ok = rel < 1e-2
            errors[str(dt)] = f"rel err {rel:.2e}"
        if ok:
            _BIAS_DTYPE[out] = dt
            return dt
    raise GpusqError(f"cuSPARSELt's epilogue gives wrong results for INT8 2:4 with a bias and {out} output with "
                     f"every bias dtype tried ({errors})")


def max_alg_id(g: SparseGemm, mp: int, bias_dtype: torch.dtype | None) -> int:
    """The largest algorithm id cuSPARSELt offers for this GEMM at ``mp`` rows (CONFIG_MAX_ID)."""
    cl = _cl()
    p = _Plan(g, mp, bias_dtype, None)
    try:
        a = cl.MatmulAlgAttribute.CONFIG_MAX_ID
        v = np.zeros(1, dtype=cl.get_matmul_alg_attribute_dtype(a))
        cl.matmul_alg_get_attribute(handle(), p.sel, a, v.ctypes.data, v.nbytes)
        return int(v[0])
    finally:
        p.destroy()
