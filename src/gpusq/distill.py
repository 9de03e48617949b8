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

``Distiller`` is all of this as one object for one student/teacher pair (the engine's stages use it;
so can any training loop): the criterion ``{(student_layer, teacher_layer): loss}`` with its forward
hooks, the logit-KD term, the per-layer weights, the loss balancing and the importance measurement.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpusq.errors import GpusqError, close_matches

# Transformer blocks in timm ViT/DeiT ("blocks.3") and Swin ("layers.1.blocks.0").
DEFAULT_FEATURE_PATTERN = r"(^|\.)blocks\.\d+$"
IMPORTANCE_MODES = ("relative", "paper")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student feature, teacher feature) -> loss
LogitKD = Callable[[Any, Any, float], torch.Tensor | None]  # (student out, teacher out, temperature) -> loss
Criterion = Mapping[tuple[str, str], LossFn]  # (student layer, teacher layer) -> feature loss


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
    student: nn.Module, teacher: nn.Module, batches: Iterable[Any], names: Sequence[str] | Sequence[tuple[str, str]],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer over ``batches``: the relative distortion ``||S-T||^2 / ||T||^2`` and the mean
    squared error ``MSE(S, T)`` (``feature_loss``, as stage 1's feature term computes it).
    ``names``: layers of the same name in both models, or (student layer, teacher layer) pairs; the
    results are keyed by the student layer. ``forward(model, batch)`` runs a model on a batch
    (default ``model(batch)``)."""
    forward = forward or (lambda m, b: m(b))
    pairs = [(n, n) if isinstance(n, str) else (n[0], n[1]) for n in names]
    keys = [sn for sn, _ in pairs]
    num = dict.fromkeys(keys, 0.0)
    den = dict.fromkeys(keys, 0.0)
    count = dict.fromkeys(keys, 0)
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    with FeatureHooks(student, _unique(keys)) as hs, FeatureHooks(teacher, _unique(t for _, t in pairs)) as ht:
        for x in batches:
            forward(student, x)
            forward(teacher, x)
            for sn, tn in pairs:
                s, t = hs.features[sn].float(), ht.features[tn].float()
                num[sn] += float((s - t).pow(2).sum())
                den[sn] += float(t.pow(2).sum())
                count[sn] += t.numel()
    student.train(was[0])
    teacher.train(was[1])
    return ({n: num[n] / max(den[n], 1e-12) for n in keys},
            {n: num[n] / max(count[n], 1) for n in keys})


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


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
    parts: dict[str, torch.Tensor] = {"hard": hard}
    if config.beta > 0 and soft is not None:
        parts["soft"] = soft
    if config.gamma > 0 and names and student_feats and teacher_feats:
        parts["feat"] = _feature_term({(n, n): feature_loss for n in names}, student_feats, teacher_feats,
                                      layer_weights or {})
    return balance(config, parts), parts


def _feature_term(criterion: Mapping[tuple[str, str], LossFn], student_feats: dict[str, torch.Tensor],
                  teacher_feats: dict[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_l w_l * loss_l(S_l, T_l)`` over the pairs, weights keyed by the student layer (default 1)."""
    return sum(weights.get(s, 1.0) * fn(student_feats[s], teacher_feats[t]) for (s, t), fn in criterion.items())


def balance(config: DistillConfig, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The static loss balancer: ``alpha * hard (+ beta * soft) (+ gamma * feat)`` over the terms present."""
    total = config.alpha * parts["hard"]
    if "soft" in parts:
        total = total + config.beta * parts["soft"]
    if "feat" in parts:
        total = total + config.gamma * parts["feat"]
    return total


def _check_layers(model: nn.Module, wanted: list[str], who: str) -> None:
    names = [n for n, _ in model.named_modules()]
    for name in set(wanted) - set(names):
        near = close_matches(name, names)
        raise GpusqError(f"Distiller criterion: the {who} has no layer {name!r}"
                         + (f" (close matches: {near})" if near else ""))


class Distiller:
    """GPUSQ's knowledge distillation for one student/teacher pair, in the engine or in your own loop.

    Learned from ModelOpt's ``mtd.convert(student, {"teacher_model": t, "criterion": {(s_layer,
    t_layer): loss}, "loss_balancer": ...})``, kept to what the method needs and without wrapping the
    model: the ``criterion`` maps (student layer, teacher layer) to a feature loss (default: the
    layers matching ``config.features`` in both, ``feature_loss`` = MSE; a list of names pairs each
    layer with its namesake); forward hooks on those layers record their outputs while both models
    run; ``loss`` turns the task's hard loss, the logit-KD term (``logit_kd(student_out,
    teacher_out, T)``, default ``soft_loss`` on class logits) and the features into the total and its
    parts, balanced by ``balancer`` (default ``balance``: ``alpha * hard + beta * soft + gamma *
    sum_l w_l feat_l``, the paper's). ``weights`` are the per-layer importance weights (keyed by
    student layer; default 1). Feature hooks exist only when ``gamma > 0`` (no cost otherwise); the
    layers are still known, so ``measure`` can weigh the next stage. The teacher is frozen.

    The layer-importance step (the method's weighting): after stage 1, ``measure`` the sparse
    student's damage per layer and give stage 2's distiller ``importance(*errors)`` as weights.

    Example (a stage of KD fine-tuning in your own loop)::

        kd = Distiller(student, teacher, DistillConfig(beta=10, gamma=5))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        with kd:                                              # hooks removed at the end
            for x, y in loader:
                t_logits = kd.teacher_forward(x)              # no_grad, eval; fills teacher features
                logits = student(x)                           # fills student features
                loss, parts = kd.loss(F.cross_entropy(logits, y), logits, t_logits)
                opt.zero_grad(); loss.backward(); opt.step()  # parts: hard / soft / feat, for logs
            errors = kd.measure([x for x, _ in calib])        # then weights for the next stage:
        weights = kd.importance(*errors)                      # Distiller(..., weights=weights)

    Hooks on a module that is later replaced (``sparsify_`` / ``quantize_`` swap GEMM layers) are
    lost with it: build the distiller after compressing the student.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig | None = None, *,
                 criterion: Criterion | Sequence[str] | None = None, weights: Mapping[str, float] | None = None,
                 logit_kd: LogitKD | None = soft_loss,
                 balancer: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None):
        self.student, self.teacher = student, teacher
        self.config = config or DistillConfig()
        if criterion is None:
            criterion = feature_layers(teacher, self.config.features)
        if not isinstance(criterion, Mapping):
            criterion = {(n, n): feature_loss for n in criterion}
        self.criterion: dict[tuple[str, str], LossFn] = dict(criterion)
        _check_layers(student, [s for s, _ in self.criterion], "student")  # here, not at the first forward
        _check_layers(teacher, [t for _, t in self.criterion], "teacher")
        self.weights: dict[str, float] = dict(weights or {})
        self.logit_kd = logit_kd
        self.balancer = balancer
        teacher.eval().requires_grad_(False)
        self._hs: FeatureHooks | None = None
        self._ht: FeatureHooks | None = None
        if self.distils_features:
            self._hs = FeatureHooks(student, _unique(s for s, _ in self.criterion))
            self._ht = FeatureHooks(teacher, _unique(t for _, t in self.criterion))

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.criterion)

    @property
    def distils_features(self) -> bool:
        """Feature terms are computed (``gamma > 0`` and at least one layer pair)."""
        return self.config.gamma > 0 and bool(self.criterion)

    @property
    def needs_teacher(self) -> bool:
        """A step must run the teacher: for the logit term or for the teacher's features."""
        return self.config.beta > 0 or self.distils_features

    @torch.no_grad()
    def teacher_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher on the student's input (eval mode, no graph); its hooked layers fill."""
        self.teacher.eval()
        return self.teacher(*args, **kwargs)

    def loss(self, hard: torch.Tensor, student_out: Any = None, teacher_out: Any = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, parts) after one forward of each model: ``hard`` is the task's own loss;
        ``student_out`` / ``teacher_out`` what ``logit_kd`` compares (class logits by default);
        the features come from the hooks (then released: they hold activations). ``parts`` has
        ``hard``, and ``soft`` / ``feat`` when those terms are on."""
        c = self.config
        parts: dict[str, torch.Tensor] = {"hard": hard}
        if c.beta > 0 and self.logit_kd is soft_loss and (student_out is None or teacher_out is None):
            raise GpusqError("Distiller.loss: beta > 0 needs both models' logits: loss(hard, logits, "
                             "teacher_logits) (or beta=0 for feature KD alone)")
        if c.beta > 0 and self.logit_kd is not None:
            soft = self.logit_kd(student_out, teacher_out, c.temperature)
            if soft is not None:  # a task without a logit-KD term returns None
                parts["soft"] = soft
        if self._hs is not None and self._ht is not None:
            sf, tf = self._hs.features, self._ht.features
            if sf and tf:
                parts["feat"] = _feature_term(self.criterion, sf, tf, self.weights)
            self._hs.clear()
            self._ht.clear()
        total = self.balancer(parts) if self.balancer is not None else balance(c, parts)
        return total, parts

    def measure(self, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None,
                ) -> tuple[dict[str, float], dict[str, float]]:
        """The student's damage per layer pair on ``batches`` (``measure_feature_errors``): relative
        distortion and feature MSE, keyed by student layer; what ``importance`` turns into weights."""
        if not self.criterion:
            return {}, {}
        return measure_feature_errors(self.student, self.teacher, batches, self.pairs, forward)

    def importance(self, distortion: dict[str, float], feature_mse: dict[str, float] | None = None,
                   ) -> dict[str, float]:
        """The next stage's per-layer weights from this stage's damage (``layer_weights``: uniform
        without ``layer_weighting``, else by ``importance: relative | paper``)."""
        return layer_weights(distortion, feature_mse, self.config)

    def close(self) -> None:
        """Remove the hooks (the models are left as they were)."""
        for h in (self._hs, self._ht):
            if h is not None:
                h.remove()
        self._hs = self._ht = None

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
