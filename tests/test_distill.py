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


# -- Distiller: the reusable KD object ---------------------------------------------------------------
def _pair():
    import copy

    torch.manual_seed(0)
    teacher = tiny_vit().eval()
    student = copy.deepcopy(teacher)
    sparsify_(student)
    return student.train(), teacher


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_distiller_loss_is_the_functional_loss_bit_for_bit():
    """Hooks, logit KD and weighted features give exactly ``kd_total`` on the same captures."""
    from gpusq.distill import Distiller, kd_total

    student, teacher = _pair()
    cfg = DistillConfig(temperature=2.0, beta=3.0)
    w = {"blocks.0": 0.5, "blocks.1": 1.5}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    kd = Distiller(student, teacher, cfg, weights=w)
    assert kd.pairs == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")] and kd.needs_teacher
    t_logits = kd.teacher_forward(x)
    logits = student(x)
    hard = torch.nn.functional.cross_entropy(logits, y)
    with FeatureHooks(teacher, ["blocks.0", "blocks.1"]) as ht, FeatureHooks(student, ["blocks.0", "blocks.1"]) as hs:
        teacher(x)
        student(x)
        expect, expect_parts = kd_total(cfg, hard, soft_loss(logits, t_logits, 2.0), hs.features, ht.features,
                                        ["blocks.0", "blocks.1"], w)
    total, parts = kd.loss(hard, logits, t_logits)
    assert torch.equal(total, expect) and parts.keys() == expect_parts.keys() == {"hard", "soft", "feat"}
    assert all(torch.equal(parts[k], expect_parts[k]) for k in parts)
    total.backward()  # the features keep their graph until the loss is built
    assert student.blocks[0].mlp.fc1.weight.grad is not None
    kd.close()
    assert _hooks(student) == _hooks(teacher) == 0


def test_distiller_in_a_user_training_loop():
    """The docstring's example: a few steps of a plain loop, then the importance for the next stage."""
    import torch.nn.functional as F

    from gpusq.distill import Distiller

    student, teacher = _pair()
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    kd = Distiller(student, teacher, DistillConfig(beta=10, gamma=5))
    with kd:
        for x, y in loader:
            t_logits = kd.teacher_forward(x)
            logits = student(x)
            loss, parts = kd.loss(F.cross_entropy(logits, y), logits, t_logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert set(parts) == {"hard", "soft", "feat"} and torch.isfinite(loss)
        distortion, mse = kd.measure([x for x, _ in loader])
    assert _hooks(student) == 0 and not any(p.requires_grad for p in teacher.parameters())
    weights = kd.importance(distortion, mse)
    assert set(weights) == {"blocks.0", "blocks.1"} and sum(weights.values()) == pytest.approx(2)
    assert weights == pytest.approx(layer_weights_from_distortion(distortion))
    paper = Distiller(student, teacher, DistillConfig(importance="paper"))
    assert paper.importance(distortion, mse) == pytest.approx(layer_weights_from_distortion(mse))
    paper.close()


def test_distiller_criterion_pairs_other_layers_and_balancer():
    """ModelOpt-style criterion: any (student layer, teacher layer) pair with its own loss; a custom
    balancer gets the parts; feature hooks only when gamma > 0; a wrong layer name is one line."""
    from gpusq.distill import Distiller, feature_loss
    from gpusq.errors import GpusqError

    student, teacher = _pair()
    x = torch.randn(2, 3, 16, 16)
    l1 = lambda s, t: (s.float() - t.float()).abs().mean()  # noqa: E731
    kd = Distiller(student, teacher, DistillConfig(beta=0), criterion={("blocks.1", "blocks.0"): l1},
                   balancer=lambda parts: parts["hard"] + 2 * parts["feat"])
    assert _hooks(student) == 1 and _hooks(teacher) == 1
    with FeatureHooks(teacher, ["blocks.0"]) as ht, FeatureHooks(student, ["blocks.1"]) as hs:
        kd.teacher_forward(x)
        student(x)
        total, parts = kd.loss(torch.tensor(1.0))
        assert torch.equal(parts["feat"], l1(hs.features["blocks.1"], ht.features["blocks.0"]))
    assert "soft" not in parts and torch.equal(total, 1 + 2 * parts["feat"])
    kd.close()
    off = Distiller(student, teacher, DistillConfig(beta=0, gamma=0))
    assert off.pairs == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")]  # still measured for importance
    assert _hooks(student) == 0 and not off.needs_teacher and not off.distils_features
    assert set(off.measure([x])[0]) == {"blocks.0", "blocks.1"}
    with pytest.raises(GpusqError, match=r"the teacher has no layer 'blocks\.7' \(close matches: blocks\.1, blocks\.0"):
        Distiller(student, teacher, criterion={("blocks.0", "blocks.7"): feature_loss})
    with pytest.raises(GpusqError, match="beta > 0 needs both models' logits"):
        Distiller(student, teacher, DistillConfig(gamma=0)).loss(torch.tensor(1.0))
