import pytest
import torch
from torch import nn

from gpusq.layers import CompressedConv2d, CompressedLinear, compressed_layers
from gpusq.sparsity import (
    SparsityConfig,
    apply_masks_,
    check_2to4,
    is_2to4,
    mask_2to4,
    select_layers,
    sparsify_,
)
from tests.helpers import tiny_vit


def test_mask_keeps_two_largest_of_each_group_of_four():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, -2.0, 1.0, 0.0]])
    m = mask_2to4(w)
    assert m.tolist() == [[False, True, True, False, True, True, False, False]]


def test_mask_ties_are_deterministic_earliest_wins():
    w = torch.ones(3, 8)
    m = mask_2to4(w)
    assert m.tolist() == [[True, True, False, False] * 2] * 3


def test_linear_groups_run_along_input_dim():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    m = mask_2to4(w)
    assert (m.reshape(8, 4, 4).sum(-1) == 2).all()
    # grouping along the output dim instead would not give 2 per input-dim group
    assert not (mask_2to4(w.t().contiguous()).t().reshape(8, 4, 4).sum(-1) == 2).all()


def test_conv_groups_follow_in_kh_kw_flattening():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 4, 4)
    m = mask_2to4(w)
    flat = m.reshape(8, 48)  # [out, in*kh*kw], kw fastest (PyTorch memory order)
    assert (flat.reshape(8, 12, 4).sum(-1) == 2).all()
    # explicit expectation for one group: (in=0, kh=0, kw=0..3)
    g = w[0, 0, 0, :].abs()
    top = set(g.topk(2).indices.tolist())
    assert set(torch.nonzero(m[0, 0, 0, :]).flatten().tolist()) == top


def test_is_2to4():
    assert is_2to4(torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0]]))
    assert not is_2to4(torch.tensor([[1.0, 1, 1, 0]]))
    assert not is_2to4(torch.ones(2, 6))


def test_default_selection_blocks_and_patch_embed_head_dense():
    m = tiny_vit()
    sel = select_layers(m)
    assert "patch_embed.proj" in sel.selected
    assert "blocks.0.attn.qkv" in sel.selected and "blocks.1.mlp.fc2" in sel.selected
    assert "head" not in sel.selected
    assert len(sel.selected) == 1 + 2 * 4


def test_exclude_patterns_and_non_multiple_of_4_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(6, 8), nn.Linear(8, 4))
            self.head = nn.Linear(4, 2)

    m = Net()
    sel = select_layers(m, exclude=[r"blocks\.2"])
    assert sel.selected == ["blocks.0"]
    assert sel.skipped == {"blocks.1": "input dim 6 is not a multiple of 4"}


def _train_steps(m, n, lr=1e-2):
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(n):
        x = torch.randn(4, 3, 16, 16)
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_2to4_holds_after_pruning_training_and_reload(tmp_path):
    torch.manual_seed(0)
    m = tiny_vit()
    sparsify_(m)
    layers = compressed_layers(m)
    assert isinstance(layers["blocks.0.attn.qkv"], CompressedLinear)
    assert isinstance(layers["patch_embed.proj"], CompressedConv2d)
    assert all(check_2to4(m).values())
    masks = {n: l.weight_mask.clone() for n, l in layers.items()}
    _train_steps(m, 100)
    for n, l in layers.items():
        assert torch.equal(l.weight_mask, masks[n])
        assert (l.weight[~l.weight_mask] == 0).all(), f"{n}: pruned weights regrew"
        assert is_2to4(l.weight)
    # state_dict round trip into a fresh sparsified model (masks come from the file)
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "m.safetensors")
    m2 = tiny_vit()
    sparsify_(m2)  # different (magnitude) masks on fresh random weights...
    m2.load_state_dict(load_file(tmp_path / "m.safetensors"))  # ...replaced by the saved ones
    for n, l in compressed_layers(m2).items():
        assert torch.equal(l.weight_mask, masks[n])
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(m(x), m2(x))
    assert all(check_2to4(m2).values())


def test_mask_enforced_in_forward_even_if_weights_are_overwritten():
    m = tiny_vit()
    sparsify_(m)
    layer = compressed_layers(m)["blocks.0.mlp.fc1"]
    with torch.no_grad():
        layer.weight.fill_(1.0)  # e.g. foreign weights loaded
    assert is_2to4(layer.effective_weight())
    apply_masks_(m)
    assert is_2to4(layer.weight)


def test_mask_enforced_under_torch_compile():
    torch.manual_seed(0)
    m = tiny_vit()
    sparsify_(m)
    layer = compressed_layers(m)["blocks.0.mlp.fc1"]
    with torch.no_grad():
        layer.weight.add_(1.0)  # pruned entries now non-zero in the master weight
    cm = torch.compile(m, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    out = cm(x)
    assert torch.allclose(out, ref, atol=1e-5)
    with torch.no_grad():
        w_dense = layer.weight.clone()
        layer.weight_mask.fill_(True)
    assert not torch.allclose(m(x), ref)  # the mask really was doing work
    layer.weight_mask.copy_(mask_2to4(w_dense))


def test_sparsity_config_validates():
    with pytest.raises(ValueError, match="not supported"):
        SparsityConfig(pattern="4:8")
