"""GPU tests of the fused path: each fused kernel against its unfused reference on awkward shapes
(rows not a multiple of 32, N and K not multiples of 64), and CUDA-graph capture of fused models.

Run on the device machine: ``python -m pytest -m gpu tests/gpu -q -s`` (nvmath-python installed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _need_nvmath():
    from gpusq.deploy import cslt

    if not cslt.available():
        pytest.skip("nvmath-python is not installed (the gpu extra)")


def _problem(m=100, k=200, n=70, seed=0):
    from gpusq.deploy.cusparselt import round_up
    from gpusq.sparsity import mask_2to4

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), device="cuda", generator=g).float()
    w = w * mask_2to4(w)
    mp, kp = round_up(m), round_up(k)
    x = torch.randint(-128, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    x = F.pad(x, (0, kp - k, 0, mp - m)).contiguous()
    alpha = torch.rand(n, device="cuda", generator=g) * 2e-4 + 1e-5
    bias = torch.randn(n, device="cuda", generator=g)
    return w, x, alpha, bias, m


@pytest.mark.parametrize("case", ["bf16+bias", "bf16+bias+residual", "int8+gelu", "bf16 no bias"])
def test_sparse_gemm_epilogues(case):
    """M=100 (128 rows), K=200 (224), N=70 (96): every epilogue against the float64 reference."""
    _need_nvmath()
    from gpusq.deploy.cslt import SparseGemm, reference

    w, x, alpha, bias, m = _problem()
    res = "residual" in case
    gelu = "gelu" in case
    b = None if "no bias" in case else bias
    out = "int8" if gelu else "bf16"
    y0 = (x[:m, : w.shape[1]].double() @ w.double().t()) * alpha.double()
    scale = 1.0 / float(y0.abs().max() / 127 * 0.6) if gelu else None
    g = SparseGemm(w, alpha, b, out=out, gelu=gelu, gelu_scale=scale, residual=res, name=case)
    c = torch.randn(x.shape[0], g.np_, device="cuda").to(torch.bfloat16) if res else None
    y = g(x, c)  # prepares (searches) on first use
    y = g(x, c)
    torch.cuda.synchronize()
    pad = lambda v: None if v is None else F.pad(v, (0, g.np_ - g.n))  # noqa: E731
    ref = reference(x, F.pad(w, (0, g.kp - g.k, 0, g.np_ - g.n)), pad(alpha), pad(b), gelu=gelu, gelu_scale=scale,
                    residual=c, out=out)
    y, ref = y[:m, : g.n], ref[:m, : g.n]
    if out == "int8":
        same = float((y.double() == ref).double().mean())
        worst = float((y.double() - ref).abs().max())
        sat = float((y.abs() >= 127).double().mean())
        print(f"CORRECTNESS SparseGemm {case}: int8 codes equal {same:.5f}, max diff {worst:.0f} code, "
              f"saturated {sat:.4f}, alg {g.report()}")
        assert worst <= 1 and same >= 0.999 and sat > 0
    else:
        err = rel_err(y, ref)
        print(f"CORRECTNESS SparseGemm {case}: rel err {err:.2e}, alg {g.report()}")
        assert err < 1e-2


def test_sparse_gemm_in_a_cuda_graph():
    _need_nvmath()
    from gpusq.deploy.cslt import SparseGemm

    w, x, alpha, bias, m = _problem(m=224, k=768, n=2304, seed=1)
    g = SparseGemm(w, alpha, bias, name="graph")
    eager = g(x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = g(x)
    x.copy_(torch.randint_like(x, -128, 128))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, g(x)) == 0.0 and rel_err(y, eager) > 0.1  # replays on the new input


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float8_e4m3fn])
def test_glue_kernels_match_torch(out_dtype):
    """LayerNorm + quantize and heads + quantize (the Triton kernels) vs torch, padded outputs zero."""
    from gpusq.deploy.kernels import layernorm_quant, quantize_heads

    torch.manual_seed(0)
    rows, cols, mp, cp = 197, 200, 224, 224
    x = torch.randn(mp, cp, device="cuda").to(torch.bfloat16) * 3
    x[rows:] = float("nan")
    w, b = torch.randn(cols, device="cuda"), torch.randn(cols, device="cuda")
    inv = torch.tensor(40.0, device="cuda")
    y = layernorm_quant(x, w, b, 1e-6, inv, rows, cols, out_dtype=out_dtype)
    ref = F.layer_norm(x[:rows, :cols].float(), (cols,), w, b, 1e-6) * inv
    o = torch.randn(3, 70, 5, 40, device="cuda").to(torch.bfloat16).transpose(1, 2)  # [B, H, N, D], strided
    q = quantize_heads(o, inv / 10, 224, 224, out_dtype=out_dtype)
    qref = o.transpose(1, 2).reshape(210, 200).float() * (inv / 10)
    if out_dtype == torch.int8:
        ref, qref = (torch.clamp(torch.round(t), -128, 127) for t in (ref, qref))
        d = (y[:rows, :cols].double() - ref.double()).abs()
        assert float(d.max()) <= 1 and float((d > 0).double().mean()) < 1e-3
        assert float((y[:rows, :cols] == 127).double().mean()) > 0  # saturation exercised
        assert torch.equal(q[:210, :200].double(), qref.double())
    else:
        ref, qref = (torch.clamp(t, -448, 448).to(out_dtype) for t in (ref, qref))
        assert rel_err(y[:rows, :cols].float(), ref.float()) < 1e-2
        assert torch.equal(q[:210, :200].float(), qref.float())
    assert not y[rows:].float().any() and not y[:, cols:].float().any()
    assert not q[210:].float().any() and not q[:, 200:].float().any()
    print(f"CORRECTNESS glue kernels {out_dtype}: LN+quantize and heads+quantize match torch, padding zero")


def test_dense_fp8_gemm_selfcheck():
    from gpusq.deploy import cublaslt

    if not cublaslt.available():
        pytest.skip("nvmath-python is not installed (the gpu extra)")
    errs = cublaslt.selfcheck()
    print(f"CORRECTNESS DenseFp8Gemm (cuBLASLt epilogues): {errs}")
    for case, err in errs.items():
        assert err < (6e-2 if "fp8" in case else 1e-2), case


def test_fused_deit_capture_and_batches():
    """A fused DeiT (random init) at batch 1 and 3: graph replay equals the eager call, fused is used."""
    _need_nvmath()
    from test_deploy_gpu import compressed_model  # tests/gpu is on sys.path under pytest

    from gpusq.deploy import deploy

    fq, r, size = compressed_model("int8", img_size=32, patch_size=4, num_classes=10, depth=2, seed=4,
                                   embed_dim=200, num_heads=5)  # width 200: N, K not multiples of 64
    dm = deploy(fq, r, batch_sizes=(1, 3), fused=True)
    assert dm.fused == "fused"
    for b in (1, 3):
        x = torch.randn(b, *size, device="cuda")
        with torch.no_grad():
            a = dm(x).clone()
            e = dm._core(x)
            ref = fq(x)
        err = rel_err(a, ref)
        print(f"CORRECTNESS fused deit int8 width 200 batch {b} [random-init]: rel err vs fake-quant {err:.2e}")
        assert rel_err(a, e) < 1e-3 and err < 5e-2


def test_glue_kernel_cases_compiled():
    """Every case of tests/test_kernels_interpret.py, compiled for this GPU (fp8 compared everywhere)."""
    from tests.test_kernels_interpret import _worker

    res = _worker("cuda")
    bad = {k: v.strip().splitlines()[-1] for k, v in res.items() if v}
    print(f"CORRECTNESS glue kernel cases compiled on the GPU: {len(res) - len(bad)}/{len(res)} pass {bad or ''}")
    assert not bad


@pytest.mark.parametrize("mode", ["eager", "eagernc", "graphs"])
def test_hf_swin_runs_without_the_caching_allocator(mode):
    """The fused Hugging Face Swin test model (64x64) once faulted: cuSPARSELt's kernels read past the end of a
    small compressed weight (cusparselt.compress). Without the caching allocator's rounding the overread lands
    outside any allocation; the reproducer must now run in every mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _need_nvmath()
    repro = Path(__file__).resolve().parents[2] / "benchmarks" / "repro_hf_swin_fault.py"
    env = {**os.environ, **({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if mode.startswith("eager") else {})}
    r = subprocess.run([sys.executable, str(repro), mode, "up"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert f"{mode} up OK fused" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_compressed_weight_has_room_for_the_kernels_overread():
    from gpusq.deploy.cusparselt import OVERFETCH_BYTES, compress
    from gpusq.sparsity import mask_2to4

    w = torch.randint(-127, 128, (64, 64), device="cuda").float()
    w = (w * mask_2to4(w)).to(torch.int8)
    wc = compress(w)
    assert torch.equal(wc, torch._cslt_compress(w))
    assert wc.untyped_storage().nbytes() >= wc.numel() * wc.element_size() + OVERFETCH_BYTES
