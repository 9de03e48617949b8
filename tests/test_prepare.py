"""``prepare_`` (a recipe without training) and the ``filter_fn`` selection shared by ``sparsify_`` and
``quantize_``."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from gpusq import prepare_
from gpusq.layers import compressed_layers
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import load_recipe
from gpusq.sparsity import sparsify_

TINY = dict(img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=64, num_heads=2)


def _model():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY).eval()


def test_prepare_is_the_manual_sequence():
    """Same state, bit for bit, as sparsify_ -> quantize_ -> calibrate by hand; the stages are recorded."""
    x = torch.randn(4, 3, 32, 32)
    r = load_recipe("int8")
    a, b = _model(), _model()
    done = prepare_(a, r, calibrate_fn=lambda m: m(x))
    sparsify_(b, r.sparsity)
    quantize_(b, r.quant)
    calibrate(b, lambda m: m(x))
    assert done.stages == ["sparsify", "quantize", "calibrate"] and a.gpusq_prepared == done.stages
    assert done.layers == list(compressed_layers(b)) and len(done.layers) == 1 + 2 * 4  # patch embed + blocks
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("recipe,stages", [("sparse", ["sparsify"]), ("int4", ["sparsify", "quantize"])])
def test_prepare_records_what_ran(recipe, stages):
    m = _model()
    assert prepare_(m, load_recipe(recipe)).stages == stages  # no calibrate_fn: scales left uncalibrated


def test_one_filter_fn_for_sparsify_and_quantize():
    """torchao-style selection: the same callable picks the same layers for both, instead of the patterns."""
    def only_fc1(name, mod):
        return name.endswith("mlp.fc1")

    a = _model()
    sel = sparsify_(a, load_recipe("int8").sparsity, filter_fn=only_fc1)
    assert sel.selected == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    b = _model()
    assert quantize_(b, load_recipe("int8").quant, filter_fn=only_fc1) == sel.selected
    assert list(compressed_layers(b)) == sel.selected
    c = _model()
    assert prepare_(c, load_recipe("int8"), filter_fn=only_fc1).layers == sel.selected
    with pytest.raises(ValueError, match="not both"):
        quantize_(copy.deepcopy(b), load_recipe("int8").quant, layers=sel.selected, filter_fn=only_fc1)
