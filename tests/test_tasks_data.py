"""MNIST-canvas builder, uncompressed RLE and the COCO-format dataset (issue 6, data side)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gpusq.errors import GpusqError
from gpusq.tasks import rle
from gpusq.tasks.coco import CocoDetection, collate_list
from gpusq.tasks.mnist_canvas import MASK_THRESHOLD, build_mnist_canvas, main


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    out = tmp_path_factory.mktemp("mc")
    build_mnist_canvas(out, n=12, size=64, max_digits=4, seed=3)
    return out


def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (16, 16), (3, 1)]:
        for first in (0, 1):
            m = rng.random(shape) > 0.5
            m[0, 0] = bool(first)
            r = rle.encode(m)
            assert r["size"] == list(shape)
            np.testing.assert_array_equal(rle.decode(r), m)
            ref = mask_utils.frPyObjects(r, *shape)
            np.testing.assert_array_equal(mask_utils.decode(ref).astype(bool), m)
            assert int(mask_utils.area(ref)) == int(m.sum())
    with pytest.raises(ValueError, match="counts sum"):
        rle.decode({"size": [2, 2], "counts": [1, 2]})


def test_builder_is_deterministic_and_consistent(canvas, tmp_path):
    coco = json.loads((canvas / "instances.json").read_text())
    assert len(coco["images"]) == 12 and [c["id"] for c in coco["categories"]] == list(range(1, 11))
    per_image = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    assert all(1 <= len(v) <= 4 for v in per_image.values()) and len(per_image) == 12
    for im in coco["images"]:
        img = np.asarray(Image.open(canvas / "images" / im["file_name"]))
        sem = np.asarray(Image.open(canvas / "labels" / im["file_name"]))
        assert img.shape == sem.shape == (64, 64)
        union = np.zeros_like(sem, dtype=bool)
        for a in per_image[im["id"]]:
            m = rle.decode(a["segmentation"])
            assert not (m & union).any()  # disjoint instances
            union |= m
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == m.sum()
            assert (sem[m] == a["category_id"]).all()  # label PNG: 1 + digit
            assert (img[m] > MASK_THRESHOLD).all()  # the mask is the digit's bright pixels
        assert (sem[~union] == 0).all()
        # every bright pixel belongs to some digit's mask
        assert not ((img > MASK_THRESHOLD) & ~union).any()
    # same seed → same bytes; another seed → different canvases
    again = tmp_path / "again"
    build_mnist_canvas(again, n=12, size=64, max_digits=4, seed=3)
    assert (again / "instances.json").read_text() == (canvas / "instances.json").read_text()
    assert (again / "images" / "00005.png").read_bytes() == (canvas / "images" / "00005.png").read_bytes()
    other = tmp_path / "other"
    build_mnist_canvas(other, n=12, size=64, max_digits=4, seed=4)
    assert (other / "instances.json").read_text() != (canvas / "instances.json").read_text()


def test_builder_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n", "3", "--size", "48"]) == 0
    assert "3 images" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "labels").glob("*.png"))) == 3
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "e"), "--n", "0"])
    assert e.value.code == 2
    assert "error: --n must be >= 1" in capsys.readouterr().err


def test_builder_digit_splits_are_disjoint(tmp_path, monkeypatch):
    """A val set built from the test digits shares no MNIST image with a train set built from the train digits."""
    from gpusq.tasks import mnist_canvas

    used: dict[str, set[bytes]] = {}
    real = mnist_canvas.make_canvas

    def spy(rng, pool, labels, size, max_digits, **kw):
        used.setdefault(key, set()).update(d.tobytes() for d in pool)
        return real(rng, pool, labels, size, max_digits, **kw)

    monkeypatch.setattr(mnist_canvas, "make_canvas", spy)
    for key in ("train", "test"):
        mnist_canvas.build_mnist_canvas(tmp_path / key, n=2, size=48, digits=key)
    assert len(used["train"]) > 3000 and len(used["test"]) > 900
    assert not used["train"] & used["test"]
    assert "digits=test" in (tmp_path / "test" / "instances.json").read_text()
    with pytest.raises(GpusqError, match="--digits must be one of"):
        mnist_canvas.build_mnist_canvas(tmp_path / "x", n=2, digits="val")


def test_coco_dataset_targets(canvas):
    ds = CocoDetection(canvas / "instances.json")
    assert len(ds) == 12 and ds.num_classes == 11
    assert ds.label_to_cat == {i: i for i in range(1, 11)}
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    n = len(t["labels"])
    assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, 64, 64) and t["masks"].dtype == torch.uint8
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _write_coco(root, sizes, anns=None, cats=(1, 2)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, (h, w) in enumerate(sizes, 1):
        Image.fromarray(np.full((h, w), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
    if anns is None:
        anns = []
        for i, (h, w) in enumerate(sizes, 1):
            m = np.zeros((h, w), bool)
            m[2:6, 3:9] = True
            anns.append({"id": i, "image_id": i, "category_id": cats[i % len(cats)], "bbox": [3, 2, 6, 4],
                         "area": 24, "iscrowd": 0, "segmentation": rle.encode(m)})
    (root / "instances.json").write_text(json.dumps({
        "images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}))
    return root / "instances.json"


def test_variable_sizes_and_polygons(tmp_path):
    pytest.importorskip("pycocotools")
    ann = _write_coco(tmp_path, [(20, 30), (33, 17)], cats=(5, 9))
    coco = json.loads(ann.read_text())
    coco["annotations"][1]["segmentation"] = [[3, 2, 9, 2, 9, 6, 3, 6]]  # polygon
    ann.write_text(json.dumps(coco))
    ds = CocoDetection(ann)
    assert ds.cat_to_label == {5: 1, 9: 2}
    images, targets = collate_list([ds[0], ds[1]])
    assert [tuple(i.shape) for i in images] == [(3, 20, 30), (3, 33, 17)]
    assert [t["labels"].tolist() for t in targets] == [[2], [1]]
    assert targets[0]["masks"].sum() == 24
    assert targets[1]["masks"][0, 2:6, 3:9].all()


def test_bad_inputs(tmp_path):
    ann = _write_coco(tmp_path / "a", [(20, 30), (20, 30)])
    (tmp_path / "a" / "images" / "2.png").unlink()
    with pytest.raises(GpusqError, match=r"refers to 1 image\(s\) missing from .*: 2\.png") as ei:
        CocoDetection(ann)
    assert "\n" not in str(ei.value)

    m = np.ones((10, 10), bool)
    bad_ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0,
               "segmentation": rle.encode(m)}
    ann = _write_coco(tmp_path / "b", [(20, 30)], anns=[bad_ann])
    ds = CocoDetection(ann)
    with pytest.raises(GpusqError, match="annotation 7: mask size 10x10 differs from the image size 20x30"):
        ds[0]

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(GpusqError, match="is not valid JSON"):
        CocoDetection(bad, tmp_path)
    bad.write_text('{"images": []}')
    with pytest.raises(GpusqError, match="missing or non-list 'annotations'"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(GpusqError, match="does not exist"):
        CocoDetection(tmp_path / "nope.json")

    ann = _write_coco(tmp_path / "c", [(20, 30)], cats=(1,))
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 3
    ann.write_text(json.dumps(coco))
    with pytest.raises(GpusqError, match="unknown category_id 3"):
        CocoDetection(ann)


def test_segmentation_folder_and_eval(canvas, tmp_path):
    from torch import nn

    from gpusq.tasks.metrics import evaluate_segmentation
    from gpusq.tasks.segdata import SegmentationFolder

    ds = SegmentationFolder(canvas)
    assert len(ds) == 12
    img, lab = ds[3]
    assert img.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == torch.int64
    sem = np.asarray(Image.open(canvas / "labels" / "00004.png"))
    np.testing.assert_array_equal(lab.numpy(), sem)

    class Threshold(nn.Module):
        """Class 1 where the pixel is brighter than half, else background: a fixed, known predictor."""

        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            g = x[:, :1] - 0.5
            return torch.cat([-g, g, torch.full((x.shape[0], 9, *x.shape[2:]), -1e4)], 1)

    got = evaluate_segmentation(Threshold(), ds, num_classes=11)
    inter, union, correct, total = np.zeros(11), np.zeros(11), 0, 0
    for f in sorted((canvas / "images").iterdir()):
        pred = (np.asarray(Image.open(f)) / 255.0 > 0.5).astype(int)
        t = np.asarray(Image.open(canvas / "labels" / f.name)).astype(int)
        correct += (pred == t).sum()
        total += t.size
        for c in range(11):
            inter[c] += ((pred == c) & (t == c)).sum()
            union[c] += ((pred == c) | (t == c)).sum()
    assert got["images"] == 12
    assert got["pixel_acc"] == pytest.approx(correct / total)
    assert got["miou"] == pytest.approx((inter[union > 0] / union[union > 0]).mean())

    # a label PNG whose size differs from its image; an image without a label
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "labels").mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(bad / "images" / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(bad / "labels" / "a.png")
    with pytest.raises(GpusqError, match="label a.png is 20x20 but image a.png is 20x30"):
        SegmentationFolder(bad)[0]
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(bad / "images" / "b.png")
    with pytest.raises(GpusqError, match=r"1 image\(s\) in .* have no label PNG in .*: b.png"):
        SegmentationFolder(bad)
