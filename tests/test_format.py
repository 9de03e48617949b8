"""The output format (docs/format.md): codes on disk, exact round trips, size = accounting, old
format, damaged files, and the 2:4 / INT4 layouts."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gpusq.checkpoint import load_compressed, read_compressed_dir, save_compressed
from gpusq.codes import layer_codes, pack_2to4, pack_int4, unpack_2to4, unpack_int4
from gpusq.errors import GpusqError

KW = dict(img_size=32, patch_size=4, num_classes=10, depth=2)
NAME = "deit_tiny_patch16_224"


def _model(recipe_name: str, seed: int = 0):
    import timm

    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(seed)
    m = timm.create_model(NAME, pretrained=False, **KW).eval()
    r = load_recipe(recipe_name)
    sparsify_(m, r.sparsity)
    if r.quantized:
        quantize_(m, r.quant)
        x = torch.randn(4, 3, 32, 32)
        calibrate(m, lambda mm: mm(x))
    return m, r


def _sha(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_2to4_and_int4_layouts():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 24, generator=g)
    from gpusq.sparsity import mask_2to4

    mask = mask_2to4(w)
    values, index = pack_2to4(w * mask, mask)
    assert values.shape == (5, 12) and index.shape == (5, 3) and index.dtype == torch.uint8
    dense, m2 = unpack_2to4(values, index, 24)
    assert torch.equal(m2, mask) and torch.equal(dense, w * mask)
    # by hand: group (0, 5, 0, 7) keeps positions 1 and 3 -> nibble 1 | 3 << 2 = 13; next group (9, 0, 8, 0) -> 0 | 2<<2
    v, i = pack_2to4(torch.tensor([[0.0, 5, 0, 7, 9, 0, 8, 0]]), torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]]).bool())
    assert v.tolist() == [[5.0, 7.0, 9.0, 8.0]] and i.tolist() == [[13 | (8 << 4)]]
    with pytest.raises(ValueError, match="not 2:4"):
        pack_2to4(w, torch.ones_like(w, dtype=torch.bool))
    codes = torch.randint(-7, 8, (3, 10), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("recipe", ["int8", "int4", "fp8", "sparse"])
def test_round_trip_is_exact_and_size_is_the_accounting(tmp_path, recipe):
    """save -> load -> save: identical bytes and outputs; the file is the stats' size (+ header)."""
    from gpusq.stats import model_stats

    m, r = _model(recipe)
    a, b = tmp_path / "a", tmp_path / "b"
    save_compressed(m, a, r, NAME, KW, classes=[str(i) for i in range(10)])
    m2, _, info = load_compressed(a)
    save_compressed(m2, b, r, NAME, KW, classes=info["classes"])
    assert _sha(a) == _sha(b)
    m3, _, _ = load_compressed(b)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m2(x), m3(x))
    assert info["classes"] == [str(i) for i in range(10)] and info["format"] == "2"
    # the stored tensors are the codes: int8 / packed int4 / fp8 / bf16 values + 2-bit positions
    from safetensors.torch import load_file

    raw = load_file(str(a / "model.safetensors"))
    k = "blocks.0.mlp.fc1.weight"
    want = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn, "sparse": torch.bfloat16}[recipe]
    assert raw[f"{k}.codes"].dtype == want and raw[f"{k}.index"].dtype == torch.uint8
    assert f"{k}" not in raw and raw["blocks.0.norm1.weight"].dtype == torch.bfloat16
    size = (a / "model.safetensors").stat().st_size
    st = model_stats(m2, r)
    assert 1.0 <= size / st["size_bytes_compressed"] < 1.1, (size, st["size_bytes_compressed"])
    # loaded layers carry the stored codes, which reproduce their weights (what deploy/export read)
    layer = dict(m2.named_modules())["blocks.0.mlp.fc1"]
    c = layer_codes(layer)
    assert c is layer._gpusq_codes and torch.equal(c.dequantized(), layer.effective_weight().detach().float())


def test_codes_follow_further_training(tmp_path):
    """A loaded model trained further gets fresh codes, never stale stored ones."""
    m, r = _model("int8")
    save_compressed(m, tmp_path, r, NAME, KW)
    m2, _, _ = load_compressed(tmp_path)
    layer = dict(m2.named_modules())["blocks.0.attn.qkv"]
    with torch.no_grad():
        layer.weight.mul_(1.5)
    layer.weight_quant.frozen = None  # the scale follows the weight again
    c = layer_codes(layer)
    assert c is not layer._gpusq_codes and torch.equal(c.dequantized(), layer.effective_weight().detach().float())


def test_format1_directory_still_loads(tmp_path):
    """A directory in the previous format (dense effective float32 weights + masks) loads as before."""
    from safetensors.torch import save_file

    from gpusq.layers import compressed_layers

    m, r = _model("int8")
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()
             if ".weight_quant." not in k and ".input_quant." not in k}
    for name, layer in compressed_layers(m).items():
        state[f"{name}.weight"] = layer.effective_weight().detach().float().contiguous()
        state[f"{name}.weight_scale"] = layer.weight_scale().detach().float().contiguous()
        state[f"{name}.input_scale"] = layer.input_quant.scale.detach().abs().float().reshape(())
    meta = {"gpusq_format": "1", "model": NAME, "model_kwargs": json.dumps(KW), "recipe": "int8"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata=meta)
    (tmp_path / "recipe.yaml").write_text(__import__("yaml").safe_dump(r.to_dict()))
    m2, _, info = load_compressed(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert info["format"] == "1" and torch.equal(m2(x), m(x))


def test_damaged_files_give_one_line(tmp_path):
    m, r = _model("int4")
    save_compressed(m, tmp_path, r, NAME, KW)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(GpusqError, match="truncated or damaged") as e:
        load_compressed(tmp_path)
    assert "\n" not in str(e.value)
    from safetensors.torch import load_file, save_file

    f.write_bytes(data)
    state = load_file(str(f))
    with __import__("safetensors").safe_open(str(f), "pt") as sf:
        meta = sf.metadata()
    del state["blocks.1.mlp.fc2.weight.index"]
    save_file(state, str(f), metadata=meta)
    with pytest.raises(GpusqError, match="blocks.1.mlp.fc2 is damaged or incomplete"):
        read_compressed_dir(tmp_path)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(GpusqError, match="not a readable safetensors file"):
        load_compressed(tmp_path)
