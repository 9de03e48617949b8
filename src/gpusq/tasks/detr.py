"""DETR and Deformable-DETR (Hugging Face transformers) for ``gpusq train|compress|eval --task detection``.

Built offline from configs: the backbone is transformers' own ``ResNetConfig`` (no timm, no hub),
``use_pretrained_backbone=False``; weights are optional (``gpusq compress --teacher FILE --model NAME``
loads the user's state dict). Deformable-DETR runs its pure-PyTorch multi-scale deformable attention
(``disable_custom_kernels=True``), so nothing is compiled on any machine.

GPUSQ compresses the transformer: every Linear inside an encoder or decoder layer (self-attention
q/k/v/out, DETR's cross-attention q/k/v/out, Deformable's ``value_proj``, ``output_proj``,
``sampling_offsets``, ``attention_weights``, and the FFN ``fc1``/``fc2``). The ResNet backbone,
``input_projection``, the query embeddings and the heads (class classifier, box MLP) stay dense.
Names differ across transformers versions (``out_proj`` vs ``o_proj``, ``fc1`` vs ``mlp.fc1``),
hence ``DETR_INCLUDE`` matches any Linear below ``model.(encoder|decoder).layers.N``.

KD (see ``gpusq.tasks.pipeline.Task``): the hard loss is the model's own Hungarian-matched set loss;
logit KD is applied on the queries the same Hungarian matcher assigned to ground-truth objects only
(the unmatched queries are trained towards "no object", which carries little of the teacher's
knowledge and would swamp the matched terms 100 : 1). DETR: softmax KL over the K classes + the
no-object class. Deformable-DETR classifies with independent sigmoids (focal loss, no no-object
class): the KD term is the per-class Bernoulli KL, summed over classes, averaged over matched queries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpusq.distill import soft_loss
from gpusq.errors import GpusqError
from gpusq.tasks.coco import CocoDetection, coco_folder

# Every Linear inside an encoder / decoder layer (select_layers only picks Linear / Conv2d modules).
DETR_INCLUDE = (r"^model\.(encoder|decoder)\.layers\.\d+\..+",)
# Feature KD taps: each encoder layer's output (tokens of the image) and each decoder layer's (queries).
DETR_FEATURES = r"^model\.(encoder|decoder)\.layers\.\d+$"

# What the DETR image processor normalizes with (ImageNet statistics).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

R50 = dict(embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3), layer_type="bottleneck")
RESNET_TINY = dict(embedding_size=16, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), layer_type="basic")
# DETR reads only the backbone's last stage: 2 stages (stride 8) keep an 8x8 map on a 64 px canvas
# (4 stages would leave 2x2 tokens to localize 20 px digits with).
RESNET_TINY_S8 = dict(embedding_size=16, hidden_sizes=(32, 64), depths=(1, 1), layer_type="basic")
TINY = dict(num_queries=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GpusqError("DETR / Deformable-DETR need 'transformers' (pip install 'gpusq[dense]')") from None
    return transformers


def _config(cls, backbone: dict, out_features: list[str], kwargs: dict[str, Any]):
    """A DETR-family config on a random-init transformers ResNet; a one-line error for an unknown field."""
    tf = _transformers()
    known = set(cls().to_dict()) | {"num_labels"}  # a property, not a to_dict key
    bad = sorted(k for k in kwargs if k not in known)
    if bad:
        raise GpusqError(f"unknown {cls.__name__} field(s): {', '.join(bad)}")
    bb = tf.ResNetConfig(num_channels=3, **{k: list(v) if isinstance(v, tuple) else v for k, v in backbone.items()},
                         out_features=out_features)
    return cls(use_timm_backbone=False, backbone_config=bb, backbone=None, use_pretrained_backbone=False, **kwargs)


def _trainable(model: nn.Module) -> nn.Module:
    """transformers freezes (part of) the ResNet, expecting pretrained weights; from random init all of it trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def detr(num_labels: int = 91, backbone: dict | None = None, **kwargs: Any) -> nn.Module:
    """``DetrForObjectDetection`` (random init). ``num_labels`` = K object classes (no-object is added)."""
    tf = _transformers()
    backbone = backbone or R50
    last = f"stage{len(backbone['depths'])}"
    cfg = _config(tf.DetrConfig, backbone, [last], {"num_labels": num_labels, **kwargs})
    return _trainable(tf.DetrForObjectDetection(cfg))


def deformable_detr(num_labels: int = 91, backbone: dict | None = None, **kwargs: Any) -> nn.Module:
    """``DeformableDetrForObjectDetection`` (random init, single stage, no box refinement), 3 ResNet levels
    (strides 8/16/32) + one extra stride-64 level, pure-PyTorch deformable attention."""
    tf = _transformers()
    kw = {"num_labels": num_labels, "disable_custom_kernels": True, **kwargs}
    cfg = _config(tf.DeformableDetrConfig, backbone or R50, ["stage2", "stage3", "stage4"], kw)
    return _trainable(tf.DeformableDetrForObjectDetection(cfg))


def _detr_r50(num_labels: int = 91, **kw: Any) -> nn.Module:
    """DETR-R50 as in the paper (6+6 layers, d_model 256, 100 queries, auxiliary decoding losses)."""
    return detr(num_labels, **{"auxiliary_loss": True, **kw})


def _deformable_detr_r50(num_labels: int = 91, **kw: Any) -> nn.Module:
    """Deformable-DETR-R50 (6+6 layers, d_model 256, 300 queries, 4 levels, auxiliary losses)."""
    return deformable_detr(num_labels, **{"auxiliary_loss": True, **kw})


def _detr_test(num_labels: int = 10, **kw: Any) -> nn.Module:
    """CPU-sized DETR for 64 px canvases: 2-stage basic ResNet (stride 8, 64 wide), 1+1 layers, d_model 32,
    16 queries."""
    return detr(num_labels, backbone=RESNET_TINY_S8, **{**TINY, **kw})


def _deformable_detr_test(num_labels: int = 10, **kw: Any) -> nn.Module:
    """CPU-sized Deformable-DETR: as ``detr_test`` with 2 decoder layers (transformers 5 cannot tie the
    per-layer heads of a 1-layer decoder) and 2 sampling points."""
    base = {**TINY, "decoder_layers": 2, "encoder_n_points": 2, "decoder_n_points": 2}
    return deformable_detr(num_labels, backbone=RESNET_TINY, **{**base, **kw})


DETR_MODELS = {"detr_r50": _detr_r50, "deformable_detr_r50": _deformable_detr_r50,
               "detr_test": _detr_test, "deformable_detr_test": _deformable_detr_test}


def is_sigmoid(model: nn.Module) -> bool:
    """Deformable-DETR classifies with per-class sigmoids (focal loss); DETR with a softmax incl. no-object."""
    return model.config.model_type != "detr"


# -- data ------------------------------------------------------------------------------------------
def load_coco(path: str | Path) -> CocoDetection:
    """COCO-format data, boxes only (DETR has no mask head: masks are not decoded)."""
    return coco_folder(path, masks=False)


def to_detr_labels(target: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """Our target (``boxes`` xyxy absolute, ``labels`` 1..K) → DETR's (``class_labels`` 0..K-1, ``boxes``
    cx cy w h normalized by the image's own size, as the sine position embedding is over the unpadded area)."""
    b = target["boxes"].float()
    scale = torch.tensor([width, height, width, height], dtype=b.dtype, device=b.device)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
    return {"class_labels": target["labels"].long() - 1, "boxes": cxcywh / scale}


def collate(batch: list) -> dict[str, Any]:
    """(image [3,H,W] in [0,1], target) pairs → normalized ``pixel_values`` zero-padded bottom/right to the
    batch max, ``pixel_mask`` (1 on real pixels), DETR ``labels``, image sizes and ids (for evaluation)."""
    h = max(x.shape[1] for x, _ in batch)
    w = max(x.shape[2] for x, _ in batch)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    pixels = torch.zeros(len(batch), 3, h, w)
    mask = torch.zeros(len(batch), h, w, dtype=torch.int64)
    labels, sizes, ids = [], [], []
    for i, (x, t) in enumerate(batch):
        ih, iw = x.shape[1:]
        pixels[i, :, :ih, :iw] = (x - mean) / std
        mask[i, :ih, :iw] = 1
        labels.append(to_detr_labels(t, ih, iw))
        sizes.append((ih, iw))
        ids.append(int(t["image_id"]))
    return {"pixel_values": pixels, "pixel_mask": mask, "labels": labels, "sizes": sizes, "image_ids": ids}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {**batch, "pixel_values": batch["pixel_values"].to(device), "pixel_mask": batch["pixel_mask"].to(device),
            "labels": [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]}


def check_kwargs(ds: CocoDetection, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``num_labels`` defaults to the data's K categories (DETR adds no-object itself)."""
    kw = dict(kwargs)
    k = ds.num_classes - 1
    if kw.setdefault("num_labels", k) != k:
        raise GpusqError(f"num_labels={kw['num_labels']} but the data has {k} categories")
    return kw


# -- losses and KD ---------------------------------------------------------------------------------
def _matcher(model: nn.Module) -> nn.Module:
    """The Hungarian matcher the model's own loss builds (same class, same costs from the config):
    ``transformers.loss`` (>= 4.46) or the modeling module (older releases)."""
    c = model.config
    costs = dict(class_cost=c.class_cost, bbox_cost=c.bbox_cost, giou_cost=c.giou_cost)
    if is_sigmoid(model):
        try:
            from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher as M
        except ImportError:
            from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrHungarianMatcher as M
    else:
        try:
            from transformers.loss.loss_for_object_detection import HungarianMatcher as M
        except ImportError:
            from transformers.models.detr.modeling_detr import DetrHungarianMatcher as M
    return M(**costs)


def _check_labels(model: nn.Module, batch: dict[str, Any]) -> None:
    k = model.config.num_labels
    for t in batch["labels"]:
        c = t["class_labels"]
        if len(c) and (int(c.min()) < 0 or int(c.max()) >= k):
            raise GpusqError(f"category label {int(c.max()) + 1} is outside 1..{k} (the model has num_labels={k})")


def losses(model: nn.Module, batch: dict[str, Any], run: Callable | None = None) -> dict[str, torch.Tensor]:
    """The model's Hungarian set loss (``loss_detr``) + captures for logit KD: the student's class logits
    and, per image, the (query, target) pairs the model's matcher assigned. ``run``: what to call
    (the model's DDP wrapper; default the model)."""
    run = run or model
    _check_labels(model, batch)
    out = run(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    with torch.no_grad():
        # fp32 costs (bf16 under autocast on GPU): scipy assigns on them
        idx = _matcher(model)({"logits": out.logits.detach().float(), "pred_boxes": out.pred_boxes.detach().float()},
                              batch["labels"])
    return {"loss_detr": out.loss, "_logits": out.logits, "_indices": idx}


def teacher_features(teacher: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The teacher on the student's exact input (its feature hooks fill); its class logits."""
    return teacher(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"]).logits


def matched_logits(logits: torch.Tensor, indices: list) -> torch.Tensor:
    """Rows of ``logits`` [B, Q, C] of the matched queries, image by image: [sum of matches, C]."""
    b = torch.cat([torch.full((len(src),), i, dtype=torch.int64) for i, (src, _) in enumerate(indices)])
    q = torch.cat([torch.as_tensor(src, dtype=torch.int64) for src, _ in indices])
    return logits[b.to(logits.device), q.to(logits.device)]


def logit_kd(teacher: nn.Module, batch: dict[str, Any], cap: dict[str, Any], t_logits: torch.Tensor,
             temp: float) -> torch.Tensor:
    """T^2 KL(teacher || student) on the class logits of the queries matched to the ground truth.

    Softmax models (DETR): over the K classes + no-object. Sigmoid models (Deformable-DETR): Bernoulli
    KL per class (each logit as the 2-way distribution [0, logit]), summed over classes."""
    s = matched_logits(cap["_logits"], cap["_indices"]).float()
    if s.numel() == 0:
        return cap["_logits"].sum() * 0.0  # no objects in this batch
    t = matched_logits(t_logits, cap["_indices"]).float()
    if not is_sigmoid(teacher):
        return soft_loss(s, t, temp)
    k = s.shape[-1]
    pair = lambda z: torch.stack([torch.zeros_like(z), z], -1).reshape(-1, 2)  # noqa: E731
    return soft_loss(pair(s), pair(t), temp) * k


# -- evaluation ------------------------------------------------------------------------------------
def post_process(model: nn.Module, logits: torch.Tensor, pred_boxes: torch.Tensor, sizes: list[tuple[int, int]],
                 top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (absolute x0 y0 x1 y1 in the image's own size, clipped), ``scores``, ``labels`` 1..K.
    DETR: each query's best class (no-object excluded). Deformable: the top-k (query, class) sigmoid scores."""
    res = []
    for i, (h, w) in enumerate(sizes):
        lg, bx = logits[i].float(), pred_boxes[i].float()
        if is_sigmoid(model):
            prob = lg.sigmoid().flatten()
            scores, flat = prob.topk(min(top_k, prob.numel()))
            q, labels = flat // lg.shape[-1], flat % lg.shape[-1]
            bx = bx[q]
        else:
            scores, labels = lg.softmax(-1)[:, :-1].max(-1)
        cx, cy, bw, bh = bx.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        xyxy = (xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device))
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        res.append({"boxes": xyxy, "scores": scores, "labels": labels + 1})
    return res


@torch.no_grad()
def evaluate(model: nn.Module, ds: CocoDetection, batch_size: int, device: torch.device) -> dict[str, float]:
    """COCO bbox mAP (pycocotools) of the post-processed predictions over ``ds``."""
    from gpusq.tasks.metrics import coco_map, detections_to_coco

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    results, ids = [], []
    for batch in loader:
        b = to_device(batch, device)
        out = model(pixel_values=b["pixel_values"], pixel_mask=b["pixel_mask"])
        dets = post_process(model, out.logits, out.pred_boxes, b["sizes"])
        results += detections_to_coco(dets, b["image_ids"], ds.label_to_cat)
        ids += b["image_ids"]
    m = coco_map(ds.coco, results, iou_types=("bbox",), image_ids=ids)
    m["images"] = len(ids)
    return m
