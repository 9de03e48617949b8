"""CPU tests of gpusq.deploy / gpusq bench: imports, clear errors without a GPU, INT4 packing, the
weight codes handed to the kernels, and the bench's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from gpusq.deploy import layer_codes, pack_int4, unpack_int4
from gpusq.errors import GpusqError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")


def test_pack_unpack_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (7, 4, 10), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 4, 5)
    assert torch.equal(unpack_int4(packed), codes)
    # element 0 in the low nibble, element 1 in the high nibble, two's complement
    p = pack_int4(torch.tensor([[-1, 3, 7, -8]], dtype=torch.int8))
    assert p.tolist() == [[0x3F, 0x87]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[1, 2, 3]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))


def _layer(recipe: str):
    import timm

    from gpusq.layers import compressed_layers
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                          num_classes=10, depth=1)
    r = load_recipe(recipe)
    sparsify_(m, r.sparsity)
    quantize_(m, r.quant)
    x = torch.randn(4, 3, 32, 32)
    calibrate(m, lambda mm: mm(x))
    return compressed_layers(m)


@pytest.mark.parametrize("recipe,lo,hi", [("int8", -127, 127), ("int4", -7, 7)])
def test_layer_codes_reproduce_effective_weight(recipe, lo, hi):
    for name, layer in _layer(recipe).items():
        kind, codes, ws, s_in = layer_codes(layer)
        assert kind == "int8"
        assert torch.equal(codes, codes.round()) and codes.min() >= lo and codes.max() <= hi
        w = layer.effective_weight().detach().reshape(codes.shape[0], -1)
        torch.testing.assert_close(codes * ws[:, None], w, rtol=1e-6, atol=1e-7, msg=name)
        assert (codes.reshape(codes.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # still 2:4
        assert s_in is not None and s_in.ndim == 0 and s_in > 0


def test_layer_codes_fp8_exact():
    for layer in _layer("fp8").values():
        kind, codes, ws, _ = layer_codes(layer)
        assert kind == "fp8"
        assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)
        w = layer.effective_weight().detach().reshape(codes.shape[0], -1)
        torch.testing.assert_close(codes * ws[:, None], w, rtol=1e-6, atol=1e-7)


def test_layer_codes_rejects_unsupported_mix():
    from gpusq.layers import CompressedLinear
    from gpusq.quant import QuantSpec, set_quant_

    lin = CompressedLinear(8, 8)
    set_quant_(lin, QuantSpec("int8"), QuantSpec("int8"))  # int8 without 2:4: no kernel
    with pytest.raises(GpusqError, match="no deployment kernel"):
        layer_codes(lin)


@no_cuda
def test_deploy_without_gpu_raises_clear_error():
    from gpusq.deploy import deploy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(GpusqError, match="compute capability 8.0 or newer"):
        deploy(model)


@no_cuda
def test_bench_cli_refuses_without_gpu(capsys):
    from gpusq.cli import main

    assert main(["bench", "--model", "deit_tiny_patch16_224", "--batch", "1"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


@no_cuda
def test_deploy_warmup_cli_refuses_without_gpu(capsys):
    """`gpusq deploy --warmup` says in one line that it needs a GPU (before building anything), and its
    argument errors are argparse's one-liners."""
    from gpusq.cli import main

    assert main(["deploy", "--warmup", "--model", "deit_tiny_patch16_224", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # neither --checkpoint nor --model
        main(["deploy", "--warmup"])
    assert e.value.code == 2
    assert main(["deploy", "--warmup", "--model", "deit_tiny_patch16_224", "--batch", "0"]) == 2


def test_bench_bad_arguments():
    from gpusq.cli import main
    from gpusq.cli.args import parse_batches as _parse_batches

    with pytest.raises(GpusqError):
        _parse_batches("1,x")
    with pytest.raises(GpusqError):
        _parse_batches("0")
    assert main(["bench", "--variants", "fp32,fp64"]) == 2


def test_bench_ratios_table_and_kernel_classes():
    from gpusq.bench import add_ratios, classify, format_table

    rows = [{"model": "m", "variant": v, "batch": 8, "ms": ms, "img_s": 8e3 / ms}
            for v, ms in (("fp32", 40.0), ("bf16", 10.0), ("bf16-compile", 8.0), ("fp8-dense", 6.0), ("gpusq", 4.0))]
    add_ratios(rows)
    g = rows[-1]
    assert g["x_fp32"] == 10.0 and g["x_bf16c"] == 2.0 and g["x_fp8"] == 1.5
    assert "gpusq" in format_table(rows)
    assert classify("sm90_xmma_sparse_gemm_s8s8") == "gemm 2:4"
    assert classify("triton_per_fused__to_copy_add_clamp_native_layer_norm_round_3") == "norm(+quant)"
    assert classify("triton_poi_fused__to_copy_clamp_div_gelu_round_5") == "gelu(+quant)"
    assert classify("pytorch_flash::flash_fwd_kernel") == "attention"
    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm dense"


def test_compile_regions_pick_blocks_and_patch_embed():
    import timm

    from gpusq.deploy.fused import compile_regions

    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2)
    assert compile_regions(m, "blocks") == ["patch_embed", "blocks.0", "blocks.1"]
    s = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(2, 2),
                          num_heads=(3, 6))
    names = compile_regions(s, "blocks")
    assert "layers.1.downsample" in names and "layers.0.blocks.1" in names
    assert compile_regions(m, "none") == []
    with pytest.raises(ValueError):
        compile_regions(m, "everything")


def test_quantize_helpers_match_fake_quant_semantics():
    """clamp(round(x/s)) with round half to even, saturation, zero padding of rows and columns."""
    from gpusq.deploy.fused import quantize_fp8, quantize_int8
    from gpusq.quant import fake_quantize

    s = torch.tensor(0.5)
    x = torch.tensor([[0.25, 0.75, -0.25, 1.25], [100.0, -100.0, 3.0, -0.74]])
    q = quantize_int8(x, 1.0 / s, 3, 8)
    assert q.dtype == torch.int8 and q.shape == (3, 8)
    assert q[:2, :4].tolist() == [[0, 2, 0, 2], [127, -128, 6, -1]]  # 0.5->0, 1.5->2, 2.5->2
    assert q[2].abs().sum() == 0 and q[:, 4:].abs().sum() == 0
    torch.testing.assert_close(q[:2, :4].float() * s, fake_quantize(x, s, "int8", weight=False))
    f = quantize_fp8(x, 1.0 / s, 2, 4)
    torch.testing.assert_close(f.float() * s, fake_quantize(x, s, "fp8_e4m3", weight=False))


def test_enable_fused_attention_same_outputs():
    """Swin's window attention through SDPA (bias + shift mask as attn_mask) computes what timm's
    explicit path computes; the switch is flipped on every window-attention module."""
    import copy

    import timm

    from gpusq.deploy import enable_fused_attention

    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                          depths=(2, 2), num_heads=(1, 2), window_size=7, num_classes=5).eval()
    fused = copy.deepcopy(m)
    assert enable_fused_attention(fused) == 4 and enable_fused_attention(fused) == 0
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = m(x), fused(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


def test_bench_fp8_baseline_quantizes_the_gpusq_variants_layers():
    """bench's dense FP8 baseline and its gpusq variant prepare the same layers: a Hugging Face model's family
    GEMMs (its own names, not timm's ``blocks``), 2:4 masks on the gpusq variant only."""
    pytest.importorskip("transformers")
    from gpusq import families
    from gpusq.bench import _calibrated
    from gpusq.layers import compressed_layers
    from gpusq.quant import QuantConfig, QuantSpec
    from gpusq.recipes import load_recipe

    name = "ViTForImageClassification"
    model = families.build(name, image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, num_labels=4).eval()
    r = load_recipe("int8")
    sp = families.lookup(name).sparsity_config(r.sparsity)
    x = torch.randn(2, 3, 16, 16)
    ours = compressed_layers(_calibrated(model, r.quant, x, sparse=True, sparsity=sp))
    fp8 = compressed_layers(_calibrated(model, QuantConfig(QuantSpec("fp8_e4m3"), QuantSpec("fp8_e4m3")), x,
                                        sparse=False, sparsity=sp))
    assert list(fp8) == list(ours) and len(ours) == 7  # q, k, v, o, fc1, fc2 + the patch projection
    assert all(m.weight_mask is not None for m in ours.values()) and all(m.weight_mask is None for m in fp8.values())
