"""CPU tests of the fused-block deployment logic (gpusq.deploy.vit) with reference GEMMs.

The GPU kernels (cuSPARSELt through nvmath, Triton) are swapped for float64 torch references with the
same interface and the same numerics (alpha vector, bias, GELU + saturating round-half-even INT8
output, residual through C, zero padding), so what is tested here is everything around them: which
scale goes where, the padded residual stream, the q/k/v views of the qkv output, the heads'
transpose, LayerScale folding, and which blocks qualify. The kernels themselves are tested against
these references under TRITON_INTERPRET (tests/test_kernels_interpret.py) and on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gpusq.deploy import cusparselt as cs
from gpusq.deploy.cslt import reference


class RefGemm:
    """``SparseGemm``'s interface and numerics, computed in float64 on the CPU."""

    def __init__(self, codes, alpha, bias, *, out="bf16", gelu=False, gelu_scale=None, residual=False,
                 device="cpu", name=""):
        self.n, self.k = codes.shape
        self.np_, self.kp = cs.round_up(self.n), cs.round_up(self.k)
        self.codes = F.pad(codes.double(), (0, self.kp - self.k, 0, self.np_ - self.n))
        self.alpha = F.pad(alpha.double(), (0, self.np_ - self.n))
        self.bias = None if bias is None else F.pad(bias.double(), (0, self.np_ - self.n))
        self.out, self.gelu, self.gelu_scale, self.residual, self.name = out, gelu, gelu_scale, residual, name
        self.calls = 0

    def __call__(self, x, residual=None):
        assert x.dtype == torch.int8 and x.shape[1] == self.kp and x.shape[0] % cs.ROW_ALIGN == 0
        assert (residual is not None) == self.residual
        self.calls += 1
        y = reference(x, self.codes, self.alpha, self.bias, gelu=self.gelu, gelu_scale=self.gelu_scale,
                      residual=residual, out=self.out)
        return y.to(torch.int8 if self.out == "int8" else torch.bfloat16)


def ref_layernorm_quant(x, weight, bias, eps, inv_scale, rows, cols, out_dtype=torch.int8, out=None):
    y = F.layer_norm(x[:rows, :cols].float(), (cols,), weight, bias, eps)
    q = torch.clamp(torch.round(y * inv_scale), -128, 127).to(torch.int8)
    return F.pad(q, (0, x.shape[1] - cols, 0, x.shape[0] - rows))


def ref_quantize_heads(o, inv_scale, rows_out, cols_out, out_dtype=torch.int8, out=None):
    b, h, n, d = o.shape
    y = o.transpose(1, 2).reshape(b * n, h * d).float()
    q = torch.clamp(torch.round(y * inv_scale), -128, 127).to(torch.int8)
    return F.pad(q, (0, cols_out - h * d, 0, rows_out - b * n))


def ref_assemble_tokens(tokens, prefix, pos, rows_out, cols_out, out=None):
    b = tokens.shape[0]
    x = torch.cat([prefix[None].expand(b, -1, -1), tokens], 1) + pos[None] if prefix is not None else tokens + pos
    x = x.reshape(-1, x.shape[-1]).float()
    return F.pad(x, (0, cols_out - x.shape[1], 0, rows_out - x.shape[0])).to(tokens.dtype)


def _gathered(row_map, images, src_rows):
    src = (torch.arange(images)[:, None] * src_rows + row_map.long()[None]).reshape(-1)
    return src.clamp(min=0), (row_map >= 0).repeat(images)


def ref_layernorm_quant_gather(x, weight, bias, eps, inv_scale, cols, row_map, images, src_rows, out_rows,
                               out_dtype=torch.int8, out=None):
    src, valid = _gathered(row_map, images, src_rows)
    y = F.layer_norm(x[src, :cols].float(), (cols,), weight, bias, eps)
    q = torch.clamp(torch.round(y * inv_scale), -128, 127) * valid[:, None]
    return F.pad(q, (0, x.shape[1] - cols, 0, out_rows - q.shape[0])).to(torch.int8)


def ref_window_attention(qkv, bias, row_map, inv_scale, out, *, images, window_tokens, heads, head_dim, scale,
                         src_rows):
    n, width = window_tokens, heads * head_dim
    nw = row_map.numel() // n
    t = qkv[: images * nw * n, : 3 * width].float().reshape(images * nw, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = t.unbind(0)
    bidx = torch.arange(images * nw) % bias.shape[0]
    s = q @ k.transpose(-1, -2) * scale + bias[bidx][:, :, :n, :n].float()
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(-1, width)
    src, valid = _gathered(row_map, images, src_rows)
    out[src[valid], :width] = torch.clamp(torch.round(o[valid] * inv_scale), -128, 127).to(out.dtype)
    return out


@pytest.fixture
def reference_kernels(monkeypatch):
    import gpusq.deploy.cslt as cslt
    import gpusq.deploy.kernels as kernels

    monkeypatch.setattr(cslt, "SparseGemm", RefGemm)
    monkeypatch.setattr(kernels, "layernorm_quant", ref_layernorm_quant)
    monkeypatch.setattr(kernels, "quantize_heads", ref_quantize_heads)
    monkeypatch.setattr(kernels, "assemble_tokens", ref_assemble_tokens)
    monkeypatch.setattr(kernels, "layernorm_quant_gather", ref_layernorm_quant_gather)
    monkeypatch.setattr(kernels, "window_attention", ref_window_attention)


def _compressed(name="deit_tiny_patch16_224", recipe="int8", seed=0, **kw):
    import timm

    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    r = load_recipe(recipe)
    sparsify_(m, r.sparsity)
    quantize_(m, r.quant)
    size = kw.get("img_size", 224)
    calib = torch.randn(8, 3, size, size)
    calibrate(m, lambda mm: mm(calib))
    return m.eval(), size


def _fused_copy(model):
    from gpusq.deploy.vit import fuse_vit_blocks
    from gpusq.layers import compressed_layers

    fm = copy.deepcopy(model)
    why = fuse_vit_blocks(fm, compressed_layers(fm), torch.device("cpu"))
    return fm, why


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


TINY = dict(img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=72, num_heads=3)


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_fused_blocks_match_fake_quant(reference_kernels, recipe):
    """17 tokens (rows padded to 32 at batch 1, 96 at batch 5), width 72 (padded to 96), 3 heads."""
    from gpusq.deploy.vit import FusedBlocks

    model, size = _compressed(recipe=recipe, **TINY)
    fm, why = _fused_copy(model)
    assert why is None and isinstance(fm.blocks, FusedBlocks)
    for b in (1, 5):
        x = torch.randn(b, 3, size, size)
        with torch.no_grad():
            ref, out = model(x), fm(x)
        err = _rel(out, ref)
        assert err < 3e-2, (b, err)  # bf16 residual stream vs the fp32 fake-quant model
        assert bool((out.argmax(1) == ref.argmax(1)).all())
    calls = [g.calls for blk in fm.blocks.blocks for g in blk.gemms().values()]
    assert calls == [2] * 8  # every GEMM of both blocks ran once per forward


def test_fused_blocks_fold_layerscale(reference_kernels):
    """A LayerScale gamma (DeiT-3 / ViT with init_values) goes into proj/fc2's alpha and bias."""
    model, size = _compressed("vit_tiny_patch16_224", init_values=0.5, **TINY)
    for blk in model.blocks:  # random per-channel gammas, so a dropped or misplaced one shows
        blk.ls1.gamma.data.uniform_(0.2, 2.0)
        blk.ls2.gamma.data.uniform_(0.2, 2.0)
    fm, why = _fused_copy(model)
    assert why is None
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert _rel(fm(x), model(x)) < 3e-2


def test_a_wrong_scale_is_caught(reference_kernels):
    """The comparison above can fail: fc1's GELU output scale off by 2x breaks it."""
    model, size = _compressed(**TINY)
    fm, _ = _fused_copy(model)
    fm.blocks.blocks[0].fc1.gelu_scale *= 2
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert _rel(fm(x), model(x)) > 5e-2


def test_unfusable_models_say_why():
    model, _ = _compressed("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(1, 2),
                           window_size=7, embed_dim=32, num_classes=4)
    fm, why = _fused_copy(model)
    assert why is not None and "blocks" in why

    import timm

    from gpusq.quant import QuantSpec, set_quant_
    from gpusq.sparsity import mask_2to4

    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY).eval()
    from gpusq.layers import ensure_compressed

    names = [f"blocks.{i}.{r}" for i in range(2) for r in ("attn.qkv", "attn.proj", "mlp.fc1")]
    for layer in ensure_compressed(m, names).values():  # fc2 left dense
        layer.set_mask_(mask_2to4(layer.weight))
        set_quant_(layer, QuantSpec("int8"), QuantSpec("int8"))
    fm, why = _fused_copy(m)
    assert why == "blocks.0.mlp.fc2 is not compressed"
    assert not hasattr(fm.blocks, "gpusq_fused")  # left unchanged


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_fused_forward_matches(reference_kernels, name):
    """Token assembly (class + distillation tokens, position add, padding) and the class-token-only final
    norm + head give the fake-quant model's logits."""
    from gpusq.deploy.vit import fuse_vit_forward

    model, size = _compressed(name, **TINY)
    fm, why = _fused_copy(model)
    assert why is None and fuse_vit_forward(fm) is None
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref, out = model(x), fm(x)
    assert out.shape == ref.shape and _rel(out, ref) < 3e-2
    with torch.no_grad():
        fm._gpusq_pos = torch.roll(fm._gpusq_pos, 1, 0)  # a misplaced position embedding shows
        assert _rel(fm(x), ref) > 5e-2


def test_fused_forward_refuses_other_pooling(reference_kernels):
    from gpusq.deploy.vit import fuse_vit_forward

    model, _ = _compressed(global_pool="avg", **TINY)
    fm, why = _fused_copy(model)
    assert why is None
    assert "class-token pooling" in fuse_vit_forward(fm)


# Swin: 10 x 10 tokens in windows of 4 (padded to 12 x 12, shifted by 2 in odd blocks), then 5 x 5
# (padded to 8 x 8); head dim 16.
SWIN = dict(img_size=40, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def _fused_swin(model):
    from gpusq.deploy.swin import fuse_swin_blocks
    from gpusq.layers import compressed_layers

    fm = copy.deepcopy(model)
    return fm, fuse_swin_blocks(fm, compressed_layers(fm), torch.device("cpu"))


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_fused_swin_blocks_match_fake_quant(reference_kernels, recipe):
    """Shifted and padded windows, the row maps, the bias tables and the residual stream in token order
    give the fake-quant Swin's logits; at batch 1 the rows are padded (100 -> 128, 25 -> 32)."""
    from gpusq.deploy.swin import FusedSwinBlocks

    model, size = _compressed("swin_tiny_patch4_window7_224", recipe=recipe, **SWIN)
    assert any(any(b.shift_size) for b in model.layers[0].blocks)
    fm, why = _fused_swin(model)
    assert why is None and all(isinstance(st.blocks, FusedSwinBlocks) for st in fm.layers)
    for b in (1, 3):
        x = torch.randn(b, 3, size, size)
        with torch.no_grad():
            ref, out = model(x), fm(x)
        assert _rel(out, ref) < 3e-2, (b, _rel(out, ref))
        assert bool((out.argmax(1) == ref.argmax(1)).all())


@pytest.mark.parametrize("hw,window,shift", [((10, 9), (4, 4), (2, 2)), ((8, 8), (4, 4), (0, 0)),
                                             ((200, 336), (7, 7), (3, 3))])
def test_window_tables_are_timms(hw, window, shift):
    """The row map is timm's roll(-shift) -> pad -> window_partition of the token ids, and the mask is
    timm's SW-MSA mask: both checked against timm's own functions (a wrong shift or order fails)."""
    from timm.models.swin_transformer import SwinTransformerBlock, window_partition

    from gpusq.deploy.swin import shift_mask, window_row_map

    h, w = hw
    ids = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
    x = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else ids
    ph, pw = (-h) % window[0], (-w) % window[1]
    x = F.pad(x, (0, 0, 0, pw, 0, ph), value=-1.0)
    want = window_partition(x, window).reshape(-1)
    assert torch.equal(window_row_map(h, w, window, shift).float(), want)
    blk = SwinTransformerBlock(8, (h, w), num_heads=1, window_size=window, shift_size=shift[0])
    mask = shift_mask(h, w, window, shift)
    if blk.attn_mask is None:
        assert mask is None
    else:
        assert torch.equal(mask, blk.attn_mask.float())


def test_fused_swin_refuses_what_it_cannot_run():
    model, _ = _compressed("swin_tiny_patch4_window7_224", **{**SWIN, "num_heads": (4, 8)})  # head dim 8
    fm, why = _fused_swin(model)
    assert "head dim 8" in why and not hasattr(fm.layers[0].blocks, "gpusq_fused")
    deit, _ = _compressed(**TINY)
    assert _fused_swin(deit)[1] == "the model has no timm or Hugging Face Swin stages"


def _hf_swin(recipe="int8"):
    """A tiny Hugging Face SwinModel (10 x 10 tokens, windows of 4, padded and shifted), compressed."""
    from transformers import SwinConfig, SwinModel

    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=40, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4)
    m = SwinModel(cfg).eval()
    r = load_recipe(recipe)
    sparsify_(m, r.sparsity)
    quantize_(m, r.quant)
    calib = torch.randn(8, 3, 40, 40)
    calibrate(m, lambda mm: mm(pixel_values=calib))
    return m.eval()


def test_fused_hf_swin_matches_fake_quant(reference_kernels):
    """transformers' Swin (separate q/k/v Linears, concatenated into one qkv GEMM) on the same fused blocks."""
    from gpusq.deploy.swin import FusedHFSwinBlocks

    model = _hf_swin()
    fm, why = _fused_swin(model)
    assert why is None
    assert all(isinstance(st.blocks[0], FusedHFSwinBlocks) for st in fm.encoder.layers)
    for b in (1, 3):
        x = torch.randn(b, 3, 40, 40)
        with torch.no_grad():
            ref = model(pixel_values=x).last_hidden_state
            out = fm(pixel_values=x).last_hidden_state
        assert _rel(out, ref) < 3e-2, (b, _rel(out, ref))


@pytest.mark.parametrize("hw", [(10, 9), (5, 5), (8, 8)])
def test_window_row_map_is_hugging_faces(hw):
    """Hugging Face pads before the cyclic shift (timm shifts first): the map with ``pad_first`` is
    SwinLayer's own maybe_pad -> cyclic_shift -> window_partition of the token ids."""
    from transformers import SwinConfig
    from transformers.models.swin import modeling_swin as ms

    from gpusq.deploy.swin import window_row_map

    layer = ms.SwinLayer(SwinConfig(window_size=4), dim=8, input_resolution=hw, num_heads=1, shift_size=2)
    if not hasattr(layer, "cyclic_shift"):
        pytest.skip("this transformers version's SwinLayer has no cyclic_shift method")
    h, w = hw
    ids = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1) + 1  # 0 = padding
    x, _ = layer.maybe_pad(ids, h, w)
    want = ms.window_partition(layer.cyclic_shift(x), 4).reshape(-1) - 1
    assert torch.equal(window_row_map(h, w, (4, 4), (2, 2), pad_first=True).float(), want)
    if (h, w) == (10, 9):
        assert not torch.equal(window_row_map(h, w, (4, 4), (2, 2)).float(), want)


def test_fused_hf_swin_needs_one_input_scale():
    """q, k and v share one INT8 input: different learned input scales cannot be fused (and say so)."""
    from gpusq.deploy.swin import hf_layout
    from gpusq.deploy.vit import submodule

    model = _hf_swin()
    blk = model.encoder.layers[0].blocks[0]
    k = submodule(blk, hf_layout(blk)["k"])
    k.input_quant.scale.data.mul_(1.5)  # as after QAT with learnable activation scales
    fm, why = _fused_swin(model)
    assert "different scales" in why


@pytest.mark.parametrize("name", ["maskrcnn_swin_test", "upernet_swin_test"])
def test_fused_task_backbones_match(reference_kernels, name):
    """The Swin inside Mask R-CNN (timm, features_only, 64 x 96 images: padded windows) and inside UPerNet
    (transformers) runs on the fused blocks and gives the fake-quant backbone's feature maps."""
    from gpusq import families
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import SparsityConfig, sparsify_

    torch.manual_seed(0)
    if name.startswith("maskrcnn"):
        body = families.build(name, img_size=(64, 96), min_size=64, max_size=96).eval().backbone.body
        x = torch.randn(2, 3, 64, 96)

        def feats(m):
            return list(m(x))
    else:
        body = families.build(name).eval().backbone
        x = torch.randn(2, 3, 64, 64)

        def feats(m):
            return list(m(x).feature_maps)
    r = load_recipe("int8")
    sparsify_(body, SparsityConfig(include=[r"(^|\.)blocks\.\d+\."]))
    quantize_(body, r.quant)
    calibrate(body, lambda m: m(x))
    fm, why = _fused_swin(body)
    assert why is None
    with torch.no_grad():
        ref, out = feats(body), feats(fm)
    assert len(ref) == 4 and all(_rel(o, f) < 3e-2 for o, f in zip(out, ref)), [_rel(o, f) for o, f in zip(out, ref)]


def test_residual_stream_starts_aligned():
    """The GEMMs' descriptors declare 16-byte alignment: a token view at an odd offset is copied, an aligned
    one is used as is."""
    from gpusq.deploy.vit import FusedBlocks

    base = torch.randn(1 + 2 * 32 * 64, dtype=torch.bfloat16)
    odd = base[1:].view(2, 32, 64)  # starts 2 bytes into an aligned buffer
    xr = FusedBlocks.pad(odd)
    assert xr.data_ptr() % 16 == 0 and torch.equal(xr, odd.reshape(64, 64))
    even = base[:-1].view(2, 32, 64)
    assert FusedBlocks.pad(even).data_ptr() == even.data_ptr()


@pytest.mark.parametrize("arch", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_fused_hf_vit_layers_match_fake_quant(reference_kernels, arch, recipe):
    """An HF ViT / DeiT encoder on the fused ViT blocks (q/k/v as one GEMM; CPU reference kernels): the
    fake-quant model's logits; 17 / 18 tokens (rows padded), width 72 (padded), 3 heads."""
    from gpusq import families
    from gpusq.deploy.hf_vit import FusedHFViTLayers, fuse_hf_vit_layers, hf_vit_layers
    from gpusq.layers import compressed_layers
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(0)
    model = families.build(arch, image_size=32, patch_size=8, hidden_size=72, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=144, num_labels=10).eval()
    r = load_recipe(recipe)
    sparsify_(model, families.lookup(arch).sparsity_config(r.sparsity))
    quantize_(model, r.quant)
    calib = torch.randn(8, 3, 32, 32)
    calibrate(model, lambda m: m(calib))
    model.eval()
    fm = copy.deepcopy(model)
    assert fuse_hf_vit_layers(fm, compressed_layers(fm), torch.device("cpu")) is None
    prefix, _, attr = hf_vit_layers(model)
    fused = fm.get_submodule(prefix)
    assert len(fused) == 1 and isinstance(fused[0], FusedHFViTLayers) and len(fused[0].blocks) == 2
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            ref, out = model(x), fm(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # what the bf16 residual stream alone does
                floor = _rel(model(x).float(), ref)
        assert _rel(out, ref) < 1.25 * floor + 5e-3, (b, _rel(out, ref), floor)  # wrong kernels/scales: ~1
        assert bool((out.argmax(1) == ref.argmax(1)).all())


def test_hf_vit_layers_with_different_qkv_scales_stay_per_layer():
    """q, k and v of one layer quantize one input; if their input scales differ (e.g. moved apart by QAT),
    one INT8 input cannot serve the concatenated GEMM: the layer is refused, with the reason."""
    from gpusq import families
    from gpusq.deploy.hf_vit import fuse_hf_vit_layers
    from gpusq.layers import compressed_layers
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(0)
    model = families.build("ViTForImageClassification", image_size=32, patch_size=8, hidden_size=72,
                           num_hidden_layers=1, num_attention_heads=3, intermediate_size=144, num_labels=10).eval()
    r = load_recipe("int8")
    sparsify_(model, families.lookup("ViTForImageClassification").sparsity_config(r.sparsity))
    quantize_(model, r.quant)
    calibrate(model, lambda m: m(torch.randn(4, 3, 32, 32)))
    layers = compressed_layers(model)
    k = next(n for n in layers if n.endswith(("k_proj", "attention.key")))
    q = layers[k].input_quant
    for name in ("scale", "amax"):
        t = getattr(q, name, None)
        if isinstance(t, torch.Tensor):
            t.data.mul_(1.5)
    why = fuse_hf_vit_layers(model, layers, torch.device("cpu"))
    assert why is not None and "different scales" in why
