"""Bad inputs through the CLI: each is one line ``gpusq CMD: error: ...`` with its exit code, and a
failed run leaves no model.safetensors / report.json in --out (extends tests/test_pipeline.py)."""

import os
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from gpusq.cli import main
from gpusq.errors import GpusqError
from gpusq.pipeline import DataOptions, _write_dense, build_loaders
from tests.helpers import FAST, KW, KWD, MODEL, TINY_RECIPE


def _images(root, n=8, modes=("RGB",), classes=4, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).convert(modes[i % len(modes)]).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    _write_dense(timm.create_model(MODEL, **KWD), out, MODEL, dict(KWD))
    return out


def _fails(capsys, argv, msg, code=2):
    capsys.readouterr()
    assert main(argv) == code, argv
    full = capsys.readouterr().err.strip()
    err = full.splitlines()[-1]  # earlier stderr lines can only be a progress bar
    assert msg in err, (argv, full)
    assert err.startswith(f"gpusq {argv[0]}: error: "), full
    assert "Traceback" not in full and full.count("error:") == 1, full  # the error is one line
    return err


def _no_outputs(out):
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()


def test_missing_data_compress_and_eval(capsys, tmp_path, teacher):
    out = tmp_path / "o"
    _fails(capsys, ["compress", "--teacher", str(teacher), "--data", str(tmp_path / "none"), "--out", str(out),
                    *FAST], "data path not found")
    assert not out.exists()  # the --out dir this run created is gone again
    _fails(capsys, ["eval", "--checkpoint", str(teacher), "--data", str(tmp_path / "none"), *FAST],
           "data path not found")


def test_empty_class_folder(capsys, tmp_path):
    root = _images(tmp_path / "d", n=2)
    for f in (root / "train" / "c2").iterdir():
        f.unlink()
    _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(root), "--out", str(tmp_path / "o"),
                    *FAST], "class folder 'c2'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_corrupt_jpeg_named_then_skipped(capsys, tmp_path, streaming):
    root = _images(tmp_path / "d", n=4)
    (root / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    more = ["--no-cache", "--workers", "1"] if streaming else []  # worker processes vs in-memory decode
    argv = ["train", "--model", MODEL, "--model-arg", KW, "--data", str(root), "--epochs", "1", *FAST, *more]
    _fails(capsys, [*argv, "--out", str(tmp_path / "o")], "cannot read image")
    _no_outputs(tmp_path / "o")
    assert main([*argv, "--out", str(tmp_path / "ok"), "--skip-bad-images"]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root from reading the file")
def test_unreadable_file(capsys, tmp_path):
    root = _images(tmp_path / "d", n=4)
    f = root / "train" / "c0" / "0.png"
    f.chmod(0)
    try:
        _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(root), "--out",
                        str(tmp_path / "o"), *FAST], "Permission denied")
    finally:
        f.chmod(0o644)


def test_grayscale_rgba_palette_images_are_converted_and_train(capsys, tmp_path):
    root = _images(tmp_path / "d", n=4, modes=("L", "RGBA", "P", "RGB"))
    out = tmp_path / "o"
    assert main(["train", "--model", MODEL, "--model-arg", KW, "--data", str(root), "--epochs", "1",
                 "--out", str(out), *FAST]) == 0
    assert (out / "model.safetensors").is_file()
    # and a 1-channel model reads the RGB/RGBA files as grayscale
    assert main(["train", "--model", MODEL, "--model-arg", KW + ",in_chans=1", "--data", str(root),
                 "--epochs", "1", "--out", str(tmp_path / "o1"), *FAST]) == 0


def test_checkpoint_of_another_architecture(capsys, tmp_path, teacher, folder):
    out = tmp_path / "o"
    _fails(capsys, ["compress", "--teacher", str(teacher / "model.safetensors"), "--model", "resnet10t",
                    "--model-arg", "num_classes=4",
                    "--data", str(folder), "--out", str(out), *FAST], "does not match the model")
    _fails(capsys, ["eval", "--checkpoint", str(teacher / "model.safetensors"), "--model", "vit_tiny_patch16_224",
                    "--model-arg", "img_size=16,patch_size=4,num_classes=4", "--data", str(folder), *FAST],
           "does not match the model")
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes((teacher / "model.safetensors").read_bytes()[:500])
    _fails(capsys, ["compress", "--teacher", str(trunc), "--model", MODEL, "--model-arg", KW,
                    "--data", str(folder), "--out", str(out), *FAST], "not a readable safetensors file")
    assert not out.exists()


def test_recipe_unknown_key_and_bad_value(capsys, tmp_path, teacher, folder):
    base = ["compress", "--teacher", str(teacher), "--data", str(folder), "--out", str(tmp_path / "o"), *FAST]
    y = tmp_path / "r.yaml"
    y.write_text("base: int8\ntrain:\n  stage1: {epochs: 1, lrr: 0.1}\n")
    _fails(capsys, [*base, "--recipe", str(y)], "unknown key 'train.stage1.lrr'")
    y.write_text("base: int8\ntrain:\n  stage1: {epochs: many}\n")
    _fails(capsys, [*base, "--recipe", str(y)], "bad value")
    y.write_text("base: int8\nquant: {act: {dtype: int7}}\n")
    _fails(capsys, [*base, "--recipe", str(y)], "int7")
    _fails(capsys, [*base, "--set", "train.stage9.epochs=1"], "unknown key")
    assert not (tmp_path / "o").exists()


def test_no_layer_to_compress(capsys, tmp_path, teacher, folder):
    y = tmp_path / "r.yaml"
    y.write_text("base: int8\nsparsity: {include: ['no_such_layer']}\n")
    out = tmp_path / "o"
    _fails(capsys, ["compress", "--teacher", str(teacher), "--recipe", str(y), "--data", str(folder),
                    "--out", str(out), *FAST, *TINY_RECIPE], "no layer to compress")
    assert not out.exists()
    # a model whose GEMM input dims are not multiples of 4 (patch 3x3x3=27, embed 6, mlp hidden 9)
    odd = dict(img_size=15, patch_size=3, num_classes=4, embed_dim=6, depth=1, num_heads=2, mlp_ratio=1.5)
    t2 = tmp_path / "odd"
    _write_dense(timm.create_model(MODEL, **odd), t2, MODEL, odd)
    err = _fails(capsys, ["compress", "--teacher", str(t2), "--data", str(folder), "--out", str(out), *FAST,
                          *TINY_RECIPE], "no layer to compress")
    assert "not a multiple of 4" in err


def test_batch_size_zero_and_indivisible(capsys, tmp_path, teacher, folder):
    for cmd in (["compress", "--teacher", str(teacher), "--out", str(tmp_path / "o")],
                ["eval", "--checkpoint", str(teacher)]):
        _fails(capsys, [*cmd, "--data", str(folder), "--batch-size", "0"], "--batch-size must be > 0")
        _fails(capsys, [*cmd, "--data", str(folder), "--batch-size", "-3"], "--batch-size must be > 0")
    with pytest.raises(GpusqError, match="not divisible by the 2 processes"):
        build_loaders(DataOptions(str(folder), workers=0), (3, 16, 16), 15, torch.device("cpu"), rank=0, world=2)


def test_gpu_out_of_memory_suggests_smaller_batch(capsys, tmp_path, teacher, folder, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("gpusq.engine.train_stage", oom)
    out = tmp_path / "o"
    _fails(capsys, ["compress", "--teacher", str(teacher), "--data", str(folder), "--out", str(out), *FAST],
           "GPU out of memory; try a smaller --batch-size", code=3)
    assert not out.exists()


def test_nan_loss_from_cli_keeps_only_checkpoints(capsys, tmp_path, teacher, folder):
    out = tmp_path / "o"
    err = _fails(capsys, ["compress", "--teacher", str(teacher), "--data", str(folder), "--out", str(out), *FAST,
                          "--recipe", "sparse", "--set", "train.stage1.lr=1.0e+30", "--set", "train.stage1.epochs=2",
                          "--set", "train.stage1.warmup_epochs=0", "--ckpt-every", "1"], "stage1: loss became")
    assert "last good checkpoint kept" in err
    _no_outputs(out)
    assert (out / "checkpoints" / "stage1.safetensors").is_file()  # resumable state is kept


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file if the pickle were executed


def test_malicious_pickle_is_refused(capsys, tmp_path, folder):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil(str(marker))}}, f, protocol=2)
    _fails(capsys, ["compress", "--teacher", str(evil), "--model", MODEL, "--model-arg", KW, "--data", str(folder),
                    "--out", str(tmp_path / "o"), *FAST], "could not be read with weights_only=True")
    _fails(capsys, ["eval", "--checkpoint", str(evil), "--model", MODEL, "--model-arg", KW, "--data", str(folder),
                    *FAST], "weights_only=True")
    assert not marker.exists()
    # a well-formed foreign .pth loads (tensors only)
    torch.save({"model": timm.create_model(MODEL, **KWD).state_dict()}, tmp_path / "ok.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "ok.pth"), "--model", MODEL, "--model-arg", KW,
                 "--data", str(folder), *FAST]) == 0


def test_internal_errors_are_not_user_errors(monkeypatch, capsys):
    """A broken invariant is an InternalError: the CLI says it is a bug and shows the traceback (re-raises),
    unlike a GpusqError's one line and exit code 2."""
    import gpusq.cli.stats
    from gpusq.cli import main
    from gpusq.errors import GpusqError, InternalError

    assert not issubclass(InternalError, GpusqError)

    def boom(argv, prog, command):
        raise InternalError("2:4 pattern broken")

    monkeypatch.setattr(gpusq.cli.stats, "cli_main", boom)
    with pytest.raises(InternalError):
        main(["stats", "--model", "deit_tiny_patch16_224"])
    assert "internal error (a bug in gpusq" in capsys.readouterr().err


def test_task_is_a_listed_choice(capsys):
    """`gpusq compress --help` lists --task and its choices; a wrong task is one line with close matches."""
    from gpusq.cli import main

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "--task {classification,detection,segmentation}" in capsys.readouterr().out
    assert main(["compress", "--task", "detectoin", "--teacher", "t", "--data", "d", "--out", "o"]) == 2
    assert "detection" in capsys.readouterr().err


def test_export_does_not_replace_an_existing_file(capsys, tmp_path):
    """An existing .onnx is kept unless --overwrite: one line, before any model is loaded."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    _fails(capsys, ["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(out)],
           "already exists; pass --overwrite")
    assert out.read_bytes() == b"previous export"
    _fails(capsys, ["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(out), "--overwrite"],
           "checkpoint not found")


def test_stage2_batch_size_that_differs_is_refused_not_ignored(capsys, tmp_path, teacher, folder):
    """Both stages train on one loader: a stage-2 batch size of its own is an error (before --overwrite
    clears anything), unless --batch-size sets the one size."""
    from gpusq.recipes import load_recipe

    out = tmp_path / "o"
    _write_dense(timm.create_model(MODEL, **KWD), out, MODEL, dict(KWD))  # an earlier gpusq output
    before = (out / "model.safetensors").read_bytes()
    _fails(capsys, ["compress", "--teacher", str(teacher), "--data", str(folder), "--out", str(out), "--overwrite",
                    "--set", "train.stage2.batch_size=64"],
           "train.stage2.batch_size (64) differs from train.stage1.batch_size (128)")
    assert (out / "model.safetensors").read_bytes() == before  # --overwrite did not clear it first
    r = load_recipe("int8", {"train": {"stage2": {"batch_size": 64}}})
    assert r.loader_batch_size(32) == 32
    assert load_recipe("int8").loader_batch_size() == 128
    assert load_recipe("sparse", {"train": {"stage2": {"batch_size": 64}}}).loader_batch_size() == 128  # no stage 2
