"""gpusq stats: every expected number below is computed by hand from the layer shapes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from gpusq.cli import main
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import load_recipe
from gpusq.sparsity import sparsify_
from gpusq.stats import model_stats, stats

T, D, H, C = 3, 8, 16, 4  # tokens, width, MLP width, classes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)


class Tiny(nn.Module):
    """Two compressible Linear layers in ``blocks.0``, two attention-like matmuls, a dense head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block())
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        b = self.blocks[0]
        h = b.fc2(F.gelu(b.fc1(x)))
        a = h @ h.transpose(-1, -2)  # [T, T]
        h = a @ h  # [T, D]
        return self.head(self.norm(h).mean(1))


# Hand counts for Tiny, shared by every recipe.
PARAMS = (D * H + H) + (H * D + D) + 2 * D + (D * C + C)  # fc1 144 + fc2 136 + norm 16 + head 36 = 332
FLOPS_FC = 2 * T * D * H + 2 * T * H * D  # 768 + 768
FLOPS_OTHER = 2 * T * T * D + 2 * T * T * D + 2 * D * C  # QKᵀ-like 144 + AV-like 144 + head 64


def expected(w_bits: int, a_bits: int, quantized: bool) -> dict:
    """Bytes of Tiny deployed 2:4 at (w_bits, a_bits) with bf16 for the rest, by hand."""
    kept = D * H // 2  # per Linear: 128 weights, 64 kept
    fc1 = kept * w_bits / 8 + kept * 2 / 8 + H * 2 + (H * 4 + 4 if quantized else 0)
    fc2 = kept * w_bits / 8 + kept * 2 / 8 + D * 2 + (D * 4 + 4 if quantized else 0)
    size = fc1 + fc2 + 2 * D * 2 + (D * C + C) * 2
    bitops = FLOPS_FC * 0.5 * w_bits * a_bits + FLOPS_OTHER * 16 * 16
    return {
        "size_bytes_compressed": size,
        "size_ratio": 4 * PARAMS / size,
        "bitops_ratio_linear": 1024 / (0.5 * w_bits * a_bits),
        "bitops_ratio": (FLOPS_FC + FLOPS_OTHER) * 1024 / bitops,
    }


@pytest.mark.parametrize(
    "recipe, w, a, q, size, bitops_all",
    [
        # int8: fc1 64+16+32+68=180 B, fc2 64+16+16+36=132 B, norm 32 B, head 72 B
        ("int8", 8, 8, True, 416, 1888 * 1024 / (1536 * 32 + 352 * 256)),
        # int4: fc1 32+16+32+68=148, fc2 32+16+16+36=100
        ("int4", 4, 8, True, 352, 1888 * 1024 / (1536 * 16 + 352 * 256)),
        ("fp8", 8, 8, True, 416, 1888 * 1024 / (1536 * 32 + 352 * 256)),
        # sparse (bf16 values, no scales): fc1 128+16+32=176, fc2 128+16+16=160
        ("sparse", 16, 16, False, 440, 1888 * 1024 / (1536 * 128 + 352 * 256)),
    ],
)
def test_tiny_model_by_hand(recipe, w, a, q, size, bitops_all):
    s = model_stats(Tiny(), recipe, input_size=(T, D))
    assert s["params_dense"] == PARAMS == 332
    assert s["params_nonzero"] == 332 - 64 - 64
    assert s["params_compressed"] == 128 + 128
    assert s["size_bytes_fp32"] == 1328
    assert s["size_bytes_compressed"] == size
    assert s["size_ratio"] == pytest.approx(1328 / size)
    assert s["flops_dense"] == 1888 and s["flops_compressed"] == 1536 and s["flops_other"] == 352
    assert s["bitops_ratio_linear"] == pytest.approx(1024 / (0.5 * w * a))
    assert s["bitops_ratio"] == pytest.approx(bitops_all)
    assert s["layers_compressed"] == 2
    assert s["layers_skipped"] == {"head": "excluded (classifier head or recipe exclude pattern)"}
    assert (s["density"], s["w_bits"], s["a_bits"], s["recipe"]) == (0.5, w, a, recipe)
    for k, v in expected(w, a, q).items():
        assert s[k] == pytest.approx(v), k


def test_already_compressed_model_counts_the_same():
    """A calibrated int8 model (learnable activation scales are Parameters) counts like a fresh one."""
    r = load_recipe("int8")
    m = Tiny()
    sparsify_(m, r.sparsity)
    quantize_(m, r.quant)
    calibrate(m, lambda mm: mm(torch.randn(2, T, D)))
    assert any("input_quant" in n for n, _ in m.named_parameters())
    s = model_stats(m, r, input_size=(T, D))
    fresh = model_stats(Tiny(), r, input_size=(T, D))
    assert s == fresh
    assert s["params_dense"] == 332


def test_uncompressed_input_is_not_modified():
    m = Tiny()
    model_stats(m, "int8", input_size=(T, D))
    assert type(m.blocks[0].fc1) is nn.Linear


DEIT = dict(img_size=32, patch_size=4, num_classes=10, depth=2)


def test_deit_attention_and_layers_counted():
    """Fused-SDPA attention is counted (QKᵀ and AV: 2·T²·D each), the head stays dense."""
    s = stats("deit_tiny_patch16_224", "int8", **DEIT)
    t, d, depth = 8 * 8 + 1, 192, 2
    per_block = 2 * t * d * (3 * d) + 2 * t * d * d + 2 * (2 * t * d * 4 * d)  # qkv, proj, fc1+fc2
    patch = 2 * (3 * 4 * 4) * d * 64
    assert s["flops_compressed"] == depth * per_block + patch
    assert s["flops_other"] == depth * 2 * (2 * t * t * d) + 2 * d * 10
    assert s["layers_compressed"] == depth * 4 + 1
    assert list(s["layers_skipped"]) == ["head"]
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, **DEIT)
    assert s["params_dense"] == sum(p.numel() for p in ref.parameters())
    assert s["input_size"] == [3, 32, 32]


def test_meta_device_matches_real_weights():
    """``stats`` counts on the meta device; a real CPU model must give the same numbers."""
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, **DEIT)
    real = model_stats(ref, "int4", model_name="deit_tiny_patch16_224")
    assert stats("deit_tiny_patch16_224", "int4", **DEIT) == real


def test_swin_dense_gemms_reported():
    kw = dict(img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=16, num_classes=10)
    s = stats("swin_tiny_patch4_window7_224", "fp8", **kw)
    assert s["layers_compressed"] == 2 * 4 + 1
    assert set(s["layers_skipped"]) == {"layers.1.downsample.reduction", "head.fc"}
    assert s["flops_dense"] == s["flops_compressed"] + s["flops_other"]
    # other = window attention (QKᵀ+AV, stage 1: 4 windows × 1 head × 49² × 16; stage 2: 1 × 2 × 49² × 16)
    # + patch-merging reduction (49 tokens × 64 → 32) + head (32 → 10)
    attn = 2 * 2 * (4 * 49 * 49 * 16) + 2 * 2 * (1 * 49 * 49 * 32)
    assert s["flops_other"] == attn + 2 * 49 * 64 * 32 + 2 * 32 * 10


def test_cli_json_and_table(capsys):
    args = ["stats", "--model", "deit_tiny_patch16_224", "--model-arg", "img_size=32,patch_size=4",
            "--model-arg", "depth=1"]
    assert main([*args, "--recipe", "int8", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    for key in ("params_dense", "params_nonzero", "size_bytes_fp32", "size_bytes_compressed", "size_ratio",
                "flops_dense", "bitops_ratio_linear", "bitops_ratio", "layers_compressed"):
        assert key in one
    assert one["layers_compressed"] == 5
    assert main([*args, "--recipe", "int8,int4", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in two] == ["int8", "int4"] and two[0] == one
    assert main([*args, "--recipe", "int4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("model") and "int4" in lines[2]
    assert f"{two[1]['size_ratio']:.2f}" in lines[2]


def test_model_without_compressible_layers(capsys):
    """Nothing matches the include patterns: no linear ratio, everything counted as dense bf16."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x)

    s = model_stats(Flat(), "int8", input_size=(8,))
    assert s["layers_compressed"] == 0 and s["bitops_ratio_linear"] is None
    assert s["size_bytes_compressed"] == 36 * 2 and s["size_ratio"] == 2.0
    assert s["flops_dense"] == s["flops_other"] == 64 and s["bitops_ratio"] == 1024 / 256
    assert s["layers_skipped"] == {"fc": "not matched by the recipe's include patterns"}


def test_cli_unknown_model(capsys):
    assert main(["stats", "--model", "deit_tiny_patch16_22", "--recipe", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown model 'deit_tiny_patch16_22'" in err and "deit_tiny_patch16_224" in err


def test_cli_unknown_recipe(capsys):
    assert main(["stats", "--model", "deit_tiny_patch16_224", "--recipe", "int9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown recipe 'int9'" in err and "int8" in err and "int4" in err


def test_cli_bad_model_arg(capsys):
    assert main(["stats", "--model", "deit_tiny_patch16_224", "--model-arg", "img_size"]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err
