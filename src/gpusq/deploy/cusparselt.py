"""cuSPARSELt 2:4 GEMMs (through PyTorch's ``torch._cslt_*`` ops): GPU checks, weight compression,
per-shape algorithm search (timed under CUDA graphs, cached in memory and on disk), and the
epilogue self-check.

Why graphs for timing: eager ``_cslt_sparse_mm`` pays ~0.5-1 ms of host-side plan setup per call
(docs/deploy.md), which would drown the kernel differences the search is meant to see. Why a
self-check: whether cuSPARSELt applies the per-channel ``alpha`` vector and the bias in its
epilogue for a given dtype pair is a property of the installed library; we test it once on a
small GEMM against an exact integer reference instead of assuming it.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from gpusq.errors import GpusqError

ROW_ALIGN = 32  # cuSPARSELt wants rows/cols of 8-bit operands in multiples of 32 (16 for 16-bit)
MAX_ALG_IDS = 32

_SEARCHED: dict[str, dict] = {}
PLAUSIBLE = 1.25  # ids whose quick timing is within this factor of the fastest get the careful timing
_EPILOGUE: dict[str, str] = {}


def round_up(n: int, m: int = ROW_ALIGN) -> int:
    return (n + m - 1) // m * m


def check_gpu(need_cusparselt: bool = True) -> torch.device:
    """The CUDA device to deploy on, or a one-line GpusqError saying what is missing."""
    need = "an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper) with cuSPARSELt"
    if not torch.cuda.is_available():
        raise GpusqError(f"gpusq deploy/bench needs {need}; no CUDA device is available here")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise GpusqError(f"gpusq deploy/bench needs {need}; found {torch.cuda.get_device_name()} "
                         f"(compute capability {major}.{minor})")
    if need_cusparselt:
        backend = getattr(torch.backends, "cusparselt", None)
        if backend is None or not backend.is_available():
            raise GpusqError(f"gpusq deploy/bench needs {need}; this PyTorch build has no cuSPARSELt")
    return torch.device("cuda", torch.cuda.current_device())


def cusparselt_version() -> int | None:
    backend = getattr(torch.backends, "cusparselt", None)
    return backend.version() if backend is not None and backend.is_available() else None


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def time_graph(fn: Callable[[], object], reps: int = 7, inner: int = 10) -> float:
    """Median milliseconds of one ``fn()`` call, replayed from a CUDA graph (warm-up included)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    del g
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# disk cache of searched algorithms
# ------------------------------------------------------------------------------------------------
def cache_path() -> Path:
    root = os.environ.get("GPUSQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gpusq")
    return Path(root) / "cslt_algs.json"


def _load_disk_cache() -> dict:
    p = cache_path()
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_cache(entries: dict) -> None:
    from gpusq.checkpoint import atomic_write_text

    try:
        cur = _load_disk_cache()
        cur.update(entries)
        atomic_write_text(cache_path(), json.dumps(cur, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs a re-search next time


def shape_key(kind: str, n: int, k: int, m: int, out_dtype: torch.dtype, epilogue: str) -> str:
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    return (f"{gpu}|cslt{cusparselt_version()}|torch{torch.__version__.split('+')[0]}|{kind}|"
            f"{str(out_dtype).removeprefix('torch.')}|N{n}|K{k}|M{m}|{epilogue}")


# ------------------------------------------------------------------------------------------------
# the GEMM itself
# ------------------------------------------------------------------------------------------------
OVERFETCH_BYTES = 1 << 17


def compress(w: torch.Tensor) -> torch.Tensor:
    """``torch._cslt_compress(w)`` stored with ``OVERFETCH_BYTES`` of zeros after it (the returned tensor is
    the compressed weight itself, a view at the start of the larger buffer).

    cuSPARSELt 0.8's Hopper kernels read a whole K tile of the compressed weight's metadata even when K is
    smaller than the tile: on the H200 a 64x64 INT8 weight (2,592 compressed bytes) under an algorithm with
    K tile 256 read bytes 2048..4096 (compute-sanitizer memcheck, ``benchmarks/gpu_run.sh hfrepro``). The
    extra bytes meet zero-filled activations, so results are right, but past the allocation's end the read
    can fault: the "illegal memory access" of the fused Hugging Face Swin test model (docs/deploy.md).
    """
    wc = torch._cslt_compress(w)
    extra = -(-OVERFETCH_BYTES // wc.element_size())
    buf = torch.zeros(wc.numel() + extra, dtype=wc.dtype, device=wc.device)
    buf[: wc.numel()] = wc.reshape(-1)
    return buf[: wc.numel()].view(wc.shape)


def cslt_mm(w_c: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor | None,
            alg_id: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x @ W.T`` ([M, K] row-major in, [M, N] out) on the compressed 2:4 weight ``w_c``.

    ``out_dtype`` applies to 8-bit inputs only (16-bit inputs give their own dtype)."""
    od = out_dtype if x.dtype in (torch.int8, torch.float8_e4m3fn) else None
    return torch._cslt_sparse_mm(w_c, x.t(), bias, alpha, out_dtype=od, transpose_result=True, alg_id=alg_id)


def _apply_epilogue(y: torch.Tensor, alpha: torch.Tensor | None, bias: torch.Tensor | None, mode: str,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(alpha, bias) to hand to cuSPARSELt under epilogue ``mode``."""
    if mode == "alpha_bias":
        return alpha, bias.to(out_dtype) if bias is not None else None
    if mode == "alpha_bias_f32":
        return alpha, bias.float() if bias is not None else None
    if mode == "alpha":
        return alpha, None
    return None, None


EPILOGUE_MODES = ("alpha_bias", "alpha_bias_f32", "alpha", "none")
FULL_EPILOGUE = ("alpha_bias", "alpha_bias_f32")


def epilogue_mode(kind: str) -> str:
    """Which of scale-vector/bias cuSPARSELt applies correctly for ``kind`` (int8/fp8/bf16 in, bf16
    out), found by running each on a small GEMM and comparing with an exact reference."""
    if kind in _EPILOGUE:
        return _EPILOGUE[kind]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m, k, n = 64, 128, 96
    from gpusq.sparsity import mask_2to4

    if kind == "int8":
        w = torch.randint(-127, 128, (n, k), device=dev, generator=g).float()
        x = torch.randint(-128, 128, (m, k), device=dev, generator=g).float()
    else:
        w = torch.randn(n, k, device=dev, generator=g)
        x = torch.randn(m, k, device=dev, generator=g)
    w = w * mask_2to4(w)
    dt = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kind]
    wq, xq = w.to(dt), x.to(dt)
    alpha = torch.rand(n, device=dev, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n, device=dev, generator=g)
    ref = (xq.float() @ wq.float().t()) * alpha + bias
    wc = compress(wq)
    chosen = None
    for mode in EPILOGUE_MODES:
        try:
            a, b = _apply_epilogue(ref, alpha, bias, mode, torch.bfloat16)
            y = cslt_mm(wc, xq, b, a, 0).float()
            if a is None:
                y = y * alpha
            if b is None:
                y = y + bias
            torch.cuda.synchronize()
        except RuntimeError:
            continue
        err = float((y - ref).norm() / ref.norm())
        if err < 1e-2:
            chosen = mode
            break
    if chosen is None:
        raise GpusqError(f"cuSPARSELt {cusparselt_version()} gives wrong results for {kind} 2:4 GEMMs "
                         "on this GPU in every epilogue mode")
    _EPILOGUE[kind] = chosen
    return chosen


def search_alg(w_c: torch.Tensor, m: int, k: int, kind: str, bias: torch.Tensor | None,
               alpha: torch.Tensor | None, n: int, out_dtype: torch.dtype = torch.bfloat16,
               use_disk: bool = True) -> tuple[int, float]:
    """Fastest cuSPARSELt algorithm id for this weight at ``m`` rows, and its time in ms.

    Every id the library accepts is timed once, briefly, on random data under a CUDA graph; the ids
    within ``PLAUSIBLE`` x of the fastest are then timed carefully (median of several replays). The
    result is kept per (GPU, library versions, dtype, shape) in memory and in ``cache_path()``.
    """
    mode = epilogue_mode(kind)
    key = shape_key(kind, n, k, m, out_dtype, mode)
    if key in _SEARCHED:
        e = _SEARCHED[key]
        return e["alg"], e["ms"]
    if use_disk:
        disk = _load_disk_cache()
        if key in disk:
            _SEARCHED[key] = disk[key]
            return disk[key]["alg"], disk[key]["ms"]
    dt = w_c.dtype
    if dt == torch.int8:
        x = torch.randint(-128, 128, (m, k), device=w_c.device, dtype=torch.int8)
    else:
        x = torch.randn(m, k, device=w_c.device).to(dt)
    quick = {}
    for alg in range(MAX_ALG_IDS):  # one short timing per id the library accepts ...
        try:
            cslt_mm(w_c, x, bias, alpha, alg, out_dtype)
            torch.cuda.synchronize()
        except RuntimeError:
            break  # ids are contiguous from 0: the first refused one ends the list
        quick[alg] = time_graph(lambda a=alg: cslt_mm(w_c, x, bias, alpha, a, out_dtype), reps=1, inner=3)
    best, best_ms, timings = None, float("inf"), {}
    fastest = min(quick.values(), default=0.0)
    for alg in [a for a, t in quick.items() if t <= PLAUSIBLE * fastest]:  # ... a careful one for the plausible
        # big GEMMs need fewer replays for a stable median (keeps Swin's many shapes quick)
        reps, inner = (7, 10) if m * n * k < (1 << 34) else (5, 4)
        ms = time_graph(lambda a=alg: cslt_mm(w_c, x, bias, alpha, a, out_dtype), reps=reps, inner=inner)
        timings[alg] = ms
        if ms < best_ms:
            best, best_ms = alg, ms
    if best is None:
        raise GpusqError(f"cuSPARSELt accepts no algorithm for a {kind} 2:4 GEMM of shape "
                         f"M={m} N={n} K={k} on {torch.cuda.get_device_name()}")
    entry = {"alg": best, "ms": best_ms, "all_ms": {str(a): round(t, 5) for a, t in timings.items()},
             "quick_ms": {str(a): round(t, 5) for a, t in quick.items()}}
    _SEARCHED[key] = entry
    if use_disk:
        _save_disk_cache({key: entry})
    return best, best_ms


def searched_algs() -> dict[str, dict]:
    """Everything searched in this process (for reports)."""
    return dict(_SEARCHED)
