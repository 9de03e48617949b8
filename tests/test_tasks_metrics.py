"""COCO mAP conversion (checked on fixtures with known answers) and mIoU / pixel accuracy."""

import numpy as np
import pytest
import torch

from gpusq.errors import GpusqError
from gpusq.tasks import rle
from gpusq.tasks.metrics import ConfusionMatrix, coco_map, detections_to_coco, segmentation_metrics

pytest.importorskip("pycocotools")


def _gt():
    """Two 40x40 images, one 10x10 square object each (categories 3 and 7)."""
    anns, images = [], []
    for i, (x, y, cat) in enumerate([(5, 5, 3), (20, 12, 7)], 1):
        m = np.zeros((40, 40), bool)
        m[y: y + 10, x: x + 10] = True
        images.append({"id": i, "file_name": f"{i}.png", "height": 40, "width": 40})
        anns.append({"id": i, "image_id": i, "category_id": cat, "bbox": [x, y, 10, 10], "area": 100,
                     "iscrowd": 0, "segmentation": rle.encode(m)})
    return {"images": images, "annotations": anns, "categories": [{"id": 3}, {"id": 7}]}


def _out(x, y, label, w=10, score=0.9):
    mask = torch.zeros(1, 1, 40, 40)
    mask[0, 0, y: y + 10, x: x + w] = 0.8
    return {"boxes": torch.tensor([[x, y, x + w, y + 10]], dtype=torch.float32), "scores": torch.tensor([score]),
            "labels": torch.tensor([label]), "masks": mask}


LABEL_TO_CAT = {1: 3, 2: 7}


def test_perfect_detections_score_one():
    res = detections_to_coco([_out(5, 5, 1), _out(20, 12, 2)], [1, 2], LABEL_TO_CAT)
    assert res[0]["bbox"] == [5.0, 5.0, 10.0, 10.0] and res[1]["category_id"] == 7
    m = coco_map(_gt(), res)
    assert m["bbox_map"] == pytest.approx(1.0) and m["segm_map"] == pytest.approx(1.0)
    assert m["bbox_map50"] == pytest.approx(1.0)


def test_partial_overlap_known_map():
    # Second detection 16 wide instead of 10: IoU = 100/160 = 0.625 → matched at IoU thresholds
    # .50, .55, .60 only: AP for category 7 = 3/10; category 3 is perfect → mAP = (1 + 0.3) / 2.
    res = detections_to_coco([_out(5, 5, 1), _out(20, 12, 2, w=16)], [1, 2], LABEL_TO_CAT)
    m = coco_map(_gt(), res)
    assert m["bbox_map"] == pytest.approx(0.65, abs=1e-6)
    assert m["segm_map"] == pytest.approx(0.65, abs=1e-6)
    assert m["bbox_map50"] == pytest.approx(1.0) and m["bbox_map75"] == pytest.approx(0.5)


def test_wrong_class_and_empty():
    res = detections_to_coco([_out(5, 5, 2), _out(20, 12, 1)], [1, 2], LABEL_TO_CAT)
    assert coco_map(_gt(), res)["bbox_map"] == pytest.approx(0.0)
    assert coco_map(_gt(), []) == {k: 0.0 for k in ("bbox_map", "bbox_map50", "bbox_map75",
                                                    "segm_map", "segm_map50", "segm_map75")}


def test_confusion_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    r = cm.compute()
    # IoU: class 0: 1/(2+2-1)=1/3; class 1: 2/(2+3-2)=2/3; class 2: 0/(1+0-0)=0
    assert r["iou_per_class"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)


def _numpy_reference(preds, targets, k, ignore):
    """Independent per-class loop over pixels (no confusion matrix)."""
    inter, union, correct, total = np.zeros(k), np.zeros(k), 0, 0
    for p, t in zip(preds, targets):
        keep = t != ignore
        p, t = p[keep], t[keep]
        correct += (p == t).sum()
        total += t.size
        for c in range(k):
            inter[c] += ((p == c) & (t == c)).sum()
            union[c] += ((p == c) | (t == c)).sum()
    valid = union > 0
    return (inter[valid] / union[valid]).mean(), correct / total


def test_miou_matches_numpy_reference_over_batches():
    rng = np.random.default_rng(0)
    k = 6
    preds, targets = [], []
    cm = ConfusionMatrix(k, ignore_index=255)
    for shape in [(17, 23), (8, 8), (31, 5)]:
        t = rng.integers(0, k - 1, shape)  # class 5 never in the labels...
        t[rng.random(shape) < 0.1] = 255
        p = np.where(rng.random(shape) < 0.6, t, rng.integers(0, k - 2, shape))  # ...nor predicted: skipped
        p[p == 255] = 0
        preds.append(p)
        targets.append(t)
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    miou, acc = _numpy_reference(preds, targets, k, 255)
    r = cm.compute()
    assert r["iou_per_class"][5] is None
    assert r["miou"] == pytest.approx(miou) and r["pixel_acc"] == pytest.approx(acc)
    assert segmentation_metrics(cm.mat)["miou"] == r["miou"]


def test_confusion_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="differs from label shape") as e:  # the caller's bug, not user input
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not isinstance(e.value, GpusqError)
    with pytest.raises(ValueError, match=r"predicted classes must lie in \[0, 2\]"):
        cm.update(torch.full((2, 2), 3), torch.zeros(2, 2))
    with pytest.raises(GpusqError, match=r"label values must lie in \[0, 2\]"):
        cm.update(torch.zeros(2, 2), torch.full((2, 2), 4))
