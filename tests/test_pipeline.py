"""End-to-end pipeline on real digits (MNIST-5k), tiny model, few steps; and its bad inputs."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from gpusq.checkpoint import read_compressed_dir
from gpusq.cli import main
from gpusq.data import Batches, build_dataset, mnist5k_split
from gpusq.errors import GpusqError
from gpusq.pipeline import DataOptions, compress, resolve_model, train_dense
from gpusq.recipes import load_recipe

KW = "img_size=16,patch_size=4,in_chans=1,num_classes=10,embed_dim=32,depth=2,num_heads=2"
KWD = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """A small ImageFolder (train/val) of real MNIST digits as PNG files."""
    root = tmp_path_factory.mktemp("digits")
    for split, n in (("train", 30), ("val", 10)):
        x, y = mnist5k_split("train" if split == "train" else "test")
        for c in range(10):
            d = root / split / str(c)
            d.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(y.numpy() == c)[:n]):
                Image.fromarray(x[idx, 0].numpy()).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    train_dense("deit_tiny_patch16_224", dict(KWD), DataOptions("mnist5k", workers=0), out, epochs=0.3, lr=2e-3,
                batch_size=64, warmup_epochs=0.2, progress=False, device=torch.device("cpu"))
    return out


def test_mnist5k_split_is_fixed_and_stratified():
    xtr, ytr = mnist5k_split("train")
    xte, yte = mnist5k_split("test")
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert torch.bincount(yte).tolist() == [100] * 10
    assert torch.equal(mnist5k_split("test")[0], xte)


def test_imagefolder_and_zip_read_alike(digits_folder, tmp_path):
    ds, info = build_dataset(str(digits_folder), "val", (3, 20, 20))
    assert len(ds) == 100 and info.num_classes == 10
    x, y = ds[0]
    assert x.shape == (3, 20, 20) and x.dtype == torch.uint8 and y == 0  # grayscale → RGB, resized
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(digits_folder.rglob("*.png")):
            zf.write(p, f"digits/{p.relative_to(digits_folder)}")
    dz, infoz = build_dataset(str(z), "val", (3, 20, 20))
    assert infoz.classes == info.classes and len(dz) == len(ds)
    assert torch.equal(dz[7][0], ds[7][0])


def test_rgba_images_are_converted(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGBA", (8, 8), (10, 20, 30, 40)).save(tmp_path / c / "x.png")
    ds, _ = build_dataset(str(tmp_path), "train", (3, 8, 8))
    assert ds[0][0][:, 0, 0].tolist() == [10, 20, 30]


def test_bad_data_inputs(tmp_path):
    with pytest.raises(GpusqError, match="data path not found"):
        build_dataset(str(tmp_path / "nope"), "train", (3, 8, 8))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(GpusqError, match="class folder 'b' .* has no images"):
        build_dataset(str(tmp_path), "train", (3, 8, 8))
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    ds, _ = build_dataset(str(tmp_path), "train", (3, 8, 8))
    with pytest.raises(GpusqError, match="broken.jpg"):
        list(Batches(ds, 2, shuffle=False, workers=0))
    ds, _ = build_dataset(str(tmp_path), "train", (3, 8, 8), skip_bad=True)
    batches = list(Batches(ds, 2, shuffle=False, workers=0))
    assert batches[0][2] == 1 and len(batches[0][1]) == 1
    with pytest.raises(GpusqError, match="batch size must be > 0"):
        Batches(ds, 0, shuffle=False)


def test_cli_bad_inputs_are_one_line(tmp_path, capsys, teacher_dir):
    cases = [
        (["train", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path / "missing"), "--out",
          str(tmp_path / "o")], "data path not found"),
        (["train", "--model", "deit_tny_patch16_224", "--data", "mnist5k", "--out", str(tmp_path / "o")],
         "unknown model 'deit_tny_patch16_224' (close matches: deit_tiny_patch16_224"),
        (["train", "--model", "deit_tiny_patch16_224", "--data", "mnist5k", "--batch-size", "0", "--out",
          str(tmp_path / "o")], "--batch-size must be > 0"),
        (["compress", "--teacher", str(teacher_dir), "--data", "mnist5k", "--out", str(tmp_path / "c"),
          "--resume"], "no checkpoint"),
        (["compress", "--teacher", str(teacher_dir), "--model-arg", "embed_dim=48", "--data", "mnist5k",
          "--out", str(tmp_path / "c2")], "does not match the model"),
        (["compress", "--teacher", str(teacher_dir), "--recipe", "int9", "--data", "mnist5k", "--out",
          str(tmp_path / "c3")], "available: fp8, int4, int8, sparse"),
        (["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", "mnist5k"], "not found"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)
        assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "c2" / "model.safetensors").exists()


def test_compress_end_to_end_outputs_and_eval(teacher_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    rc = main(["compress", "--teacher", str(teacher_dir), "--recipe", "int8", "--data", "mnist5k",
               "--workers", "0", "--batch-size", "64", "--device", "cpu",
               "--set", "train.stage1.epochs=0.1", "--set", "train.stage2.epochs=0.1",
               "--set", "train.stage1.min_steps=0", "--set", "train.stage2.min_steps=0",
               "--set", "train.calib_batches=2", "--set", "train.importance_batches=2", "--out", str(out)])
    assert rc == 0
    for f in ("model.safetensors", "recipe.yaml", "report.json", "report.md", "training.png", "model.yaml"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoints").exists()
    rep = json.loads((out / "report.json").read_text())
    for k in ("top1", "top5"):
        assert 0 <= rep["metrics"][k] <= 100
    assert "top1" in rep["teacher_metrics"]
    for k in ("params_dense", "params_nonzero", "size_bytes_fp32", "size_bytes_compressed", "size_ratio",
              "flops_dense", "bitops_ratio_linear", "bitops_ratio", "layers_compressed"):
        assert k in rep["stats"], k
    assert sum(rep["layer_weights"].values()) == pytest.approx(len(rep["layer_weights"]))
    # the saved tensors: 2:4 zeros explicit, values on the INT8 grid, scales separate

    st = read_compressed_dir(out)[0]  # effective weights, masks, scales
    w, s = st["blocks.0.mlp.fc1.weight"], st["blocks.0.mlp.fc1.weight_scale"]
    codes = w / s[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert st["blocks.0.mlp.fc1.input_scale"].numel() == 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", "mnist5k", "--workers", "0", "--json",
                 "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the report's metrics are the stored model's (codes + bf16 tensors): eval of the output reproduces them
    assert ev["top1"] == rep["metrics"]["top1"] and ev["top5"] == rep["metrics"]["top5"]


def test_paper_importance_weights_from_the_stage1_feature_loss(teacher_dir, tmp_path):
    """``distill.importance: paper``: stage 2's weights are L x each block's share of the absolute stage-1
    feature loss (recorded per layer), and a reused stage-1 directory gives the same weights."""
    teacher, name, kw = resolve_model(None, {}, str(teacher_dir))
    fast = {"train": {"stage1": {"epochs": 0.05, "min_steps": 0}, "stage2": {"epochs": 0.05, "min_steps": 0},
                      "calib_batches": 1, "importance_batches": 2}}
    data = DataOptions("mnist5k", workers=0, batch_size=64)
    cpu = torch.device("cpu")
    rel = compress(teacher, load_recipe("int8", fast), data, tmp_path / "rel", model_name=name, model_kwargs=kw,
                   progress=False, device=cpu)
    pap = compress(teacher, load_recipe("int8", {**fast, "distill": {"importance": "paper"}}), data, tmp_path / "pap",
                   model_name=name, model_kwargs=kw, progress=False, device=cpu,
                   stage1_from=tmp_path / "rel" / "stage1")
    mse, w = pap["layer_feature_mse"], pap["layer_weights"]
    assert pap["layer_importance"] == "paper" and rel["layer_importance"] == "relative"
    assert mse == rel["layer_feature_mse"] and set(w) == {"blocks.0", "blocks.1"}
    assert w == pytest.approx({k: 2 * v / sum(mse.values()) for k, v in mse.items()})
    assert w != pytest.approx(rel["layer_weights"])
    assert "share of the stage-1 feature-distillation loss" in (tmp_path / "pap" / "report.md").read_text()


def test_nan_loss_stops_with_message(teacher_dir, tmp_path):
    teacher, name, kw = resolve_model(None, {}, str(teacher_dir))
    recipe = load_recipe("sparse", {"train": {"stage1": {"epochs": 0.05, "lr": 1e30}, "importance_batches": 1}})
    with torch.no_grad():
        teacher.head.weight.mul_(1e30)  # logits overflow → NaN loss at the first step
    with pytest.raises(GpusqError, match="loss became nan"):
        compress(teacher, recipe, DataOptions("mnist5k", workers=0, batch_size=64), tmp_path / "x",
                 model_name=name, model_kwargs=kw, progress=False, device=torch.device("cpu"))
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_standard_transforms_for_imagenet_size_models(tmp_path):
    from gpusq.data import cache_in_memory

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (180, 200, 3), dtype=np.uint8)).save(tmp_path / split / c / "x.png")
    tr, info = build_dataset(str(tmp_path), "train", (3, 128, 128))
    assert not info.flip and info.crop_pad == 0  # the workers augment, not the device
    torch.manual_seed(0)
    a, b = tr.load(0), tr.load(0)
    assert a.shape == (3, 128, 128) and not torch.equal(a, b)  # RandomResizedCrop
    assert cache_in_memory(tr) is tr  # random transforms are never frozen into a cache
    va, _ = build_dataset(str(tmp_path), "val", (3, 128, 128))
    assert torch.equal(va.load(0), va.load(0))  # Resize + CenterCrop: deterministic
    small, info_small = build_dataset(str(tmp_path), "train", (3, 32, 32))
    assert info_small.flip and small.transform is None  # CIFAR-size: whole image, device pad-crop
