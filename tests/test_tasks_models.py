"""Mask R-CNN (Swin + FPN) compressed the GPUSQ way: layer selection, QAT step, 2:4, feature KD."""

import copy

import pytest
import torch
from torch import nn

from gpusq import families
from gpusq.distill import FeatureHooks, feature_layers, feature_loss, measure_distortion
from gpusq.errors import GpusqError
from gpusq.layers import CompressedLayer, compressed_layers
from gpusq.quant import calibrate, quantize_
from gpusq.recipes import load_recipe
from gpusq.sparsity import SparsityConfig, check_2to4, sparsify_

SIZE = 64


def _batch(n=2, seed=0):
    """Images with bright squares as objects (boxes, masks, labels consistent)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.zeros(3, SIZE, SIZE)
        boxes, masks, labels = [], [], []
        for j in range(2):
            x, y = int(torch.randint(0, 20, (1,), generator=g)) + 32 * j, int(torch.randint(0, 40, (1,), generator=g))
            img[:, y: y + 16, x: x + 12] = 1.0
            m = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
            m[y: y + 16, x: x + 12] = 1
            boxes.append([x, y, x + 12, y + 16])
            masks.append(m)
            labels.append(j + 1)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.stack(masks)})
    return images, targets


@pytest.fixture
def model():
    torch.manual_seed(0)
    return families.build("maskrcnn_swin_test", "detection", num_classes=3, img_size=SIZE)


def test_unknown_model():
    with pytest.raises(GpusqError, match="unknown detection model 'maskrcnn_swin'.*did you mean: maskrcnn_swin_t"):
        families.build("maskrcnn_swin", "detection")


def test_compress_train_step_eval(model):
    images, targets = _batch()
    expected = {n for n, m in model.backbone.body.named_modules() if isinstance(m, nn.Linear) and ".blocks." in n
                and n.rsplit(".", 2)[-2:] in (["attn", "qkv"], ["attn", "proj"], ["mlp", "fc1"], ["mlp", "fc2"])}
    assert len(expected) == 16  # 4 stages x 1 block x (qkv, proj, fc1, fc2)
    recipe = load_recipe("int8")
    sel = sparsify_(model, SparsityConfig(include=families.MASKRCNN.include))
    assert set(sel.selected) == {f"backbone.body.{n}" for n in expected} and not sel.skipped
    quantize_(model, recipe.quant)
    calibrate(model, lambda m: m(images))
    layers = compressed_layers(model)
    assert set(layers) == set(sel.selected)
    # nothing outside the backbone's blocks was touched: FPN, RPN and RoI heads stay dense
    assert not any(isinstance(m, CompressedLayer) for m in (*model.backbone.fpn.modules(), *model.rpn.modules(),
                                                             *model.roi_heads.modules()))
    assert all(layer.weight_quant is not None and layer.input_quant is not None for layer in layers.values())
    assert all(float(q.input_quant.scale.detach()) > 0 for q in layers.values())

    name = "backbone.body.layers_1.blocks.0.mlp.fc1"
    before = layers[name].weight.detach().clone()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert layers[name].weight.grad is not None and layers[name].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(layers[name].weight.detach(), before)
    ok = check_2to4(model)
    assert set(ok) == set(sel.selected) and all(ok.values())

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o in out:
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["masks"].shape == (n, 1, SIZE, SIZE)
        assert torch.isfinite(o["boxes"]).all() and ((o["scores"] >= 0) & (o["scores"] <= 1)).all()


def test_feature_kd_hooks(model):
    images, _ = _batch(seed=1)
    teacher = copy.deepcopy(model).eval()
    names = feature_layers(model, families.MASKRCNN.features)
    assert names == ([f"backbone.body.layers_{i}.blocks.0" for i in range(4)]
                     + [f"backbone.fpn.layer_blocks.{i}" for i in range(4)])  # Swin blocks, then FPN outputs
    sparsify_(model, SparsityConfig(include=families.MASKRCNN.include))

    # The identical teacher gives zero distortion; the pruned student a positive one per block.
    same = measure_distortion(copy.deepcopy(teacher), teacher, [images], names)
    assert all(v == 0 for v in same.values())
    dist = measure_distortion(model, teacher, [images], names)
    assert all(v > 0 for v in dist.values())

    model.eval()
    with FeatureHooks(model, names) as hs, FeatureHooks(teacher, names) as ht:
        with torch.no_grad():
            teacher(images)
        model.backbone(torch.stack(images))  # the backbone alone is enough for feature KD
        assert set(hs.features) == set(ht.features) == set(names)
        loss = sum(feature_loss(hs.features[n], ht.features[n]) for n in names)
        loss.backward()
    fc1 = model.get_submodule("backbone.body.layers_0.blocks.0.mlp.fc1")
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    assert all(hs.features[n].shape == ht.features[n].shape for n in names)


def test_upernet_swin_compress_train_step():
    pytest.importorskip("transformers")
    with pytest.raises(GpusqError, match="unknown segmentation model 'upernet'"):
        families.build("upernet", "segmentation")
    torch.manual_seed(0)
    m = families.build("upernet_swin_test", "segmentation", num_labels=4)
    teacher = copy.deepcopy(m).eval()
    expected = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n.startswith("backbone.")
                and ".blocks." in n}
    assert len(expected) >= 16  # 4 stages x 1 block x (attention projections + 2 MLP linears)
    x = torch.rand(2, 3, SIZE, SIZE)
    y = torch.randint(0, 4, (2, SIZE, SIZE))
    recipe = load_recipe("int8")
    sel = sparsify_(m, SparsityConfig(include=families.UPERNET.include))
    assert set(sel.selected) == expected and not sel.skipped
    quantize_(m, recipe.quant)
    calibrate(m, lambda mm: mm(pixel_values=x))
    assert not any(isinstance(mod, CompressedLayer) for n, mod in m.named_modules() if not n.startswith("backbone."))
    names = feature_layers(m, families.UPERNET.features)
    assert len(names) == 4
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with FeatureHooks(m, names) as hs, FeatureHooks(teacher, names) as ht:
        with torch.no_grad():
            teacher(pixel_values=x)
        out = m(pixel_values=x, labels=y)
        feat = sum(feature_loss(hs.features[n], ht.features[n]) for n in names)
    assert out.logits.shape == (2, 4, SIZE, SIZE) and float(feat.detach()) > 0
    (out.loss + feat).backward()
    opt.step()
    ok = check_2to4(m)
    assert set(ok) == expected and all(ok.values())
    m.eval()
    with torch.no_grad():
        assert m(pixel_values=torch.rand(1, 3, 80, 96)).logits.shape == (1, 4, 80, 96)
