"""The Triton glue kernels (``gpusq.deploy.kernels``) checked on CPU under Triton's interpreter.

Why a subprocess: Triton decides between compiling and interpreting when a kernel is defined, from
``TRITON_INTERPRET``; setting it inside this pytest process would also switch any other Triton
code imported here. So one worker process (this file run as a script with TRITON_INTERPRET=1) runs
every case once and reports per case; the tests below read its report. The same worker runs the
kernels compiled on a GPU: ``python tests/test_kernels_interpret.py --worker --device cuda``.

Tolerances: pointwise quantization (``quantize_heads`` / ``quantize_pad``) must match torch exactly.
After a LayerNorm the kernel's float32 sums differ from torch's in the last bits, so an int8 code may
differ by 1 where ``y * inv_scale`` is within 1e-3 of a half-integer, on at most 0.1% of elements.
The interpreter's float -> e4m3 conversion is not round-to-nearest-even everywhere (see ``_fp8_trusted``);
under it, fp8 is compared exactly on values on the e4m3 grid and, for other values, where that
conversion is right. Compiled on Hopper the conversion is ``cvt.rn.satfinite`` and is compared everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the kernels need it)")

NAN = float("nan")
EPS = 1e-5


# ---------------------------------------------------------------- helpers (run in the worker)

def _int8_ref(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(v), -128, 127)


def _check_int8(q: torch.Tensor, v: torch.Tensor, exact: bool) -> None:
    """q: kernel codes for the valid region; v: float32 reference of y * inv_scale (before rounding)."""
    assert q.dtype == torch.int8 and q.shape == v.shape, (q.dtype, q.shape, v.shape)
    ref = _int8_ref(v)
    diff = (q.float() - ref).abs()
    bad = diff > 0
    if exact:
        assert not bad.any(), f"{int(bad.sum())} codes differ: got {q[bad][:5].tolist()}, want {ref[bad][:5].tolist()}"
        return
    near_half = ((v - v.floor()) - 0.5).abs() < 1e-3
    assert diff.max() <= 1, f"a code differs by {diff.max().item()}"
    assert not (bad & ~near_half).any(), f"codes differ away from a half-integer: v={v[bad & ~near_half][:5].tolist()}"
    assert bad.sum() <= 0.001 * q.numel(), f"{int(bad.sum())} of {q.numel()} codes differ"


def _fp8_ordinal(t: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes -> integers in value order (adjacent values differ by 1)."""
    b = t.view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    return torch.where(b >= 128, -mag, mag)


def _fp8_trusted(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where the interpreter's float -> e4m3 conversion (Triton 3.8, numpy) is right: it truncates
    subnormals and loses the carry when rounding up reaches the next power of two (1.96 -> 1.0).
    So: normal range, and the correctly rounded value in the same binade as the input."""
    a = v.abs()
    same_binade = torch.floor(torch.log2(a)) == torch.floor(torch.log2(ref.float().abs()))
    return (a >= 2.0 ** -6) & same_binade


def _check_fp8(q: torch.Tensor, v: torch.Tensor, interpreted: bool, exact: bool) -> None:
    """q: kernel fp8 codes for the valid region; v: float32 reference of y * inv_scale (unclamped)."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == v.shape, (q.dtype, q.shape, v.shape)
    vc = torch.clamp(v, -448.0, 448.0)
    ref = vc.to(torch.float8_e4m3fn)
    keep = torch.ones_like(vc, dtype=torch.bool)
    if interpreted:
        keep = _fp8_trusted(vc, ref)
        assert keep.float().mean() > 0.5, "too few values where the interpreter's fp8 conversion can be trusted"
    diff = (_fp8_ordinal(q) - _fp8_ordinal(ref)).abs()[keep]
    if exact:
        assert (diff == 0).all(), f"{int((diff > 0).sum())} fp8 codes differ (max {diff.max().item()} steps)"
    else:
        assert diff.max() <= 1 and (diff > 0).sum() <= 0.001 * diff.numel(), f"{int((diff > 0).sum())} fp8 codes differ"


def _zero_outside(q: torch.Tensor, rows: int, cols: int) -> None:
    b = q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q
    assert (b[rows:] == 0).all() and (b[:, cols:] == 0).all(), "padding is not exactly zero"


def _ln_input(mp: int, cp: int, rows: int, cols: int, dtype: torch.dtype, dev: str) -> torch.Tensor:
    """[mp, cp] with NaN/inf everywhere outside [:rows, :cols]: any read of the padding shows."""
    x = torch.full((mp, cp), NAN, dtype=dtype)
    x[:, cols:cols + 1] = float("inf")
    x[:rows, :cols] = (torch.randn(rows, cols) * 2 + 0.5).to(dtype)
    return x.to(dev)


def _ln_ref(x: torch.Tensor, w, b, rows: int, cols: int, inv: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x[:rows, :cols].float().cpu(), (cols,), w, b, EPS) * inv


# ---------------------------------------------------------------- cases (run in the worker)

def case_layernorm_int8_awkward(K, dev, interpreted):
    """rows=37 of 64, cols=100 of 128, bf16, NaN/inf padding; one row per program and many."""
    torch.manual_seed(0)
    mp, cp, rows, cols, inv = 64, 128, 37, 100, 40.0
    x = _ln_input(mp, cp, rows, cols, torch.bfloat16, dev)
    w, b = torch.rand(cols) + 0.5, torch.randn(cols) * 0.2
    v = _ln_ref(x, w, b, rows, cols, inv)
    for min_programs in (K._MIN_PROGRAMS, 1):  # 1: 32 rows per program, valid and padding rows mixed
        saved, K._MIN_PROGRAMS = K._MIN_PROGRAMS, min_programs
        try:
            q = K.layernorm_quant(x, w.to(dev), b.to(dev), EPS, torch.tensor(inv, device=dev), rows, cols)
        finally:
            K._MIN_PROGRAMS = saved
        q = q.cpu()
        assert q.shape == (mp, cp) and q.dtype == torch.int8
        _zero_outside(q, rows, cols)
        _check_int8(q[:rows, :cols], v, exact=False)
        assert (q == 127).any() and (q == -128).any(), "saturation not exercised"
        assert (_int8_ref(v) == 127).any() and (_int8_ref(v) == -128).any()


def case_layernorm_int8_c192(K, dev, interpreted):
    """C=192 (two chunks 128 + 64), fp32 and fp16 inputs, no bias, rows=45 of 48."""
    torch.manual_seed(1)
    mp, cp, rows, cols, inv = 48, 192, 45, 192, 25.0
    w = torch.rand(cols) + 0.5
    for dtype in (torch.float32, torch.float16):
        x = _ln_input(mp, cp, rows, cols, dtype, dev)
        q = K.layernorm_quant(x, w.to(dev), None, EPS, torch.tensor(inv, device=dev), rows, cols).cpu()
        _zero_outside(q, rows, cols)
        _check_int8(q[:rows, :cols], _ln_ref(x, w, None, rows, cols, inv), exact=False)


def case_layernorm_int8_c768_padded(K, dev, interpreted):
    """cols=760 of Cp=768 (chunks 512 + 256), 8 rows per program, last program partly padding."""
    torch.manual_seed(2)
    mp, cp, rows, cols, inv = 40, 768, 35, 760, 30.0
    x = _ln_input(mp, cp, rows, cols, torch.bfloat16, dev)
    w, b = torch.rand(cols) + 0.5, torch.randn(cols) * 0.2
    saved, K._MIN_PROGRAMS = K._MIN_PROGRAMS, 1
    try:
        q = K.layernorm_quant(x, w.to(dev), b.to(dev), EPS, torch.tensor(inv, device=dev), rows, cols).cpu()
    finally:
        K._MIN_PROGRAMS = saved
    _zero_outside(q, rows, cols)
    _check_int8(q[:rows, :cols], _ln_ref(x, w, b, rows, cols, inv), exact=False)


def case_layernorm_fp8(K, dev, interpreted):
    """fp8 output after LayerNorm, awkward shape, saturation at 448."""
    torch.manual_seed(3)
    mp, cp, rows, cols, inv = 64, 128, 37, 100, 200.0
    x = _ln_input(mp, cp, rows, cols, torch.bfloat16, dev)
    w, b = torch.rand(cols) + 0.5, torch.randn(cols) * 0.2
    q = K.layernorm_quant(x, w.to(dev), b.to(dev), EPS, torch.tensor(inv, device=dev), rows, cols,
                          out_dtype=torch.float8_e4m3fn).cpu()
    assert q.shape == (mp, cp) and q.dtype == torch.float8_e4m3fn
    _zero_outside(q, rows, cols)
    v = _ln_ref(x, w, b, rows, cols, inv)
    _check_fp8(q[:rows, :cols], v, interpreted, exact=False)
    assert (q.float() == 448).any() and (q.float() == -448).any() and (v.abs() > 448).any(), "saturation not exercised"


def case_heads_int8_noncontiguous(K, dev, interpreted):
    """[B, H, N, D] viewed from [B, N, H, D] (SDPA's layout), D=24, padded output; exact match."""
    torch.manual_seed(4)
    bsz, heads, n, d, inv = 3, 4, 13, 24, 50.0
    o = torch.randn(bsz, n, heads, d).transpose(1, 2)
    assert not o.is_contiguous()
    ref = o.transpose(1, 2).reshape(bsz * n, heads * d) * inv
    for dtype in (torch.float32, torch.bfloat16):
        od = o.to(dtype)
        q = K.quantize_heads(od.to(dev), torch.tensor(inv, device=dev), 48, 112).cpu()
        assert q.shape == (48, 112) and q.dtype == torch.int8
        _zero_outside(q, bsz * n, heads * d)
        _check_int8(q[:bsz * n, :heads * d], od.float().transpose(1, 2).reshape(bsz * n, -1) * inv, exact=True)
    assert (_int8_ref(ref) == 127).any() and (_int8_ref(ref) == -128).any()


def case_heads_int8_contiguous(K, dev, interpreted):
    """Contiguous [B, H, N, D] (heads far apart in memory), output not padded."""
    torch.manual_seed(5)
    bsz, heads, n, d, inv = 2, 3, 50, 64, 20.0
    o = torch.randn(bsz, heads, n, d).to(torch.bfloat16)
    q = K.quantize_heads(o.to(dev), torch.tensor(inv, device=dev), bsz * n, heads * d).cpu()
    _check_int8(q, o.float().transpose(1, 2).reshape(bsz * n, heads * d) * inv, exact=True)


def case_heads_fp8(K, dev, interpreted):
    """fp8 head merge on values spanning the e4m3 range (subnormals to saturation)."""
    torch.manual_seed(6)
    bsz, heads, n, d, inv = 2, 2, 9, 32, 4.0
    o = torch.randn(bsz, n, heads, d) * torch.exp2(torch.empty(bsz, n, heads, d).uniform_(-8, 8))
    o = o.transpose(1, 2)
    q = K.quantize_heads(o.to(dev), torch.tensor(inv, device=dev), 24, 80, out_dtype=torch.float8_e4m3fn).cpu()
    _zero_outside(q, bsz * n, heads * d)
    v = o.transpose(1, 2).reshape(bsz * n, heads * d) * inv
    _check_fp8(q[:bsz * n, :heads * d], v, interpreted, exact=True)
    assert (v.abs() > 448).any() and (q.float().abs() == 448).any()


def case_fp8_grid_exact(K, dev, interpreted):
    """Values already on the e4m3 grid (subnormals, zero, 448) and beyond it: exact even interpreted."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # +0 ... 448
    vals = torch.cat([grid, -grid[1:], torch.tensor([449.0, 1e4, -500.0, -1e30])])
    inv = 0.5
    big = torch.full((9, 70), NAN)
    x = big[:, 3:3 + 36]  # [9, 36] strided view inside NaNs
    x.copy_(torch.cat([vals, vals[: 9 * 36 - vals.numel()]]).reshape(9, 36) / inv)
    q = K.quantize_pad(x.to(dev), torch.tensor(inv, device=dev), 16, 48,
                       out_dtype=torch.float8_e4m3fn).cpu()
    _zero_outside(q, 9, 36)
    ref = torch.clamp(x * inv, -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q[:9, :36].view(torch.uint8), ref.view(torch.uint8)), "fp8 codes on the grid differ"


def case_pad_int8_ties_strided(K, dev, interpreted):
    """Half-integers round to even, saturation, strided and transposed inputs inside NaN."""
    inv = 4.0
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, -128.5, 3.49, -3.51, 1e6, -1e6])
    for transpose in (False, True):
        big = torch.full((40, 40), NAN)
        x = big[2:2 + 7, 5:5 + 11] if not transpose else big[5:5 + 11, 2:2 + 7].t()
        x.copy_(torch.cat([ties, torch.randn(77 - ties.numel()) * 30]).reshape(7, 11) / inv)
        q = K.quantize_pad(x.to(dev), torch.tensor(inv, device=dev), 8, 16).cpu()
        _zero_outside(q, 7, 11)
        _check_int8(q[:7, :11], x * inv, exact=True)
        assert q[0, :10].tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, -128]


def case_assemble_tokens(K, dev, interpreted):
    """cat(prefix tokens, patches) + pos, padded: exactly timm's bf16 concat and add, padding zero."""
    torch.manual_seed(8)
    b, t, c, p = 3, 5, 70, 2
    tokens = torch.randn(b, t, c + 6).to(torch.bfloat16)[:, :, :c]  # unit column stride, padded rows
    prefix, pos = torch.randn(p, c).to(torch.bfloat16), torch.randn(p + t, c).to(torch.bfloat16)

    def bf16(v: torch.Tensor) -> torch.Tensor:
        """float32 sum -> bf16 as the kernel rounds it: to nearest even compiled (torch's bf16 add does
        the same); the interpreter truncates (Triton 3.8), so compare with truncation there."""
        if interpreted:
            return (v.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        return v.to(torch.bfloat16)

    out = K.assemble_tokens(tokens.to(dev), prefix.to(dev), pos.to(dev), 32, 96).cpu()
    ref = torch.cat([prefix[None].expand(b, -1, -1), tokens], 1).float() + pos[None].float()
    assert out.dtype == torch.bfloat16 and out.shape == (32, 96)
    assert torch.equal(out[: b * (p + t), :c], bf16(ref.reshape(b * (p + t), c)))
    assert not out[b * (p + t):].float().any() and not out[:, c:].float().any()
    out = K.assemble_tokens(tokens.to(dev), None, pos[:t].contiguous().to(dev), 16, 70).cpu()  # no prefix
    assert torch.equal(out[: b * t], bf16((tokens.float() + pos[:t][None].float()).reshape(b * t, c)))


def case_out_given(K, dev, interpreted):
    """out= is written in place, padding included (it starts as garbage)."""
    torch.manual_seed(7)
    mp, cp, rows, cols, inv = 16, 64, 13, 50, 30.0
    x = _ln_input(mp, cp, rows, cols, torch.bfloat16, dev)
    w, b = torch.rand(cols) + 0.5, torch.randn(cols) * 0.2
    for dtype in (torch.int8, torch.float8_e4m3fn):
        out = torch.full((mp, cp), 77, dtype=torch.uint8).view(dtype).to(dev)
        res = K.layernorm_quant(x, w.to(dev), b.to(dev), EPS, torch.tensor(inv, device=dev), rows, cols,
                                out_dtype=dtype, out=out)
        assert res.data_ptr() == out.data_ptr()
        _zero_outside(out.cpu(), rows, cols)
        v = _ln_ref(x, w, b, rows, cols, inv)
        if dtype == torch.int8:
            _check_int8(out.cpu()[:rows, :cols], v, exact=False)
        else:
            _check_fp8(out.cpu()[:rows, :cols], v, interpreted, exact=False)
    o = torch.randn(2, 3, 5, 8).transpose(1, 2)  # [B, H, N, D] = [2, 5, 3, 8]
    out = torch.full((16, 48), 77, dtype=torch.int8, device=dev)
    res = K.quantize_heads(o.to(dev), torch.tensor(inv, device=dev), 16, 48, out=out)
    assert res.data_ptr() == out.data_ptr()
    _zero_outside(out.cpu(), 6, 40)
    _check_int8(out.cpu()[:6, :40], o.transpose(1, 2).reshape(6, 40) * inv, exact=True)


def _gather_rows(row_map: torch.Tensor, images: int, src_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row of each gathered row, whether it is a real token) for ``images`` images."""
    src = (torch.arange(images)[:, None] * src_rows + row_map.long()[None]).reshape(-1)
    return src.clamp(min=0), (row_map >= 0).repeat(images)


def case_layernorm_gather_swin_order(K, dev, interpreted):
    """Rows read in Swin's shifted, padded window order (10 x 9 tokens, window 4, shift 2): gathered
    rows are the LayerNorm codes of their source rows, padding windows and rows zero."""
    from gpusq.deploy.swin import window_row_map

    torch.manual_seed(9)
    h, w, images, cols, inv = 10, 9, 2, 96, 30.0
    rmap = window_row_map(h, w, (4, 4), (2, 2))
    assert rmap.numel() == 12 * 12 and int((rmap >= 0).sum()) == h * w
    assert sorted(rmap[rmap >= 0].tolist()) == list(range(h * w))  # every token exactly once
    x = _ln_input(images * h * w + 12, cols, images * h * w, cols, torch.bfloat16, dev)
    wt, b = torch.rand(cols) + 0.5, torch.randn(cols) * 0.2
    out_rows = images * rmap.numel() + 32
    q = K.layernorm_quant_gather(x, wt.to(dev), b.to(dev), EPS, torch.tensor(inv, device=dev), cols,
                                 rmap.to(dev), images, h * w, out_rows).cpu()
    assert q.shape == (out_rows, cols) and q.dtype == torch.int8
    src, valid = _gather_rows(rmap, images, h * w)
    v = torch.nn.functional.layer_norm(x.cpu()[src].float(), (cols,), wt, b, EPS) * inv
    _check_int8(q[: valid.numel()][valid], v[valid], exact=False)
    assert not q[: valid.numel()][~valid].any() and not q[valid.numel():].any()


def _window_attention_ref(qkv, table, rmap, inv, images, n, heads, hd, scale, src_rows, out_rows):
    """float32 reference with the kernel's rounding of P to bf16 before the second product."""
    nw = rmap.numel() // n
    width = heads * hd
    t = qkv[: images * nw * n, : 3 * width].float().reshape(images * nw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = t.unbind(0)
    bidx = torch.arange(images * nw) % table.shape[0]
    s = q @ k.transpose(-1, -2) * scale + table[bidx][:, :, :n, :n].float()
    p = torch.exp(s - s.amax(-1, keepdim=True))
    o = (p.to(torch.bfloat16).float() @ v) / p.sum(-1, keepdim=True)
    o = o.transpose(1, 2).reshape(images * nw * n, width)
    src, valid = _gather_rows(rmap, images, src_rows)
    ref = torch.full((out_rows, width), NAN)
    ref[src[valid]] = o[valid] * inv
    return ref


def case_window_attention_shifted_padded(K, dev, interpreted):
    """Shifted windows with padding (10 x 9 tokens, window 4 -> 16 tokens, shift 2) and unshifted 7x7
    windows (49 tokens padded to 64, one shared bias): codes in each token's own row, within one code
    of the reference where P's bf16 rounding and the sums' order can move a half-integer."""
    from gpusq.deploy.swin import bias_table, shift_mask, window_row_map

    torch.manual_seed(10)
    for h, w, win, shift, heads, hd in ((10, 9, (4, 4), (2, 2), 2, 16), (7, 14, (7, 7), (0, 0), 3, 32)):
        images, inv, n = 2, 12.0, win[0] * win[1]
        bn = max(16, 1 << (n - 1).bit_length())
        rmap = window_row_map(h, w, win, shift)
        rel = torch.randn(heads, n, n)
        mask = shift_mask(h, w, win, shift)
        table = bias_table(rel, mask, bn)
        rows = images * rmap.numel()
        qkv = (torch.randn(rows + 5, 3 * heads * hd) * 2).to(torch.bfloat16)
        out_rows = images * h * w + 3
        out = torch.full((out_rows, heads * hd), 55, dtype=torch.int8)
        scale = hd ** -0.5
        res = K.window_attention(qkv.to(dev), table.to(dev), rmap.to(dev), torch.tensor(inv, device=dev), out.to(dev),
                                 images=images, window_tokens=n, heads=heads, head_dim=hd, scale=scale,
                                 src_rows=h * w).cpu()
        ref = _window_attention_ref(qkv, table, rmap, inv, images, n, heads, hd, scale, h * w, out_rows)
        m = images * h * w
        diff = (res[:m].float() - _int8_ref(ref[:m])).abs()
        # (the interpreter truncates P to bf16 where the GPU rounds it: more codes one off there)
        limit = 0.03 if interpreted else 0.01
        assert diff.max() <= 1 and (diff > 0).float().mean() < limit, (win, diff.max(), (diff > 0).float().mean())
        assert (res[m:] == 55).all(), "rows outside the tokens were written"
        if mask is not None:  # the mask matters: without it the codes change
            plain = _window_attention_ref(qkv, bias_table(rel, None, bn), rmap, inv, images, n, heads, hd, scale,
                                          h * w, out_rows)
            assert (_int8_ref(plain[:m]) - res[:m].float()).abs().max() > 2


def case_bad_arguments(K, dev, interpreted):
    """Wrong out shape / dtype, scale dtype and sizes raise ValueError (no silent garbage)."""
    x = torch.randn(8, 16, device=dev)
    inv = torch.tensor(2.0, device=dev)
    w = torch.ones(16, device=dev)
    calls = [
        lambda: K.quantize_pad(x, inv, 8, 16, out=torch.empty(8, 15, dtype=torch.int8, device=dev)),
        lambda: K.quantize_pad(x, inv, 8, 16, out=torch.empty(8, 16, dtype=torch.uint8, device=dev)),
        lambda: K.quantize_pad(x, inv.double(), 8, 16),
        lambda: K.quantize_pad(x, inv, 7, 16),
        lambda: K.quantize_pad(x, inv, 8, 16, out_dtype=torch.float16),
        lambda: K.layernorm_quant(x, w, None, EPS, inv, 9, 16),
        lambda: K.layernorm_quant(x, w[:15], None, EPS, inv, 8, 16),
        lambda: K.quantize_heads(x, inv, 8, 16),
    ]
    for i, call in enumerate(calls):
        try:
            call()
        except ValueError:
            continue
        raise AssertionError(f"bad call #{i} did not raise ValueError")


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def _worker(device: str) -> dict[str, str | None]:
    """Run every case; name -> None (passed) or the failure's traceback."""
    import gpusq.deploy.kernels as K

    interpreted = type(K._quantize_heads_kernel).__name__ == "InterpretedFunction"
    results = {}
    for name, fn in CASES.items():
        try:
            fn(K, device, interpreted)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


# ---------------------------------------------------------------- tests (pytest process)

@pytest.fixture(scope="module")
def worker_results() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"kernel worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_case(worker_results, case):
    err = worker_results.get(case, "case did not run")
    assert err is None, err


def test_import_without_triton():
    """The module imports with triton unavailable; the functions then raise RuntimeError."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, gpusq.deploy.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "try:\n"
        "    K.quantize_pad(torch.zeros(2, 2), torch.tensor(1.0), 2, 2)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter switched on")
def test_cpu_tensors_need_cuda_or_interpreter():
    """Compiled (not interpreted), CPU tensors are refused with a clear error, not a Triton crash."""
    import gpusq.deploy.kernels as K

    with pytest.raises(RuntimeError, match="CUDA"):
        K.quantize_pad(torch.zeros(4, 4), torch.tensor(1.0), 4, 4)


if __name__ == "__main__" and "--worker" in sys.argv:
    dev = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    res = _worker(dev)
    print("RESULTS " + json.dumps(res))
    for k, v in res.items():
        print(f"{k}: {'ok' if v is None else 'FAILED'}", file=sys.stderr)
