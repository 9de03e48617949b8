"""Triton kernels for the memory-bound glue of a quantized ViT: LayerNorm + quantize, the attention
head merge + quantize, and quantize + zero-pad.

Why hand-written kernels: between two int8/fp8 GEMMs the activation must be normalized (or have
its heads merged), quantized and zero-padded to the GEMM's row/column alignment. Done as separate
torch ops that is several round trips through memory; each function here reads its input once and
writes the int8/fp8 codes (padding included) once, in one launch, with no host synchronization
(the activation scale is read from device memory), so it can be captured in a CUDA graph.

Quantization (the semantics of ``gpusq.deploy.fused``): int8 codes are
``clamp(round_half_even(y * inv_scale), -128, 127)``, fp8 codes are
``clamp(y * inv_scale, -448, 448)`` cast to E4M3 (round to nearest even), with ``y`` in float32.
Padding rows/columns of the output are written as 0 and padding of the input is never read.

The module imports without triton (and without a GPU); the functions then raise ``RuntimeError``.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) they run on CPU tensors.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: importable, the functions raise
    triton = None
    tl = None

__all__ = ["layernorm_quant", "layernorm_quant_gather", "window_attention", "quantize_heads", "quantize_pad",
           "assemble_tokens", "HAS_TRITON"]

HAS_TRITON = triton is not None

# Tile sizes, chosen from the SASS of the kernels compiled for sm_90 (instruction count per element,
# registers, no spills). The H200 streams ~18 bytes per SM clock, i.e. ~6 elements per clock for
# bf16 in / int8 out, against 128 instructions per clock: ~21 instructions per element is the budget.
# LayerNorm: 48 elements per thread (4 warps, 128 registers) keeps it at ~21 (vs ~26 at 24 elements,
# dominated by per-row reduction overhead); the head merge is ~11 per element at 32.
_LN_ELEMS = 6144  # rows * width per LayerNorm program (4 warps)
_HEADS_TILE = (16, 256)  # rows, columns per head-merge program (4 warps)
_MIN_PROGRAMS = 256  # fewer rows per program below this many programs (small batches: latency-bound)
_LN_BIG_ROWS = 4096  # from here on the measured large-input configuration (see layernorm_quant)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _quantize(y, inv_scale, valid, FP8: tl.constexpr):
    """float32 values -> int8 / e4m3 codes; 0 where ``valid`` is false (padding).

    Rounding is the float32 magic-number trick, not ``libdevice.rint``: rint returns nothing under
    TRITON_INTERPRET=1 (Triton 3.8), while the trick is plain float32 adds, exact
    round-half-to-even in both the compiled kernel and the interpreter. The clamp to [-128, 127]
    comes first (same result, the bounds are integers): it bounds |v| well below 2**22, and it keeps
    the multiply from being contracted with the rounding add into one FMA (the sm_90 SASS keeps a
    separate FADD). The interpreter's float -> e4m3 conversion is not exact round-to-nearest-even
    (numpy emulation); compiled for Hopper it is ``cvt.rn.satfinite.e4m3x2.f32``.
    """
    v = y * inv_scale
    if FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        v = tl.where(valid, v, 0.0)
        return v.to(tl.float8e4nv)  # round to nearest even, like torch's .to(torch.float8_e4m3fn)
    else:
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        # 12582912 = 1.5 * 2**23: v + 1.5 * 2**23 lies in [2**23, 2**24), where the float32 spacing is 1,
        # so the add rounds v to an integer k (round to nearest even) and the float's bits are
        # 0x4B400000 + k: the low byte is k as int8. Taking it saves the float->int conversion.
        v = tl.where(valid, v, 0.0) + 12582912.0
        return v.to(tl.int32, bitcast=True).to(tl.int8)


@_jit
def _ln_load(x_ptr, row_off, row_ok, c, cols, stride_xc):
    """One column chunk of the rows, float32; masked lanes are never read (padding, even NaN, cannot
    reach the sums) and hold 0."""
    ok = row_ok[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + row_off[:, None] + c[None, :] * stride_xc, mask=ok, other=0.0)
    return x.to(tl.float32), ok


@_jit
def _ln_store(out_ptr, out_off, out_row_ok, c, out_cols, xc, ok, rstd, w_ptr, b_ptr, cols, inv_scale,
              HAS_BIAS: tl.constexpr, FP8: tl.constexpr):
    col_ok = c < cols
    y = xc * rstd[:, None] * tl.load(w_ptr + c, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=col_ok, other=0.0)[None, :]
    q = _quantize(y, inv_scale, ok, FP8)
    tl.store(out_ptr + out_off[:, None] + c[None, :], q, mask=out_row_ok[:, None] & (c < out_cols)[None, :])


@_jit
def _layernorm_quant_kernel(x_ptr, w_ptr, b_ptr, inv_scale_ptr, out_ptr, map_ptr,
                            rows, cols, cols_f, out_rows, out_cols, stride_xm, stride_xc, stride_om, eps,
                            map_period, src_period,
                            HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HAS_MAP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr):
    """BLOCK_M whole rows per program, held in registers: one read of x, one write of the codes.

    A row is two power-of-two chunks, BLOCK_C1 + BLOCK_C2 >= out_cols (BLOCK_C2 may be 0): ViT
    widths are 3 * 2**k (192, 384, 768, 1536), which one power-of-two block covers with 25% idle
    lanes; the kernel is close to compute-bound on the H200, so the idle lanes would cost ~25%.
    With HAS_MAP, output row r reads input row ``(r // map_period) * src_period + map[r % map_period]``
    (a row gather, e.g. Swin's shifted-window order; a map entry < 0 is a zero row).
    """
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r64 = r.to(tl.int64)
    row_ok = r < rows
    if HAS_MAP:
        img = r // map_period
        src = tl.load(map_ptr + (r - img * map_period), mask=row_ok, other=-1)
        row_ok = row_ok & (src >= 0)
        src64 = img.to(tl.int64) * src_period + src
    else:
        src64 = r64
    c1 = tl.arange(0, BLOCK_C1)
    x1, ok1 = _ln_load(x_ptr, src64 * stride_xm, row_ok, c1, cols, stride_xc)
    total = tl.sum(x1, axis=1)
    if BLOCK_C2 > 0:
        c2 = BLOCK_C1 + tl.arange(0, BLOCK_C2)
        x2, ok2 = _ln_load(x_ptr, src64 * stride_xm, row_ok, c2, cols, stride_xc)
        total += tl.sum(x2, axis=1)
    mean = tl.div_rn(total, cols_f)
    xc1 = tl.where(ok1, x1 - mean[:, None], 0.0)
    sq = tl.sum(xc1 * xc1, axis=1)
    if BLOCK_C2 > 0:
        xc2 = tl.where(ok2, x2 - mean[:, None], 0.0)
        sq += tl.sum(xc2 * xc2, axis=1)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sq, cols_f) + eps))
    inv_scale = tl.load(inv_scale_ptr)
    out_row_ok = r < out_rows
    _ln_store(out_ptr, r64 * stride_om, out_row_ok, c1, out_cols, xc1, ok1, rstd, w_ptr, b_ptr, cols, inv_scale,
              HAS_BIAS, FP8)
    if BLOCK_C2 > 0:
        _ln_store(out_ptr, r64 * stride_om, out_row_ok, c2, out_cols, xc2, ok2, rstd, w_ptr, b_ptr, cols,
                  inv_scale, HAS_BIAS, FP8)


@_jit
def _quantize_heads_kernel(o_ptr, inv_scale_ptr, out_ptr,
                           n_tokens, batch, heads, out_rows, out_cols,
                           stride_b, stride_h, stride_n, stride_d, stride_om,
                           D: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """A [BLOCK_M, BLOCK_C] tile of the output; row r = b*N + n, column c = h*D + d.

    The index split is done on the 1-D row and column ranges (not per element), and D is a
    constexpr so that ``c // D``, ``c % D`` keep the contiguity Triton needs to vectorize loads.
    """
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = r // n_tokens
    n = r - b * n_tokens
    h = c // D
    d = c % D
    row_off = b.to(tl.int64) * stride_b + n.to(tl.int64) * stride_n
    col_off = h.to(tl.int64) * stride_h + d * stride_d
    ok = (b < batch)[:, None] & (h < heads)[None, :]
    y = tl.load(o_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0).to(tl.float32)
    q = _quantize(y, tl.load(inv_scale_ptr), ok, FP8)
    out_mask = (r < out_rows)[:, None] & (c < out_cols)[None, :]
    tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_om + c[None, :], q, mask=out_mask)


@_jit
def _assemble_tokens_kernel(tok_ptr, prefix_ptr, pos_ptr, out_ptr,
                            n_tokens, n_prefix, batch, cols, out_rows, out_cols, stride_tb, stride_tn, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row r = b*N + t of the padded token matrix: prefix token t (t < P) or patch t - P, plus pos[t]."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = r // n_tokens
    t = r - b * n_tokens
    row_ok = b < batch
    col_ok = c < cols
    pre = (t < n_prefix) & row_ok
    pat = (t >= n_prefix) & row_ok
    tp = tl.maximum(t - n_prefix, 0)
    tok = tl.load(tok_ptr + b.to(tl.int64)[:, None] * stride_tb + tp.to(tl.int64)[:, None] * stride_tn + c[None, :],
                  mask=pat[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tq = tl.minimum(t, n_prefix - 1)
    tq = tl.maximum(tq, 0)
    pfx = tl.load(prefix_ptr + tq[:, None] * cols + c[None, :], mask=pre[:, None] & col_ok[None, :],
                  other=0.0).to(tl.float32)
    ok = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + t[:, None] * cols + c[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.where(ok, tok + pfx + pos, 0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_om + c[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(r < out_rows)[:, None] & (c < out_cols)[None, :])


@_jit
def _window_attention_kernel(qkv_ptr, bias_ptr, map_ptr, inv_scale_ptr, out_ptr,
                             win_per_img, bias_windows, heads, width, src_rows, stride_qm, stride_om, scale,
                             N: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr,
                             F32_DOT: tl.constexpr):
    """One (window, head): softmax(q k^T * scale + bias) v over the window's N tokens (padded to BN),
    quantized and written to the token rows the window came from (``map``), columns h*D .. h*D + D.

    q, k, v are read from the qkv GEMM's output rows ``w*N + i`` (columns [3, heads, D]); the bias
    table [bias_windows, heads, BN, BN] holds the relative-position bias plus the shift mask, with
    -inf in the padding keys. Scores and softmax in float32, P in bf16 for the second product.
    F32_DOT (the interpreter only: its bf16 ``tl.dot`` is wrong in Triton 3.8) multiplies the same bf16
    values in float32.
    """
    w = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BN)
    d = tl.arange(0, D)
    ok = i < N
    row = (w.to(tl.int64) * N + i) * stride_qm
    col = h * D + d
    ptr = qkv_ptr + row[:, None] + col[None, :]
    q = tl.load(ptr, mask=ok[:, None], other=0.0)
    k = tl.load(ptr + width, mask=ok[:, None], other=0.0)
    v = tl.load(ptr + 2 * width, mask=ok[:, None], other=0.0)
    if F32_DOT:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * scale
    bw = w % bias_windows
    s += tl.load(bias_ptr + ((bw * heads + h) * BN + i[:, None]) * BN + i[None, :]).to(tl.float32)
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    inv_l = 1.0 / tl.sum(p, axis=1)
    o = tl.dot(p.to(qkv_ptr.dtype.element_ty).to(v.dtype), v) * inv_l[:, None]
    img = w // win_per_img
    src = tl.load(map_ptr + (w - img * win_per_img) * N + i, mask=ok, other=-1)
    valid = ok & (src >= 0)
    orow = img.to(tl.int64) * src_rows + src
    qo = _quantize(o, tl.load(inv_scale_ptr), valid[:, None] & (d < D)[None, :], FP8)
    tl.store(out_ptr + orow[:, None] * stride_om + col[None, :], qo, mask=valid[:, None] & (d < D)[None, :])


def _interpreted() -> bool:
    return type(_quantize_heads_kernel).__name__ == "InterpretedFunction"


def _check_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("gpusq.deploy.kernels needs triton (pip install triton); it is not importable here")
    if not _interpreted() and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("gpusq.deploy.kernels runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 "
                           "set before gpusq.deploy.kernels is imported)")


def _row_chunks(width: int) -> tuple[int, int]:
    """Two power-of-two chunks covering ``width`` with little excess: (largest power of two <= width,
    next power of two >= the rest, or 0)."""
    c1 = 1 << (width.bit_length() - 1)
    rest = width - c1
    return c1, (triton.next_power_of_2(rest) if rest else 0)


def _is_fp8(out_dtype: torch.dtype) -> bool:
    if out_dtype == torch.int8:
        return False
    if out_dtype == torch.float8_e4m3fn:
        return True
    raise ValueError(f"out_dtype must be torch.int8 or torch.float8_e4m3fn, got {out_dtype}")


def _output(out: torch.Tensor | None, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty((rows, cols), dtype=dtype, device=device)
    if tuple(out.shape) != (rows, cols) or out.dtype != dtype or out.device != device or out.stride(1) != 1:
        raise ValueError(f"out must be a [{rows}, {cols}] {dtype} tensor on {device} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}")
    return out


def _check_scale(inv_scale: torch.Tensor, device) -> None:
    if inv_scale.numel() != 1 or inv_scale.dtype != torch.float32 or inv_scale.device != device:
        raise ValueError("inv_scale must be a one-element float32 tensor on the input's device (read in the kernel: "
                         f"no host sync), got {inv_scale.dtype} {tuple(inv_scale.shape)} on {inv_scale.device}")


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                    inv_scale: torch.Tensor, rows: int, cols: int, out_dtype: torch.dtype = torch.int8,
                    out: torch.Tensor | None = None, *, block_m: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """LayerNorm over the first ``cols`` entries of the first ``rows`` rows of ``x`` [Mp, Cp], then
    quantized with ``inv_scale`` (1 / activation scale); returns [Mp, Cp] codes, zero elsewhere.

    Statistics in float32 (biased variance), as ``F.layer_norm`` in float32. One launch, one read
    of ``x`` and one write of the output: the int8/fp8 GEMM input comes straight out of the norm.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [Mp, Cp], got shape {tuple(x.shape)}")
    mp, cp = x.shape
    if not (0 <= rows <= mp and 1 <= cols <= cp):
        raise ValueError(f"need 0 <= rows <= {mp} and 1 <= cols <= {cp}, got rows={rows}, cols={cols}")
    return _layernorm(x, weight, bias, eps, inv_scale, rows, cols, mp, out_dtype, out, None, 1, 0, block_m,
                      num_warps)


def layernorm_quant_gather(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                           inv_scale: torch.Tensor, cols: int, row_map: torch.Tensor, images: int, src_rows: int,
                           out_rows: int, out_dtype: torch.dtype = torch.int8,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``layernorm_quant`` with the rows gathered: output row ``i * L + j`` (image ``i`` < ``images``,
    ``j`` < L = ``len(row_map)``) is the codes of input row ``i * src_rows + row_map[j]``, or zeros
    where ``row_map[j] < 0``; rows from ``images * L`` to ``out_rows`` are zeros.

    Swin uses it to read the token-order residual stream in (shifted, padded) window order: the
    cyclic shift, the window partition and the padding to whole windows cost no pass of their own.
    """
    if x.dim() != 2 or not (1 <= cols <= x.shape[1]):
        raise ValueError(f"x must be 2-D [M, Cp] with Cp >= cols = {cols}, got shape {tuple(x.shape)}")
    if row_map.dtype != torch.int32 or row_map.dim() != 1 or not row_map.is_contiguous() or row_map.numel() == 0:
        raise ValueError("row_map must be a non-empty contiguous 1-D int32 tensor")
    period = row_map.numel()
    if out_rows < images * period or images * src_rows > x.shape[0]:
        raise ValueError(f"{images} images of {src_rows} rows gathered into {period} rows each do not fit "
                         f"x [{x.shape[0]}, ...] -> [{out_rows}, ...]")
    return _layernorm(x, weight, bias, eps, inv_scale, images * period, cols, out_rows, out_dtype, out, row_map,
                      period, src_rows, None, None)


def _layernorm(x, weight, bias, eps, inv_scale, rows, cols, out_rows, out_dtype, out, row_map, period, src_rows,
               block_m, num_warps) -> torch.Tensor:
    _check_triton(x, weight, inv_scale, *([bias] if bias is not None else []))
    fp8 = _is_fp8(out_dtype)
    cp = x.shape[1]
    if any(t is not None and (t.numel() != cols or not t.is_contiguous()) for t in (weight, bias)):
        raise ValueError(f"weight and bias must be contiguous with {cols} elements")
    _check_scale(inv_scale, x.device)
    out = _output(out, out_rows, cp, out_dtype, x.device)
    if out_rows == 0:
        return out
    block_c1, block_c2 = _row_chunks(cp)
    if block_m is None and num_warps is None and out_rows >= _LN_BIG_ROWS and cp <= 1024:
        # measured on the H200 (benchmarks/speed_probe.py, 50432 x 768): 2 rows per program, one warp
        # each: 42 us against 54 us for 8 rows / 4 warps (a copy of the same bytes: 29 us); narrower
        # rows keep the same elements per warp (Swin: 96-wide rows, 16 per program)
        block_m, num_warps = max(2, 1 << max(0, (1536 // cp).bit_length() - 1)), 1
    if block_m is None:  # (block_m, num_warps: tuning knobs for benchmarks/speed_probe.py)
        block_m = 1 << max(0, (_LN_ELEMS // cp).bit_length() - 1)  # largest power of 2 <= elems / cp, >= 1
        while block_m > 1 and out_rows < _MIN_PROGRAMS * block_m:
            block_m //= 2
    grid = (triton.cdiv(out_rows, block_m),)
    _layernorm_quant_kernel[grid](
        x, weight, bias if bias is not None else weight, inv_scale, out, row_map if row_map is not None else inv_scale,
        rows, cols, float(cols), out_rows, cp, x.stride(0), x.stride(1), out.stride(0), eps, period, src_rows,
        HAS_BIAS=bias is not None, FP8=fp8, HAS_MAP=row_map is not None, BLOCK_M=block_m, BLOCK_C1=block_c1,
        BLOCK_C2=block_c2, num_warps=num_warps or (4 if cp <= 8192 else 8 if cp <= 16384 else 16))
    return out


def quantize_heads(o: torch.Tensor, inv_scale: torch.Tensor, rows_out: int, cols_out: int,
                   out_dtype: torch.dtype = torch.int8, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [B, H, N, D] (any strides) -> [rows_out, cols_out] codes with
    ``out[b*N + n, h*D + d] = quant(o[b, h, n, d])`` and zero padding.

    Fuses the head merge (``transpose(1, 2).reshape(B*N, H*D)``), the quantization and the
    zero-padding to the GEMM alignment into one pass that reads ``o`` once in its own layout.
    """
    _check_triton(o, inv_scale)
    fp8 = _is_fp8(out_dtype)
    if o.dim() != 4:
        raise ValueError(f"o must be 4-D [B, H, N, D], got shape {tuple(o.shape)}")
    bsz, heads, n_tok, hd = o.shape
    if rows_out < bsz * n_tok or cols_out < heads * hd:
        raise ValueError(f"output [{rows_out}, {cols_out}] is smaller than [B*N, H*D] = [{bsz * n_tok}, {heads * hd}]")
    _check_scale(inv_scale, o.device)
    out = _output(out, rows_out, cols_out, out_dtype, o.device)
    if rows_out == 0 or cols_out == 0:
        return out
    block_c = min(_HEADS_TILE[1], triton.next_power_of_2(cols_out))
    block_m = min(_HEADS_TILE[0] * _HEADS_TILE[1] // block_c, triton.next_power_of_2(rows_out))
    grid = (triton.cdiv(rows_out, block_m), triton.cdiv(cols_out, block_c))
    _quantize_heads_kernel[grid](
        o, inv_scale, out, max(n_tok, 1), bsz, heads, rows_out, cols_out,
        o.stride(0), o.stride(1), o.stride(2), o.stride(3), out.stride(0),
        D=max(hd, 1), FP8=fp8, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return out


def quantize_pad(x: torch.Tensor, inv_scale: torch.Tensor, rows_out: int, cols_out: int,
                 out_dtype: torch.dtype = torch.int8, out: torch.Tensor | None = None) -> torch.Tensor:
    """[M, C] (any strides) -> [rows_out, cols_out] codes, zero-padded: quantize and pad in one pass.

    The head-merge kernel with B = M, H = N = 1, D = C (same loads, the index split folds away).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, C], got shape {tuple(x.shape)}")
    return quantize_heads(x[:, None, None, :], inv_scale, rows_out, cols_out, out_dtype=out_dtype, out=out)


def assemble_tokens(tokens: torch.Tensor, prefix: torch.Tensor | None, pos: torch.Tensor, rows_out: int,
                    cols_out: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """A ViT's input to its first block, padded: ``cat([prefix tokens, patch tokens]) + pos_embed`` for
    every image, written as [rows_out, cols_out] (``tokens``' dtype) with zero padding, in one pass.

    ``tokens`` [B, T, C] (patch embeddings, unit column stride), ``prefix`` [P, C] (class / distillation
    tokens, or None), ``pos`` [P + T, C]. Replaces timm's concat, the position add and the row padding
    of the fused blocks (three passes over the activations) with one.
    """
    _check_triton(tokens, pos)
    if tokens.dim() != 3 or tokens.stride(2) != 1:
        raise ValueError(f"tokens must be [B, T, C] with unit column stride, got {tuple(tokens.shape)}")
    bsz, n_patch, c = tokens.shape
    n_prefix = 0 if prefix is None else prefix.shape[0]
    n_tok = n_prefix + n_patch
    if tuple(pos.shape) != (n_tok, c) or not pos.is_contiguous():
        raise ValueError(f"pos must be a contiguous [{n_tok}, {c}] tensor, got {tuple(pos.shape)}")
    if prefix is not None and (tuple(prefix.shape) != (n_prefix, c) or not prefix.is_contiguous()):
        raise ValueError(f"prefix must be a contiguous [P, {c}] tensor, got {tuple(prefix.shape)}")
    if rows_out < bsz * n_tok or cols_out < c:
        raise ValueError(f"output [{rows_out}, {cols_out}] is smaller than [B*N, C] = [{bsz * n_tok}, {c}]")
    out = _output(out, rows_out, cols_out, tokens.dtype, tokens.device)
    if rows_out == 0:
        return out
    block_c = min(256, triton.next_power_of_2(cols_out))
    block_m = min(16 * 256 // block_c, triton.next_power_of_2(rows_out))
    grid = (triton.cdiv(rows_out, block_m), triton.cdiv(cols_out, block_c))
    _assemble_tokens_kernel[grid](
        tokens, prefix if prefix is not None else pos, pos, out, max(n_tok, 1), n_prefix, bsz, c, rows_out, cols_out,
        tokens.stride(0), tokens.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
    return out


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, row_map: torch.Tensor, inv_scale: torch.Tensor,
                     out: torch.Tensor, *, images: int, window_tokens: int, heads: int, head_dim: int, scale: float,
                     src_rows: int, num_warps: int = 4) -> torch.Tensor:
    """Swin's (shifted-)window attention on the qkv GEMM's output, written as the proj GEMM's codes.

    ``qkv`` [>= images * L, >= 3 * heads * head_dim] (bf16, rows in window order: window ``w`` is rows
    ``w*N .. w*N + N``, N = ``window_tokens``, L = ``len(row_map)`` = windows per image * N); ``bias``
    [windows per image (or 1: shared), heads, BN, BN] (BN = N rounded up to a power of two >= 16): the
    relative-position bias plus the shift mask, -inf in padding keys; ``row_map``: the token each
    window row came from (< 0: padding); ``out`` [>= images * src_rows, >= heads * head_dim] int8/fp8:
    row ``image * src_rows + row_map[j]`` gets that token's attention output quantized with
    ``inv_scale``; rows the map never names are not written. Replaces timm's window partition and
    reverse, cyclic shifts, two batched matmuls, softmax, head merge and quantization: one read of
    q/k/v, one write of the codes.
    """
    _check_triton(qkv, bias, row_map, inv_scale, out)
    fp8 = _is_fp8(out.dtype)
    _check_scale(inv_scale, qkv.device)
    n, period = window_tokens, row_map.numel()
    if row_map.dtype != torch.int32 or row_map.dim() != 1 or not row_map.is_contiguous():
        raise ValueError("row_map must be a contiguous 1-D int32 tensor")
    if n <= 0 or period % n:
        raise ValueError(f"row_map ({period} rows) is not a whole number of {n}-token windows")
    win_per_img = period // n
    if (bias.dim() != 4 or bias.shape[0] not in (1, win_per_img) or bias.shape[1] != heads
            or bias.shape[2] != bias.shape[3] or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [1 or {win_per_img}, {heads}, BN, BN] tensor, "
                         f"got {tuple(bias.shape)}")
    bn = bias.shape[2]
    if bn < max(16, n) or bn & (bn - 1) or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"window of {n} tokens padded to {bn}, head_dim {head_dim}: need BN a power of two >= "
                         "max(16, N) and head_dim a power of two >= 16")
    width = heads * head_dim
    if qkv.shape[0] < images * period or qkv.shape[1] < 3 * width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [>= {images * period}, >= {3 * width}] with unit column stride, "
                         f"got {tuple(qkv.shape)}")
    if out.shape[0] < images * src_rows or out.shape[1] < width or out.stride(1) != 1:
        raise ValueError(f"out must be [>= {images * src_rows}, >= {width}] with unit column stride, "
                         f"got {tuple(out.shape)}")
    grid = (images * win_per_img, heads)
    if grid[0] == 0:
        return out
    _window_attention_kernel[grid](
        qkv, bias, row_map, inv_scale, out, win_per_img, bias.shape[0], heads, width, src_rows,
        qkv.stride(0), out.stride(0), float(scale), N=n, BN=bn, D=head_dim, FP8=fp8, F32_DOT=_interpreted(),
        num_warps=num_warps)
    return out
