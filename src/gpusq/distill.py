"""Knowledge distillation losses (GPUSQ-ViT steps 2 and 3).

Total loss, with the paper's defaults alpha=1, beta=10, gamma=5::

    L = alpha * CE(student, labels)
      + beta  * T^2 * KL(softmax(teacher/T) || softmax(student/T))
      + gamma * sum_l w_l * MSE(student_feat_l, teacher_feat_l)

Features are the outputs of the transformer blocks, captured with forward hooks on modules of the
same name in teacher and student (a compressed student keeps the teacher's module names).

Layer-importance weights (the method's "sparse-distillation-aware" weighting): after sparse
fine-tuning (stage 1), measure each block's relative feature distortion against the dense teacher
on a few batches,

    d_l = ||F_l^sparse - F_l^teacher||^2 / ||F_l^teacher||^2,

and weight stage 2's feature terms by ``w_l = L * d_l / sum_k d_k`` (they sum to the number of
layers L). Blocks that suffered most from pruning get the most attention during QAT. With
weighting off, ``w_l = 1`` for every layer (the ablation).

Two measures of "suffered" (``distill.importance``):

* ``relative`` (default): ``d_l`` as above, the distortion relative to the teacher's feature energy.
  Every block counts by how much of its signal pruning changed, whatever its activation scale.
* ``paper``: ``d_l = MSE(F_l^sparse, F_l^teacher)``, the absolute stage-1 feature-distillation loss
  of block l (the very term stage 1 minimized), so ``w_l`` is block l's share of the stage-1 feature
  loss. This is how GPUSQ-ViT describes its "sparse-distillation-aware weight factor": each critical
  layer's weight comes from its feature-distillation loss in the 2:4 pruning stage and stands for how
  much that layer's error influences the final accuracy. The residual stream of a ViT grows with
  depth, so absolute errors (and these weights) favour the later blocks, the ones the paper finds most
  worth mimicking. gpusq scales the shares by L (a ratio summing to 1 is the same with ``gamma / L``)
  so that ``gamma`` means the same for all three settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Transformer blocks in timm ViT/DeiT ("blocks.3") and Swin ("layers.1.blocks.0").
DEFAULT_FEATURE_PATTERN = r"(^|\.)blocks\.\d+$"
IMPORTANCE_MODES = ("relative", "paper")


@dataclass
class DistillConfig:
    alpha: float = 1.0
    beta: float = 10.0
    gamma: float = 5.0
    temperature: float = 1.0
    features: str = DEFAULT_FEATURE_PATTERN
    layer_weighting: bool = True
    importance: str = "relative"  # how stage-1 damage is measured for the weights: relative | paper

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"distill.importance must be one of {', '.join(IMPORTANCE_MODES)}, "
                             f"got {self.importance!r}")
        for k in ("alpha", "beta", "gamma"):
            if getattr(self, k) < 0:
                raise ValueError(f"distill.{k} must be >= 0, got {getattr(self, k)}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        re.compile(self.features)


def hard_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2-scaled KL(teacher || student) of temperature-softened distributions, batch mean."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def feature_layers(model: nn.Module, pattern: str = DEFAULT_FEATURE_PATTERN) -> list[str]:
    """Names of the modules whose outputs are distilled (the transformer blocks by default)."""
    rx = re.compile(pattern)
    return [n for n, _ in model.named_modules() if n and rx.search(n)]


class FeatureHooks:
    """Records the outputs of named modules during a forward. Use as a context manager."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            mod = model.get_submodule(name)
            self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def fn(_mod, _inp, out):
            self.features[name] = out[0] if isinstance(out, (tuple, list)) else out

        return fn

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def layer_weights_from_distortion(distortion: dict[str, float], enabled: bool = True) -> dict[str, float]:
    """``w_l = L * d_l / sum_k d_k`` (see the module docstring); all ones when disabled."""
    n = len(distortion)
    total = sum(distortion.values())
    if not enabled or n == 0 or total <= 0:
        return {k: 1.0 for k in distortion}
    return {k: n * v / total for k, v in distortion.items()}


def layer_weights(distortion: dict[str, float], feature_mse: dict[str, float] | None,
                  config: DistillConfig) -> dict[str, float]:
    """Stage 2's per-layer feature weights for ``config``: uniform without ``layer_weighting``, else
    from the relative distortion (``importance: relative``) or the absolute stage-1 feature MSE
    (``importance: paper``); either way they sum to the number of layers."""
    if config.importance == "paper" and config.layer_weighting:
        if feature_mse is None:
            raise ValueError("distill.importance 'paper' needs the stage-1 feature MSE per layer")
        return layer_weights_from_distortion(feature_mse, True)
    return layer_weights_from_distortion(distortion, config.layer_weighting)


@torch.no_grad()
def measure_distortion(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Any], names: list[str],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, float]:
    """Relative feature distortion d_l of ``student`` vs ``teacher`` per layer over ``batches``."""
    return measure_feature_errors(student, teacher, batches, names, forward)[0]


@torch.no_grad()
def measure_feature_errors(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Any], names: list[str],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer over ``batches``: the relative distortion ``||S-T||^2 / ||T||^2`` and the mean
    squared error ``MSE(S, T)`` (``feature_loss``, as stage 1's feature term computes it).
    ``forward(model, batch)`` runs a model on a batch (default ``model(batch)``)."""
    forward = forward or (lambda m, b: m(b))
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    with FeatureHooks(student, names) as hs, FeatureHooks(teacher, names) as ht:
        for x in batches:
            forward(student, x)
            forward(teacher, x)
            for n in names:
                s, t = hs.features[n].float(), ht.features[n].float()
                num[n] += float((s - t).pow(2).sum())
                den[n] += float(t.pow(2).sum())
                count[n] += t.numel()
    student.train(was[0])
    teacher.train(was[1])
    return ({n: num[n] / max(den[n], 1e-12) for n in names},
            {n: num[n] / max(count[n], 1) for n in names})


class DistillationLoss(nn.Module):
    """Combined GPUSQ loss. Call with the student/teacher logits and captured features."""

    def __init__(self, config: DistillConfig, layer_weights: dict[str, float] | None = None):
        super().__init__()
        self.config = config
        self.layer_weights = dict(layer_weights or {})

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        student_feats: dict[str, torch.Tensor] | None = None,
        teacher_feats: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        soft = soft_loss(student_logits, teacher_logits, c.temperature) \
            if (c.beta > 0 and teacher_logits is not None) else None
        total, parts = kd_total(c, hard_loss(student_logits, labels), soft, student_feats, teacher_feats,
                                list(teacher_feats or {}), self.layer_weights)
        return total, {k: float(v.detach()) for k, v in parts.items()}


def kd_total(config: DistillConfig, hard: torch.Tensor, soft: torch.Tensor | None,
             student_feats: dict[str, torch.Tensor] | None, teacher_feats: dict[str, torch.Tensor] | None,
             names: list[str], layer_weights: dict[str, float] | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * hard + beta * soft + gamma * sum_l w_l * MSE(S_l, T_l)`` (the module docstring's L),
    for any task: ``hard`` is the task's own loss, ``soft`` its logit-KD term (None: no term)."""
    c = config
    w = layer_weights or {}
    parts: dict[str, torch.Tensor] = {"hard": hard}
    total = c.alpha * hard
    if c.beta > 0 and soft is not None:
        parts["soft"] = soft
        total = total + c.beta * soft
    if c.gamma > 0 and names and student_feats and teacher_feats:
        feat = sum(w.get(n, 1.0) * feature_loss(student_feats[n], teacher_feats[n]) for n in names)
        parts["feat"] = feat
        total = total + c.gamma * feat
    return total, parts
