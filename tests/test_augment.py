"""Training augmentation (gpusq.augment): flips can be turned off, the recipe's timm settings reach the
transforms, Mixup / CutMix give reproducible soft targets, and every draw is seeded so that loader
workers, torchrun shards and resumed runs see the same augmented images."""

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gpusq import augment as A
from gpusq.augment import AugmentConfig, BatchAugment, batch_augment, train_transforms
from gpusq.cli.args import augment_of, recipe_of
from gpusq.data import Batches, build_dataset, cache_in_memory, prepare_batch, random_crop_flip
from gpusq.engine import load_latest_state, prev_path, train_stage
from gpusq.errors import GpusqError
from gpusq.pipeline import ClassificationAdapter
from gpusq.recipes import StageConfig, load_recipe, parse_override
from tests.helpers import make_colour_folder


def _gradient_folder(root, n: int = 12, side: int = 160):
    """Images brightening left to right: a horizontal flip is visible in any crop."""
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.float64), (side, 1))
    img = np.stack([ramp] * 3, -1).astype(np.uint8)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _flipped(x: torch.Tensor) -> torch.Tensor:
    """Per image of a uint8/float batch [B,C,H,W]: True where the right half is darker (flipped)."""
    w = x.shape[-1]
    left, right = x[..., : w // 2].float().mean((1, 2, 3)), x[..., w - w // 2 :].float().mean((1, 2, 3))
    assert bool(((left - right).abs() > 1).all())  # every image shows its direction clearly
    return left > right


def _batches(ds, seed=0, epoch=0, workers=0, **kw):
    b = Batches(ds, 4, shuffle=True, seed=seed, workers=workers, **kw)
    b.epoch = epoch
    return list(b)


@pytest.fixture(scope="module")
def gradient(tmp_path_factory):
    return _gradient_folder(tmp_path_factory.mktemp("gradient"))


@pytest.mark.parametrize("hflip,expect", [(0.0, "none"), (1.0, "all"), (None, "some")])
def test_loader_flip_probability_on_imagenet_size_images(gradient, hflip, expect):
    ds, info = build_dataset(str(gradient), "train", (3, 128, 128), augment=AugmentConfig(hflip=hflip))
    assert info.flip == 0  # the loader flips (with RandomResizedCrop), not the device
    flips = torch.cat([_flipped(x) for e in range(3) for x, _, _ in _batches(ds, epoch=e)])
    assert len(flips) == 36
    if expect == "none":
        assert not flips.any()
    elif expect == "all":
        assert flips.all()
    else:  # default: timm's 0.5
        assert 0 < int(flips.sum()) < len(flips)


def test_device_flip_probability_and_dataset_defaults(tmp_path):
    x = torch.linspace(0, 255, 8).expand(64, 3, 8, 8).contiguous()  # brightening left to right
    g = torch.Generator().manual_seed(0)
    assert not _flipped(random_crop_flip(x, 0, 0.0, g)).any()
    assert not _flipped(random_crop_flip(x, 0, False, g)).any()
    assert _flipped(random_crop_flip(x, 0, 1.0, g)).all()
    n = int(_flipped(random_crop_flip(x, 0, True, g)).sum())
    assert 0 < n < 64
    u8 = x.round().to(torch.uint8)
    assert not _flipped(prepare_batch(u8, torch.device("cpu"), train=True, flip=0.0, generator=g, crop_pad=0)).any()
    make_colour_folder(tmp_path, 0, {"train": 2, "val": 1})
    assert build_dataset(str(tmp_path), "train", (3, 16, 16))[1].flip == 0.5  # image folders: flipped
    assert build_dataset(str(tmp_path), "train", (3, 16, 16), augment=AugmentConfig(hflip=0))[1].flip == 0
    assert build_dataset(str(tmp_path), "val", (3, 16, 16))[1].flip == 0
    assert build_dataset("mnist5k", "train", (1, 28, 28))[1].flip == 0  # digits: never by default
    assert build_dataset("mnist5k", "train", (1, 28, 28), augment=AugmentConfig(hflip=0.5))[1].flip == 0.5


def test_cli_no_flip_and_set(tmp_path):
    ns = argparse.Namespace(recipe="int8", set=["augment.mixup=0.8"], no_flip=True)
    r = recipe_of(ns)
    assert r.augment.hflip == 0.0 and r.augment.mixup == 0.8
    assert load_recipe("int8").augment == AugmentConfig()  # shipped recipes: today's behaviour
    assert augment_of(argparse.Namespace(set=["augment.re_prob=0.25"], no_flip=False)).re_prob == 0.25
    with pytest.raises(GpusqError, match=r"^--set train\.\.\.: gpusq train has no recipe"):
        augment_of(argparse.Namespace(set=["train.stage1.lr=1"], no_flip=False))


@pytest.mark.parametrize("over,msg", [
    ("augment.hflip=1.5", "augment.hflip must be in [0, 1], got 1.5"),
    ("augment.hflp=0", "unknown key 'augment.hflp' (did you mean: hflip?)"),
    ("augment.auto_augment=randm9", "augment.auto_augment 'randm9' is not a timm policy"),
    ("augment.auto_augment=7", "bad value for 'augment.auto_augment': 7"),
    ("augment.re_mode=noise", "augment.re_mode must be one of const, rand, pixel, got 'noise'"),
    ("augment.re_count=0", "augment.re_count must be >= 1"),
    ("augment.mixup=-0.2", "augment.mixup must be >= 0"),
    ("augment.mixup_prob=lots", "bad value for 'augment.mixup_prob': 'lots'"),
])
def test_bad_augment_values_are_one_line_errors(over, msg):
    with pytest.raises(GpusqError, match=re.escape(msg)) as e:
        load_recipe("int8", parse_override(over))
    assert "\n" not in str(e.value)


def test_recipe_fields_reach_the_timm_transforms(gradient, tmp_path):
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import ColorJitter, RandomHorizontalFlip

    cfg = AugmentConfig(auto_augment="rand-m7-n3-mstd0.5-inc1", hflip=0.3)
    ds, _ = build_dataset(str(gradient), "train", (3, 128, 128), augment=cfg)
    kinds = {type(t): t for t in ds.transform.transforms + ds.post.transforms}
    assert RandomResizedCropAndInterpolation in kinds and kinds[RandomHorizontalFlip].p == 0.3
    ra = kinds[RandAugment]
    assert ra.num_layers == 3 and all(op.magnitude == 7 and op.magnitude_std == 0.5 for op in ra.ops)
    assert ColorJitter not in kinds  # timm: no colour jitter under RandAugment
    # CIFAR-size: the policy per image in the loader (after the in-memory cache), crop + flip on the device
    make_colour_folder(tmp_path, 0, {"train": 3, "val": 1})
    small, info = build_dataset(str(tmp_path), "train", (3, 16, 16), augment=AugmentConfig(color_jitter=0.4))
    assert small.transform is None and info.flip == 0.5 and info.crop_pad > 0
    cached = cache_in_memory(small)
    assert isinstance(cached, A.AugmentedImages) and type(cached.transform.transforms[0]) is ColorJitter
    assert cached.transform.transforms[0].brightness == (0.6, 1.4)
    x, y = cached[(0, 0, 0)]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and torch.equal(x, cached[(0, 0, 0)][0])
    assert not torch.equal(x, cached[(0, 0, 1)][0])  # another epoch, another jitter
    assert torch.equal(cached[(0, 0, 0, False)][0], cached.base[0][0])  # calibration: as decoded
    # erasing and mixing reach the batch augmentation
    ba = batch_augment(AugmentConfig(re_prob=0.25, re_mode="const", re_count=2, mixup=0.8, cutmix=1.0,
                                     mixup_switch_prob=0.3), 10, seed=0, label_smoothing=0.1)
    assert (ba.erase.probability, ba.erase.mode, ba.erase.max_count) == (0.25, "const", 2)
    assert (ba.mix.mixup_alpha, ba.mix.cutmix_alpha, ba.mix.switch_prob, ba.mix.label_smoothing,
            ba.mix.num_classes) == (0.8, 1.0, 0.3, 0.1, 10)
    assert batch_augment(AugmentConfig(), 10, 0) is None  # nothing to do: no hook in the loop


def test_randaugment_posterize_to_zero_bits_runs_on_this_pillow():
    """``inc1`` at magnitude 10 asks posterize for 0 bits, which Pillow >= 12 refuses: gpusq's transforms
    give the old all-black result instead of a crash in the middle of an epoch."""
    geometry, tf = train_transforms(AugmentConfig(auto_augment="rand-n3-m10-inc1"), (3, 32, 32), crop=False,
                                    flip=0.0, mean=(0.5, 0.5, 0.5))
    assert geometry is None
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for s in range(100):  # posterize is 1 of 15 ops, 3 per image: drawn many times here
        A.reseed(s)
        assert tf(im).size == (32, 32)


def test_mixup_cutmix_soft_targets_reproducible_per_step():
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0, re_prob=0.5)
    ba = BatchAugment(cfg, num_classes=5, seed=3, label_smoothing=0.1)
    x = torch.randn(8, 3, 12, 12)
    y = torch.arange(8) % 5
    x1, t1 = ba(x.clone(), y, step=4)
    x2, t2 = ba(x.clone(), y, step=4)
    x3, t3 = ba(x.clone(), y, step=5)
    assert t1.shape == (8, 5) and torch.allclose(t1.sum(1), torch.ones(8))
    assert float(t1.min()) >= 0.1 / 5 - 1e-6  # label smoothing reached the targets
    assert torch.equal(x1, x2) and torch.equal(t1, t2)  # same (seed, step): same batch
    assert not torch.equal(x1, x3)  # another step: other draws
    assert not torch.equal(x1, x)
    state = (torch.get_rng_state(), np.random.get_state()[1].copy())
    ba(x.clone(), y, step=6)
    assert torch.equal(state[0], torch.get_rng_state()) and (state[1] == np.random.get_state()[1]).all()


@pytest.mark.parametrize("world", [2, 4])
def test_batch_augment_shards_match_one_process(monkeypatch, world):
    """Each rank's erasing and Mixup / CutMix of its shard equal the global batch's, sliced rank::world."""
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0, re_prob=0.5, re_mode="pixel")
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 7
    for step in range(6):  # Mixup and CutMix steps both occur
        full_x, full_y = BatchAugment(cfg, 7, seed=1, label_smoothing=0.1)(x.clone(), y, step)
        for rk in range(world):
            # rank world-1-rk's images, erased there, arrive by partner_batch (an all-gather under torchrun)
            other = world - 1 - rk
            erased = BatchAugment(AugmentConfig(re_prob=0.5, re_mode="pixel"), 7, seed=1, shard=(other, world))
            xp = erased(x[other::world].clone(), y[other::world], step)[0]
            monkeypatch.setattr(A, "partner_batch", lambda xs, ys, p, xp=xp: (xp, y[p::world]))
            px, py = BatchAugment(cfg, 7, seed=1, label_smoothing=0.1, shard=(rk, world))(
                x[rk::world].clone(), y[rk::world], step)
            assert torch.equal(px, full_x[rk::world]) and torch.equal(py, full_y[rk::world]), (step, rk)


def test_loader_seeds_per_image_not_per_worker_or_shard(gradient):
    cfg = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1")
    ds, _ = build_dataset(str(gradient), "train", (3, 128, 128), augment=cfg)
    one = _batches(ds, seed=5, epoch=1)
    assert torch.equal(torch.cat([x for x, _, _ in one]), torch.cat([x for x, _, _ in _batches(ds, 5, 1, workers=2)]))
    b = Batches(ds, 4, shuffle=True, seed=5, workers=0, drop_last=True)
    b.epoch = 1
    full = [x for x, _, _ in b]
    for r in range(2):  # rank r's batch k: the strided share of the global batch of 2 x 2 images
        b2 = Batches(ds, 2, shuffle=True, seed=5, workers=0, drop_last=True, rank=r, world=2)
        b2.epoch = 1
        for k, (x, _, _) in enumerate(b2):
            assert torch.equal(x, full[k][r::2]), (r, k)
    other = torch.cat([x for x, _, _ in _batches(ds, 5, 2)])
    assert not torch.equal(torch.cat([x for x, _, _ in one]), other)  # a new epoch, new draws


def test_augmented_stage_resumes_exactly(tmp_path, capsys):
    """RandAugment in the loader, erasing + Mixup / CutMix in the loop: a resumed stage ends where an
    uninterrupted one does."""
    make_colour_folder(tmp_path / "d", 0, {"train": 12, "val": 1}, size=8)
    cfg_aug = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0)
    ds, info = build_dataset(str(tmp_path / "d"), "train", (3, 8, 8), augment=cfg_aug)
    ds = cache_in_memory(ds)
    cfg = StageConfig(epochs=2, lr=1e-2, min_lr=1e-4, weight_decay=0.0, warmup_epochs=0, batch_size=8,
                      label_smoothing=0.1)

    def run(net, resume=False):
        train_stage("s", net, Batches(ds, 8, shuffle=True, drop_last=True, workers=0), cfg, torch.device("cpu"),
                    adapter=ClassificationAdapter(None, torch.device("cpu"), flip=info.flip, crop_pad=info.crop_pad,
                                                  augment=cfg_aug, num_classes=4),
                    ckpt_path=tmp_path / "ck.safetensors", ckpt_every=2, resume=resume, progress=False)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))

    a = net()
    run(a)
    ck = tmp_path / "ck.safetensors"
    assert load_latest_state(ck)["step"] == 12 and load_latest_state(prev_path(ck))["step"] == 10
    ck.unlink()  # resume from step 10 (mid-epoch 2)
    b = net()
    run(b, resume=True)
    assert "resumed s at step 10/12" in capsys.readouterr().out
    assert torch.equal(a[1].weight, b[1].weight)
    c = net()
    with A.GlobalRng():
        run(c)  # ... and reproducible from scratch
    assert torch.equal(a[1].weight, c[1].weight)


def test_compress_with_augmentation_records_it(tmp_path):
    """Both KD stages take the batch augmentation (soft targets into the distillation loss); the output's
    recipe.yaml keeps the augment section and loads again."""
    from gpusq.pipeline import DataOptions, compress, resolve_model, train_dense
    from tests.helpers import KWD, MODEL

    make_colour_folder(tmp_path / "d", 0, {"train": 8, "val": 2})
    data = DataOptions(str(tmp_path / "d"), batch_size=8, workers=0)
    train_dense(MODEL, dict(KWD), data, tmp_path / "t", epochs=1, batch_size=8, progress=False,
                device=torch.device("cpu"), augment=AugmentConfig(hflip=0.0, mixup=0.8))
    teacher, name, kw = resolve_model(None, {}, str(tmp_path / "t"))
    over = {"augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "mixup": 0.8, "cutmix": 1.0},
            "train": {"stage1": {"epochs": 0.5, "min_steps": 0, "label_smoothing": 0.1},
                      "stage2": {"epochs": 0.5, "min_steps": 0}, "calib_batches": 1, "importance_batches": 1}}
    rep = compress(teacher, load_recipe("int8", over), data, tmp_path / "c", model_name=name, model_kwargs=kw,
                   progress=False, device=torch.device("cpu"))
    assert rep["history"]["stage1"] and rep["history"]["stage2"] and 0 <= rep["metrics"]["top1"] <= 100
    back = load_recipe(str(tmp_path / "c" / "recipe.yaml"))
    assert back.augment.mixup == 0.8 and back.augment.hflip is None and back.augment.re_prob == 0.5


def test_calibration_batches_skip_the_colour_policy(gradient, tmp_path):
    """``Batches(augment=False)`` (calibration, layer importance): no RandAugment / colour jitter; the
    crops of >= 128 px images stay (they make the model size)."""
    make_colour_folder(tmp_path, 0, {"train": 4, "val": 1})
    cfg = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4)
    plain, _ = build_dataset(str(tmp_path), "train", (3, 16, 16))
    small = cache_in_memory(build_dataset(str(tmp_path), "train", (3, 16, 16), augment=cfg)[0])
    ref = torch.cat([x for x, _, _ in _batches(cache_in_memory(plain), seed=1)])
    assert torch.equal(torch.cat([x for x, _, _ in _batches(small, seed=1, augment=False)]), ref)
    assert not torch.equal(torch.cat([x for x, _, _ in _batches(small, seed=1)]), ref)
    big, _ = build_dataset(str(gradient), "train", (3, 128, 128), augment=cfg)
    crops_only, _ = build_dataset(str(gradient), "train", (3, 128, 128))
    a = torch.cat([x for x, _, _ in _batches(big, seed=1, augment=False)])
    assert torch.equal(a, torch.cat([x for x, _, _ in _batches(crops_only, seed=1)]))


def test_tasks_refuse_an_augment_section(tmp_path, capsys):
    from gpusq.cli import main

    rc = main(["compress", "--task", "detection", "--teacher", str(tmp_path), "--data", str(tmp_path),
               "--out", str(tmp_path / "o"), "--set", "augment.mixup=0.8"])
    assert rc == 2 and "augment.mixup is for classification; detection / segmentation" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_batched_erasing_equals_timm_per_image(mode):
    """BatchAugment's erasing (drawn into scratch images, written once) equals timm's RandomErasing applied
    image by image with the same per-image seeds: the same boxes and the same noise."""
    from timm.data.random_erasing import RandomErasing

    cfg = AugmentConfig(re_prob=0.6, re_mode=mode, re_count=2)
    x = torch.randn(24, 3, 16, 16)
    for shard in ((0, 1), (1, 3)):
        ours = BatchAugment(cfg, 10, seed=5, shard=shard)(x.clone(), torch.zeros(24, dtype=torch.long), 7)[0]
        ref = x.clone()
        timm_erase = RandomErasing(0.6, mode=mode, max_count=2, device="cpu")
        for j in range(len(ref)):
            A.reseed(A.mix_seed(5, 7, 1, j * shard[1] + shard[0]))
            timm_erase(ref[j])
        assert torch.equal(ours, ref)
        changed = (ours != x).flatten(1).any(1)
        assert 0 < int(changed.sum()) < len(x)  # some images erased, some not (p = 0.6)
