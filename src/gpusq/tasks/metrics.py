"""Dense-prediction metrics.

* COCO bbox / segm mAP: pycocotools' ``COCOeval`` itself (the reference implementation); this
  module only converts torchvision detector outputs to COCO result records.
* Semantic segmentation: mIoU and pixel accuracy from a confusion matrix accumulated over images
  (``ConfusionMatrix``); mIoU averages over classes that appear in the ground truth or the
  prediction (union > 0), as mmseg / ADE20K tooling do.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
import torch

from gpusq.errors import GpusqError


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise GpusqError("COCO mAP needs pycocotools (pip install 'gpusq[dense]')") from None
    return COCO, COCOeval, mask_utils


def detections_to_coco(outputs: list[dict[str, torch.Tensor]], image_ids: list[int],
                       label_to_cat: dict[int, int], mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision detector outputs (per image: boxes x0y0x1y1, scores, labels, optional masks
    [N, 1, H, W] probabilities) → COCO result records (bbox as x, y, w, h; masks as RLE)."""
    _, _, mask_utils = _pycocotools()
    res: list[dict[str, Any]] = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        masks = out.get("masks")
        if masks is not None:
            masks = (masks.detach().float().cpu().numpy()[:, 0] > mask_threshold)
        for j in range(len(boxes)):
            x0, y0, x1, y1 = (float(v) for v in boxes[j])
            r = {"image_id": int(img_id), "category_id": int(label_to_cat[int(labels[j])]),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[j])}
            if masks is not None:
                enc = mask_utils.encode(np.asfortranarray(masks[j].astype(np.uint8)))
                enc["counts"] = enc["counts"].decode("ascii")
                r["segmentation"] = enc
            res.append(r)
    return res


def coco_map(gt: dict[str, Any], results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox", "segm"),
             image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO mAP@[.5:.95] (and @.5, @.75) per IoU type via pycocotools. ``gt``: a COCO instances dict.

    Returns ``{"bbox_map", "bbox_map50", "bbox_map75", "segm_map", ...}``; with no detections at
    all every value is 0.0 (pycocotools refuses an empty result list).
    """
    COCO, COCOeval, mask_utils = _pycocotools()
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        seg = a.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            a["segmentation"] = mask_utils.frPyObjects(seg, *seg["size"])
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    out: dict[str, float] = {}
    for t in iou_types:
        if not results:
            out.update({f"{t}_map": 0.0, f"{t}_map50": 0.0, f"{t}_map75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(coco_gt, coco_dt, t)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # stats[i] is -1 where no ground truth exists; report that as 0.
        out[f"{t}_map"], out[f"{t}_map50"], out[f"{t}_map75"] = (max(float(s), 0.0) for s in ev.stats[:3])
    return out


class ConfusionMatrix:
    """Accumulates a [K, K] (ground truth × prediction) pixel confusion matrix over images."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target``: integer label maps of the same shape (any batch layout). Label values
        out of range come from the user's data (``GpusqError``); a wrong ``pred`` is a caller's bug
        (``ValueError``)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
        p, t = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = torch.ones_like(t, dtype=torch.bool) if self.ignore_index is None else t != self.ignore_index
        p, t = p[keep], t[keep]
        k = self.num_classes
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= k):
            raise GpusqError(f"label values must lie in [0, {k - 1}] (or be ignore_index); got "
                             f"[{int(t.min())}, {int(t.max())}]")
        if len(p) and (int(p.min()) < 0 or int(p.max()) >= k):
            raise ValueError(f"predicted classes must lie in [0, {k - 1}]")
        self.mat += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, float]:
        return segmentation_metrics(self.mat)


def segmentation_metrics(mat: torch.Tensor) -> dict[str, float]:
    """mIoU (classes with union > 0), pixel accuracy and per-class IoU from a confusion matrix."""
    m = mat.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    valid = union > 0
    iou = torch.where(valid, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = m.sum()
    return {
        "miou": float(iou[valid].mean()) if valid.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "iou_per_class": [None if v != v else float(v) for v in iou.tolist()],
    }


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, ds, num_classes: int, ignore_index: int | None = 255,
                          device: torch.device | None = None) -> dict[str, float]:
    """mIoU / pixel accuracy of a model returning per-pixel logits (``[B, K, H, W]``, or an object
    with ``.logits`` as transformers' UPerNet) over ``ds`` items ``(image, label)``, one image at a time
    (sizes may differ)."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    for i in range(len(ds)):
        img, lab = ds[i]
        out = model(img.unsqueeze(0).to(device))
        logits = getattr(out, "logits", out)
        if logits.shape[-2:] != lab.shape:
            logits = torch.nn.functional.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1)[0], lab)
    model.train(was)
    out = cm.compute()
    out["images"] = len(ds)
    return out
