"""Hugging Face ``transformers`` classifiers (issue 14): tiny ViT / DeiT (with and without the distillation
token) / Swin directories written with ``save_pretrained`` in the test go through ``gpusq compress`` →
``eval`` (rebuilt from the output alone) → ``export`` (ONNX, verified) → ``export --format hf`` (reloaded
by transformers, logits equal to gpusq's); the one-line errors; the model's own normalization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpusq import families, hf  # noqa: E402
from gpusq.cli import main  # noqa: E402
from tests.helpers import FAST, TINY_RECIPE, make_colour_folder  # noqa: E402
from tests.test_fused_cpu import _fused_swin, _rel  # noqa: E402
from tests.test_fused_cpu import reference_kernels as reference_kernels  # noqa: E402 - the fixture, re-exported

VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=64, num_labels=4)
SWIN = dict(image_size=16, patch_size=2, embed_dim=32, depths=[2], num_heads=[2], window_size=4, num_labels=4)
ARCHS = {
    "ViTForImageClassification": ("ViTConfig", VIT),
    "DeiTForImageClassification": ("DeiTConfig", VIT),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", VIT),
    "SwinForImageClassification": ("SwinConfig", SWIN),
}


def save_tiny(arch: str, path, seed: int = 0, preprocessor: dict | None = None):
    cfg_name, kw = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(getattr(transformers, cfg_name)(**kw)).eval()
    model.save_pretrained(str(path))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"), 0, {"train": 4, "val": 2})


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_compress_eval_export_roundtrip(arch, tmp_path, colours, capsys):
    src = tmp_path / "hf"
    ref = save_tiny(arch, src)
    net, name, kwargs = hf.load_dir(src)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # images -> logits, the HF model's own
        assert torch.equal(net(x), ref(pixel_values=x).logits)
    fam = families.lookup(name, "classification")
    assert fam.name == ("hf-swin" if "Swin" in arch else "hf-vit")

    out = tmp_path / "int8"
    data = ["--data", str(colours), *FAST]
    assert main(["compress", "--teacher", str(src), "--recipe", "int8", "--out", str(out), *TINY_RECIPE,
                 *data, "--json"]) == 0
    metrics = _json(capsys)["metrics"]
    report = json.loads((out / "report.json").read_text())
    layers = report["compressed_layers"]
    # every encoder GEMM + the patch projection, never a classifier; KD taps = the encoder layers / blocks
    assert report["check_2to4"] is True and len(layers) == (13 if "Swin" in arch else 7)
    assert any(n.endswith("patch_embeddings.projection") for n in layers)
    assert not any("classifier" in n for n in layers)
    assert report["feature_layers"] and all(n.split(".")[-1].isdigit() for n in report["feature_layers"])

    shutil.rmtree(src)  # the output alone rebuilds the model (its HF config is in model.yaml)
    assert main(["eval", "--checkpoint", str(out), *data, "--json"]) == 0
    again = _json(capsys)
    assert {k: again[k] for k in metrics} == pytest.approx(metrics, abs=1e-9)

    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(out), "--out", str(onnx_file), "--verify", str(colours),
                 "--verify-samples", "8"]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in text, text

    hf_out = tmp_path / "hf_out"
    assert main(["export", "--format", "hf", "--checkpoint", str(out), "--out", str(hf_out)]) == 0
    assert "README.md" in {p.name for p in hf_out.iterdir()}
    from gpusq.checkpoint import load_compressed

    model = load_compressed(out)[0]
    loaded = transformers.AutoModelForImageClassification.from_pretrained(str(hf_out), local_files_only=True)
    assert type(loaded).__name__ == arch and loaded.config.id2label[0] == "c0"
    with torch.no_grad():
        theirs = loaded.eval()(pixel_values=x).logits
        ours = hf.weights_only(model)(x)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5), (theirs - ours).abs().max()
    q = next(k for k in loaded.state_dict() if k.endswith("fc1.weight") or k.endswith("intermediate.dense.weight"))
    w = loaded.state_dict()[q]
    assert (w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min() >= 2  # 2:4 zeros, kept as dense floats


def test_sparse_recipe_hf_out_equals_gpusq_exactly(tmp_path, colours, capsys):
    """Without activation quantization the HF directory computes exactly what the gpusq model computes."""
    src = tmp_path / "hf"
    save_tiny("ViTForImageClassification", src)
    out = tmp_path / "sparse"
    assert main(["compress", "--teacher", str(src), "--recipe", "sparse", "--out", str(out), *TINY_RECIPE,
                 "--data", str(colours), *FAST]) == 0
    hf_out = tmp_path / "hf_out"
    assert main(["export", "--format", "hf", "--checkpoint", str(out), "--out", str(hf_out), "--verify",
                 "random"]) == 0
    assert "max abs 0.00e+00" in capsys.readouterr().out
    assert main(["export", "--format", "hf", "--checkpoint", str(out), "--out", str(hf_out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --overwrite with a checkpoint that is no HF model: refused before the old directory is removed
    import timm

    from gpusq.pipeline import _write_dense
    from tests.helpers import KWD, MODEL

    _write_dense(timm.create_model(MODEL, **KWD), tmp_path / "timm_teacher", MODEL, dict(KWD))
    assert main(["compress", "--teacher", str(tmp_path / "timm_teacher"), "--recipe", "sparse", "--out",
                 str(tmp_path / "timm_sparse"), *TINY_RECIPE, "--data", str(colours), *FAST]) == 0
    capsys.readouterr()
    assert main(["export", "--format", "hf", "--checkpoint", str(tmp_path / "timm_sparse"), "--out", str(hf_out),
                 "--overwrite"]) == 2
    assert "not a Hugging Face classifier" in capsys.readouterr().err
    assert (hf_out / "config.json").is_file() and (hf_out / "model.safetensors").is_file()


def test_preprocessor_config_sets_size_and_normalization(tmp_path):
    src = tmp_path / "hf"
    save_tiny("DeiTForImageClassification", src, preprocessor={
        "do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
        "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "size": {"shortest_edge": 18}})
    net = hf.load_dir(src)[0]
    assert net.pretrained_cfg["input_size"] == (3, 16, 16) and net.gpusq_norm == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    from gpusq.data import model_norm, prepare_batch

    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = prepare_batch(x, torch.device("cpu"), train=False, flip=False, norm=model_norm(net))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.9 / 0.4, 0.8 / 0.5, 0.7 / 0.6]))
    # no preprocessor config: the config's size and HF's default of the type (ViT: 0.5 / 0.5)
    vit = tmp_path / "vit"
    save_tiny("ViTForImageClassification", vit)
    assert hf.load_dir(vit)[0].gpusq_norm == ((0.5,) * 3, (0.5,) * 3)
    assert model_norm(torch.nn.Linear(2, 2)) is None  # timm / gpusq models keep gpusq's standard normalization


def test_one_line_errors(tmp_path, colours, capsys):
    data = ["--data", str(colours), *FAST]
    other = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            architectures=["BertForMaskedLM"]).save_pretrained(str(other))
    (other / "model.safetensors").write_bytes(b"")
    bad = tmp_path / "bad"
    save_tiny("ViTForImageClassification", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    cases = [
        (["eval", "--checkpoint", "google/vit-base-patch16-224", *data], "looks like a Hugging Face hub id"),
        (["compress", "--teacher", "google/vit-base-patch16-224", "--out", str(tmp_path / "o1"), *data],
         "pass a local directory"),
        (["compress", "--teacher", str(other), "--out", str(tmp_path / "o2"), *data],
         "BertForMaskedLM model, not an image classifier gpusq supports"),
        (["eval", "--checkpoint", str(bad), *data], "the weights do not match its config.json"),
    ]
    capsys.readouterr()  # (save_pretrained's progress bars)
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_stats_and_registry_take_hf_dirs_and_names(tmp_path, capsys):
    src = tmp_path / "hf"
    save_tiny("SwinForImageClassification", src)
    assert families.lookup(str(src)) is families.HF_SWIN
    assert main(["stats", "--model", f"{src},ViTForImageClassification", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["layers_compressed"] == 13 and rows[1]["layers_compressed"] == 73  # ViT-B/16: 12 x 6 + patch
    with pytest.raises(Exception, match="config.json sets the model"):
        families.build(str(src), num_labels=3)


def test_hf_swin_classifier_fuses_on_the_swin_blocks(reference_kernels):
    """deploy's fused Swin path (gpusq.deploy.swin, written for UPerNet's HF backbone) takes the HF Swin
    classifier compressed on its family's GEMMs (the patch projection stays per layer); CPU reference kernels."""
    from gpusq.deploy.swin import FusedHFSwinBlocks
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import SparsityConfig, sparsify_

    torch.manual_seed(0)
    model = families.build("SwinForImageClassification", image_size=40, patch_size=4, embed_dim=32, depths=[2, 2],
                           num_heads=[2, 4], window_size=4, num_labels=4).eval()
    r = load_recipe("int8")
    sparsify_(model, SparsityConfig(include=families.HF_SWIN.include))
    quantize_(model, r.quant)
    calib = torch.randn(8, 3, 40, 40)
    calibrate(model, lambda m: m(calib))
    model.eval()
    fm, why = _fused_swin(model)
    assert why is None and all(isinstance(st.blocks[0], FusedHFSwinBlocks) for st in fm.swin.encoder.layers)
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        assert _rel(fm(x), model(x)) < 3e-2



def test_deploy_attention_builds_no_mask(monkeypatch):
    """deploy's HF attention (``hf.mask_free_attention_``) never builds an attention mask: the mask
    transformers may materialize inside a CUDA-graph capture made the compiled HF ViT layers recompile there
    (failed on the H200); the logits stay the same."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    torch.manual_seed(0)
    model = families.build("ViTForImageClassification", **VIT).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)

    def no_mask(*args, **kwargs):
        raise AssertionError("an attention mask was built")

    monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", no_mask)
    with pytest.raises(AssertionError, match="mask was built"), torch.no_grad():
        model(x)  # transformers' own "sdpa" goes through its mask function (here: the spy)
    assert hf.mask_free_attention_(model) == 1
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_dense_train_output_exports_to_hf(tmp_path, colours, capsys):
    """An HF model fine-tuned by ``gpusq train --init DIR`` (a dense output) goes back to transformers with
    ``export --format hf``: the fine-tuned weights, logits equal."""
    src = tmp_path / "hf"
    save_tiny("ViTForImageClassification", src)
    out = tmp_path / "ft"
    assert main(["train", "--init", str(src), "--data", str(colours), "--epochs", "1", "--out", str(out),
                 *FAST]) == 0
    hf_out = tmp_path / "ft_hf"
    assert main(["export", "--format", "hf", "--checkpoint", str(out), "--out", str(hf_out)]) == 0
    assert "a dense model" in capsys.readouterr().out
    from gpusq.pipeline import load_any

    x = torch.randn(2, 3, 16, 16)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(str(hf_out), local_files_only=True).eval()
    before = transformers.AutoModelForImageClassification.from_pretrained(str(src), local_files_only=True).eval()
    with torch.no_grad():
        theirs = loaded(pixel_values=x).logits
        assert torch.allclose(theirs, load_any(str(out))(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(theirs, before(pixel_values=x).logits)  # the fine-tuned weights, not the old


def test_id2label_in_another_order_than_the_data_is_refused(tmp_path, colours, capsys):
    """An HF model whose id2label names are the data's classes in another order would be scored against the
    wrong classes: one line. The same names in order pass without a note; other names (ImageNet's words vs
    folder ids) are only counted, with a note."""
    names = sorted(p.name for p in (colours / "train").iterdir())
    data = ["--data", str(colours), *FAST]
    for order, expect in ((names[::-1], "class order differs at index 0"), (names, None), ([f"w{i}" for i in
                                                                                           range(len(names))], "note")):
        src = tmp_path / "_".join(order)
        model = save_tiny("ViTForImageClassification", src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["id2label"] = {str(i): n for i, n in enumerate(order)}
        cfg["label2id"] = {n: i for i, n in enumerate(order)}
        (src / "config.json").write_text(json.dumps(cfg))
        assert model.config.num_labels == len(names)
        capsys.readouterr()  # (save_pretrained's progress bar)
        rc = main(["eval", "--checkpoint", str(src), *data])
        err = capsys.readouterr().err
        if expect and expect.startswith("class order"):
            assert rc != 0 and expect in err and "id2label" in err and len(err.strip().splitlines()) == 1, err
        else:
            assert rc == 0
            assert ("id2label" in err) == (expect == "note"), err
