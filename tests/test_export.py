"""ONNX export: Q/DQ structure, integer 2:4 initializers, exact fake-quant semantics, onnxruntime parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch

from gpusq.checkpoint import load_compressed, save_compressed
from gpusq.cli import main as cli
from gpusq.errors import GpusqError
from gpusq.export import (
    export_onnx,
    initializer_array,
    is_2to4_array,
    layer_keys,
    ort_session,
    qdq_summary,
    verify,
    weight_initializers,
)
from gpusq.layers import compressed_layers
from gpusq.quant import QuantConfig, calibrate, quantize_, quantize_to_int
from gpusq.recipes import load_recipe
from gpusq.sparsity import sparsify_

VIT_KW = dict(img_size=32, patch_size=4, num_classes=10, depth=2)
SWIN_KW = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,),
               num_classes=10)


def _compressed(name: str, kw: dict, recipe: str, quant: QuantConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw)
    r = load_recipe(recipe)
    sparsify_(m, r.sparsity)
    quantize_(m, quant or r.quant)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(m, lambda mm: mm(x))
    return m.eval(), r


_CACHE: dict[str, tuple] = {}


def _vit(recipe: str):
    """Tiny compressed ViT per recipe, built once per test session (tests must not modify it)."""
    if recipe not in _CACHE:
        _CACHE[recipe] = _compressed("deit_tiny_patch16_224", VIT_KW, recipe)
    return _CACHE[recipe]


def _check_structure(path, model, int_dtype: int | None) -> onnx.ModelProto:
    """Q/DQ counts, 2:4 codes equal to the model's own, scales equal to the model's own."""
    p = onnx.load(str(path))
    onnx.checker.check_model(p, full_check=True)
    layers = compressed_layers(model)
    n = len(layers)
    assert layer_keys(p) == list(layers)
    q = qdq_summary(p)
    # one weight DQ + one activation Q/DQ pair per compressed layer, nothing else
    assert q == {"QuantizeLinear": n, "DequantizeLinear": 2 * n, "weight_dq": n, "act_qdq": n}
    inits = {t.name: t for t in p.graph.initializer}
    codes = weight_initializers(p)
    assert len(codes) == n
    for key, layer in layers.items():
        t = inits[f"{key}.weight_quantized"]
        assert t.data_type == int_dtype
        w = codes[t.name]
        assert is_2to4_array(w), key
        scale = layer.weight_scale().detach()
        ref = quantize_to_int(layer.masked_weight().detach(), scale.reshape(-1, *[1] * (w.ndim - 1)),
                              layer.weight_quant.spec.dtype, weight=True)
        np.testing.assert_array_equal(w, ref.numpy())
        np.testing.assert_array_equal(initializer_array(inits[f"{key}.weight_scale"]), scale.numpy())
        np.testing.assert_array_equal(initializer_array(inits[f"{key}.input_scale"]),
                                      layer.input_quant.scale.detach().numpy())
        assert initializer_array(inits[f"{key}.input_zero_point"]).dtype == np.int8
    # dynamic batch axis
    assert p.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert p.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    return p


def test_int8_vit_from_checkpoint(tmp_path):
    model, r = _vit("int8")
    ck = tmp_path / "ck"
    save_compressed(model, ck, r, "deit_tiny_patch16_224", VIT_KW)
    res = export_onnx(ck, tmp_path / "m.onnx")
    assert res.opset == 17 and res.fallbacks == []
    p = _check_structure(res.path, model, onnx.TensorProto.INT8)
    assert p.opset_import[0].version == 17
    for w in weight_initializers(p).values():
        assert w.min() >= -127 and w.max() <= 127
    # batch 3 differs from the traced batch (2): the batch axis really is dynamic; the reference is
    # the model as stored (bf16 norms / biases), which is what the checkpoint holds
    stored, _, _ = load_compressed(ck)
    v = verify(stored, res.path, "random", n=24, batch_size=3)
    assert v["n"] == 24 and v["top1_agree"] >= 0.99 and v["rel_err"] < 2e-2


def test_int4_vit_native_int4(tmp_path):
    model, _ = _vit("int4")
    res = export_onnx(model, tmp_path / "m.onnx")
    assert res.opset == 21 and res.fallbacks == []
    p = _check_structure(res.path, model, onnx.TensorProto.INT4)
    for w in weight_initializers(p).values():
        assert w.min() >= -7 and w.max() <= 7
    v = verify(model, res.path, "random", n=16, batch_size=8)
    assert v["top1_agree"] >= 0.99 and v["rel_err"] < 2e-2


def test_int4_below_opset21_falls_back_to_int8_container(tmp_path):
    model, _ = _vit("int4")
    res = export_onnx(model, tmp_path / "m.onnx", opset=20)
    assert res.opset == 20 and len(res.fallbacks) == res.layers
    p = _check_structure(res.path, model, onnx.TensorProto.INT8)
    for w in weight_initializers(p).values():
        assert w.min() >= -7 and w.max() <= 7
    v = verify(model, res.path, "random", n=16, batch_size=8)
    assert v["top1_agree"] >= 0.99 and v["rel_err"] < 2e-2


def test_swin_int8(tmp_path):
    model, _ = _compressed("swin_tiny_patch4_window7_224", SWIN_KW, "int8")
    assert any("attn.qkv" in k for k in compressed_layers(model))
    res = export_onnx(model, tmp_path / "swin.onnx")
    _check_structure(res.path, model, onnx.TensorProto.INT8)
    v = verify(model, res.path, "random", n=30, batch_size=5)
    assert v["top1_agree"] >= 0.99 and v["rel_err"] < 2e-2


def test_fp8_runs_in_onnxruntime(tmp_path):
    model, _ = _vit("fp8")
    res = export_onnx(model, tmp_path / "m.onnx")
    assert res.opset == 19
    p = onnx.load(str(res.path))
    assert qdq_summary(p)["act_qdq"] == res.layers
    inits = {t.name: t for t in p.graph.initializer}
    for key, layer in compressed_layers(model).items():
        t = inits[f"{key}.weight_quantized"]
        assert t.data_type == onnx.TensorProto.FLOAT8E4M3FN
        w = initializer_array(t)
        assert is_2to4_array(w)
        deq = torch.from_numpy(w) * layer.weight_scale().reshape(-1, *[1] * (w.ndim - 1))
        torch.testing.assert_close(deq, layer.effective_weight().detach(), rtol=0, atol=0)
    v = verify(model, res.path, "random", n=16, batch_size=8)
    assert v["top1_agree"] >= 0.99 and v["rel_err"] < 2e-2


def test_float_path_is_exact_without_quantization(tmp_path):
    """Sparse-only: float 2:4 weights, no Q/DQ; the graph matches PyTorch to float rounding."""
    model, _ = _vit("sparse")
    res = export_onnx(model, tmp_path / "m.onnx")
    p = onnx.load(str(res.path))
    assert qdq_summary(p)["DequantizeLinear"] == 0
    w = weight_initializers(p)
    assert len(w) == res.layers and all(is_2to4_array(a) for a in w.values())
    v = verify(model, res.path, "random", n=16, batch_size=8)
    assert v["top1_agree"] == 1.0 and v["rel_err"] < 1e-5


def test_activation_codes_match_fake_quant_exactly(tmp_path):
    """ORT's QuantizeLinear codes of the first layer's input equal gpusq's, saturation included."""
    model, _ = _vit("int8")
    res = export_onnx(model, tmp_path / "m.onnx")
    p = onnx.load(str(res.path))
    key = "patch_embed.proj"
    p.graph.output.append(onnx.helper.make_tensor_value_info(f"{key}.input_q", onnx.TensorProto.INT8, None))
    onnx.save(p, str(tmp_path / "probe.onnx"))
    sess = ort_session(tmp_path / "probe.onnx", optimize=False)
    layer = compressed_layers(model)[key]
    s = layer.input_quant.scale.detach()
    g = torch.Generator().manual_seed(5)
    # 50x the calibrated range saturates both ends; x.5 grid points test round-half-to-even
    x = torch.cat([torch.randn(2, 3, 32, 32, generator=g) * 50,
                   ((torch.randint(-100, 100, (2, 3, 32, 32), generator=g) + 0.5) * s).float()])
    got = sess.run([f"{key}.input_q"], {"input": x.numpy()})[0]
    ref = quantize_to_int(x, s, "int8", weight=False).numpy()
    np.testing.assert_array_equal(got, ref)
    assert got.min() == -128 and got.max() == 127
    torch.testing.assert_close(layer.input_quant(x), torch.from_numpy(ref).float() * s, rtol=0, atol=0)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs(tmp_path):
    model, _ = _vit("int8")
    (tmp_path / "notgpusq").mkdir()
    with pytest.raises(GpusqError, match="not a gpusq output"):
        export_onnx(tmp_path / "notgpusq", tmp_path / "m.onnx")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "model.safetensors").write_bytes(b"")
    with pytest.raises(GpusqError, match="dense model"):
        export_onnx(tmp_path / "dense", tmp_path / "m.onnx")
    with pytest.raises(GpusqError, match="checkpoint not found"):
        export_onnx(tmp_path / "missing", tmp_path / "m.onnx")
    with pytest.raises(GpusqError, match="output directory does not exist"):
        export_onnx(model, tmp_path / "nodir" / "m.onnx")
    for bad in (16, 22):
        with pytest.raises(GpusqError, match="unsupported opset"):
            export_onnx(model, tmp_path / "m.onnx", opset=bad)
    fp8, _ = _vit("fp8")
    with pytest.raises(GpusqError, match="FP8 Q/DQ needs opset >= 19"):
        export_onnx(fp8, tmp_path / "m.onnx", opset=17)
    with pytest.raises(GpusqError, match="no compressed layers"):
        export_onnx(timm.create_model("deit_tiny_patch16_224", pretrained=False, **VIT_KW), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli(tmp_path, capsys):
    model, r = _vit("int8")
    ck = tmp_path / "ck"
    save_compressed(model, ck, r, "deit_tiny_patch16_224", VIT_KW)
    out = tmp_path / "m.onnx"
    rc = cli(["export", "--checkpoint", str(ck), "--format", "onnx", "--out", str(out),
              "--verify", "random", "--verify-samples", "8", "--batch-size", "4"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "Q/DQ: 9 QuantizeLinear, 18 DequantizeLinear" in text
    assert "top-1 agreement 100.00%" in text or "top-1 agreement 99." in text
    new = tmp_path / "new.onnx"  # (an existing --out is refused first: tests/test_bad_input.py)
    rc = cli(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(new)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "checkpoint not found" in err
    rc = cli(["export", "--checkpoint", str(ck), "--out", str(new), "--opset", "13"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unsupported opset 13" in err
