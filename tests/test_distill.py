import math

import pytest
import torch

from gpusq.distill import (
    DistillationLoss,
    DistillConfig,
    FeatureHooks,
    feature_layers,
    layer_weights_from_distortion,
    measure_distortion,
    soft_loss,
)
from gpusq.sparsity import sparsify_
from tests.helpers import tiny_vit


def test_soft_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert float(soft_loss(s, t, T)) == pytest.approx(kl * T * T, rel=1e-5)


def test_combined_loss_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    fs = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    ft = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    loss = DistillationLoss(DistillConfig(temperature=1.0), {"a": 0.5, "b": 1.5})
    total, parts = loss(s, y, t, fs, ft)
    ce = torch.nn.functional.cross_entropy(s, y)
    kl = (torch.softmax(t, 1) * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum(1).mean()
    feat = 0.5 * (fs["a"] - ft["a"]).pow(2).mean() + 1.5 * (fs["b"] - ft["b"]).pow(2).mean()
    assert float(total) == pytest.approx(float(ce + 10 * kl + 5 * feat), rel=1e-5)
    assert set(parts) == {"hard", "soft", "feat"}


def test_defaults_are_the_papers():
    c = DistillConfig()
    assert (c.alpha, c.beta, c.gamma) == (1.0, 10.0, 5.0)


def test_layer_weights_sum_to_layer_count_and_follow_distortion():
    w = layer_weights_from_distortion({"a": 1.0, "b": 3.0, "c": 0.0, "d": 4.0})
    assert sum(w.values()) == pytest.approx(4)
    assert w == pytest.approx({"a": 0.5, "b": 1.5, "c": 0.0, "d": 2.0})
    assert layer_weights_from_distortion({"a": 1.0, "b": 3.0}, enabled=False) == {"a": 1.0, "b": 1.0}


def test_feature_hooks_align_teacher_and_student_by_name():
    torch.manual_seed(0)
    teacher = tiny_vit()
    import copy

    student = copy.deepcopy(teacher)
    sparsify_(student)
    names = feature_layers(teacher)
    assert names == ["blocks.0", "blocks.1"] == feature_layers(student)
    x = torch.randn(2, 3, 16, 16)
    with FeatureHooks(teacher, names) as ht, FeatureHooks(student, names) as hs:
        teacher(x)
        student(x)
        assert ht.features["blocks.1"].shape == hs.features["blocks.1"].shape == (2, 17, 32)
    d = measure_distortion(student, teacher, [x], names)
    assert all(v > 0 for v in d.values())
    d_same = measure_distortion(teacher, teacher, [x], names)
    assert all(v == 0 for v in d_same.values())


def test_paper_importance_weights_follow_the_absolute_feature_loss():
    from gpusq.distill import layer_weights

    rel = {"a": 0.4, "b": 0.1, "c": 0.1}  # relative distortion: block a suffered most of its signal
    mse = {"a": 0.01, "b": 0.05, "c": 0.14}  # absolute stage-1 feature loss: block c (large activations) most
    w_rel = layer_weights(rel, mse, DistillConfig())
    w_pap = layer_weights(rel, mse, DistillConfig(importance="paper"))
    assert w_rel == pytest.approx({"a": 2.0, "b": 0.5, "c": 0.5})
    assert w_pap == pytest.approx({"a": 0.15, "b": 0.75, "c": 2.1})  # L * share of the stage-1 feature loss
    assert sum(w_pap.values()) == pytest.approx(3)
    for imp in ("relative", "paper"):
        assert layer_weights(rel, mse, DistillConfig(importance=imp, layer_weighting=False)) == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(ValueError, match="distill.importance must be one of relative, paper"):
        DistillConfig(importance="absolute")


def test_feature_errors_are_the_stage1_feature_loss_per_layer():
    import copy

    from gpusq.distill import feature_loss, measure_feature_errors

    torch.manual_seed(0)
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    sparsify_(student)
    names = feature_layers(teacher)
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    rel, mse = measure_feature_errors(student, teacher, [x1, x2], names)
    assert rel == measure_distortion(student, teacher, [x1, x2], names)
    with FeatureHooks(teacher, names) as ht, FeatureHooks(student, names) as hs, torch.no_grad():
        expect = dict.fromkeys(names, 0.0)
        for x in (x1, x2):  # equal-sized batches: the mean of the batch MSEs
            teacher.eval()(x)
            student.eval()(x)
            for n in names:
                expect[n] += float(feature_loss(hs.features[n], ht.features[n])) / 2
    assert mse == pytest.approx(expect, rel=1e-5)
    energy = {n: mse[n] / rel[n] for n in names}  # mean squared teacher activation per layer
    assert energy["blocks.1"] != pytest.approx(energy["blocks.0"], rel=1e-3)  # so the two weightings differ
