"""DETR and Deformable-DETR (Hugging Face transformers) as a ``--task detection`` adapter: COCO data in
DETR's batch dialect, the Hungarian set loss, matched-query logit KD and COCO evaluation.

The models are built by the ``detr`` family (``gpusq.families``, builders in ``gpusq.tasks.models``):
GPUSQ compresses the transformer, every Linear inside an encoder or decoder layer (self-attention
q/k/v/out, DETR's cross-attention q/k/v/out, Deformable's ``value_proj``, ``output_proj``,
``sampling_offsets``, ``attention_weights``, and the FFN ``fc1``/``fc2``); the ResNet backbone,
``input_projection``, the query embeddings and the heads (class classifier, box MLP) stay dense.

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

# What the DETR image processor normalizes with (ImageNet statistics).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


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
