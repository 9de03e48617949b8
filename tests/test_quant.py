import math

import pytest
import torch

from gpusq.layers import compressed_layers
from gpusq.quant import (
    ActQuantizer,
    QuantConfig,
    QuantSpec,
    WeightQuantizer,
    calibrate,
    compute_clip,
    fake_quantize,
    quantize_,
    quantize_to_int,
)
from gpusq.sparsity import is_2to4, sparsify_
from tests.helpers import tiny_vit


@pytest.mark.parametrize("dtype,levels", [("int8", 255), ("int4", 15)])
def test_weight_levels_per_channel(dtype, levels):
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    q = WeightQuantizer(QuantSpec(dtype), 16)
    wq = q(w)
    s = q.scale(w)
    for c in range(16):
        assert len(torch.unique(wq[c])) <= levels
        codes = wq[c] / s[c]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    # the largest-magnitude weight of each channel maps to +-qmax exactly
    qmax = 127 if dtype == "int8" else 7
    top = quantize_to_int(w, s, dtype, weight=True).abs().amax(1)
    assert torch.equal(top, torch.full((16,), qmax, dtype=torch.int8))


def test_int4_range_is_symmetric_narrow():
    x = torch.linspace(-20, 20, 101)
    q = quantize_to_int(x, torch.tensor(1.0), "int4", weight=True)
    assert int(q.min()) == -7 and int(q.max()) == 7


def test_activation_int8_saturates_to_onnx_range():
    x = torch.tensor([-1000.0, -128.4, -127.6, 0.5, 1.5, 126.6, 1000.0])
    y = fake_quantize(x, torch.tensor(1.0), "int8", weight=False)
    assert y.tolist() == [-128.0, -128.0, -128.0, 0.0, 2.0, 127.0, 127.0]  # half to even


def test_fp8_weights_on_e4m3_grid():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = WeightQuantizer(QuantSpec("fp8_e4m3"), 4)
    wq = q(w)
    y = wq / q.scale(w)
    assert torch.allclose(y.to(torch.float8_e4m3fn).float(), y, rtol=1e-6, atol=0)
    assert float(y.abs().max()) == pytest.approx(448.0)


def test_ste_gradients():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.6, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5), "int4", weight=False)  # range [-8, 7] * 0.5 = [-4, 3.5]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # straight through inside, 0 when clipped


def test_lsq_scale_gets_gradient():
    q = ActQuantizer(QuantSpec("int8", learnable=True))
    q.scale.data.fill_(0.01)
    q.train()
    x = torch.randn(1000) * 2
    q(x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_quantized_weights_keep_2to4_zeros():
    torch.manual_seed(0)
    m = tiny_vit()
    sparsify_(m)
    quantize_(m, QuantConfig(QuantSpec("int4", calib="mse"), QuantSpec("int8")))
    for layer in compressed_layers(m).values():
        ew = layer.effective_weight()
        assert is_2to4(ew)
        assert (ew[~layer.weight_mask] == 0).all()


def test_calibration_methods_on_known_distributions():
    torch.manual_seed(0)
    g = torch.randn(1 << 18)
    amax = float(g.abs().max())
    assert compute_clip(QuantSpec("int8", "max"), amax, g) == amax
    p = compute_clip(QuantSpec("int8", "percentile", percentile=99.0), amax, g)
    assert p == pytest.approx(2.576, abs=0.03)  # 99th percentile of |N(0,1)|
    mse = compute_clip(QuantSpec("int4", "mse"), amax, g)
    # for 4-bit Gaussian data the MSE-optimal clip is near 2.5 sigma, well inside amax (~4.5)
    assert 1.8 < mse < 3.2
    u = torch.rand(1 << 16) * 2 - 1
    assert compute_clip(QuantSpec("int8", "mse"), 1.0, u) > 0.95  # uniform: no clipping pays


def test_calibrate_sets_static_scales():
    torch.manual_seed(0)
    m = tiny_vit()
    sparsify_(m)
    quantize_(m, QuantConfig(QuantSpec("int8"), QuantSpec("int8", calib="max")))
    x = torch.randn(4, 3, 16, 16)
    seen = {}

    def record(name):
        def hook(mod, inp):
            seen[name] = max(seen.get(name, 0.0), float(inp[0].abs().max()))

        return hook

    hooks = [l.register_forward_pre_hook(record(n)) for n, l in compressed_layers(m).items()]
    calibrate(m, lambda mm: mm(x))
    for h in hooks:
        h.remove()
    for n, l in compressed_layers(m).items():
        assert float(l.input_quant.scale) == pytest.approx(seen[n] / 127, rel=1e-5)
    # quantizers now quantize: inputs take at most 256 distinct values
    layer = compressed_layers(m)["blocks.0.mlp.fc2"]
    got = {}
    layer.register_forward_hook(lambda mod, inp, out: got.update(x=layer.input_quant(inp[0])))
    m(x)
    assert len(torch.unique(got["x"])) <= 256


def test_bad_spec():
    with pytest.raises(ValueError, match="int3"):
        QuantSpec("int3")
    with pytest.raises(ValueError, match="calibration"):
        QuantSpec("int8", calib="entropy")
    assert math.isfinite(QuantSpec("int8").bits)
