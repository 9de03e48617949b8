"""``gpusq train|compress|eval --task detection`` end to end on a tiny MNIST-canvas set."""

import json

import pytest

from gpusq.checkpoint import read_compressed_dir
from gpusq.cli import main
from gpusq.sparsity import is_2to4
from gpusq.tasks.mnist_canvas import build_mnist_canvas

pytest.importorskip("pycocotools")

NO_FLOOR = ["--set", "train.stage1.min_steps=0", "--set", "train.stage2.min_steps=0"]  # exactly the epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    build_mnist_canvas(root / "train", n=12, size=64, seed=0)
    build_mnist_canvas(root / "val", n=6, size=64, seed=1)
    return root


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_compress_eval(data, tmp_path, capsys):
    t, c = tmp_path / "teacher", tmp_path / "int8"
    common = ["--task", "detection", "--data", str(data / "train"), "--val-data", str(data / "val"),
              "--batch-size", "4", "--json"]
    assert main(["train", "--model", "maskrcnn_swin_test", "--epochs", "1", "--out", str(t), *common]) == 0
    dense = _json_out(capsys)["metrics"]
    assert dense["images"] == 6 and 0 <= dense["bbox_map"] <= 1

    assert main(["compress", "--teacher", str(t), "--recipe", "int8", "--set", "train.stage1.epochs=1", *NO_FLOOR,
                 "--set", "train.stage2.epochs=1", "--set", "train.calib_batches=2", "--out", str(c), *common]) == 0
    rep = _json_out(capsys)
    layers = rep["compressed_layers"]
    assert len(layers) == 16 and all(n.startswith("backbone.body.layers_") and ".blocks." in n for n in layers)
    full = json.loads((c / "report.json").read_text())
    assert full["check_2to4"] is True and set(full["layer_weights"]) == set(full["distill"]["feature_layers"])
    # feature KD taps: the 4 Swin blocks and the 4 FPN outputs; w_l sum to the number of taps
    assert sum(1 for n in full["layer_weights"] if ".fpn." in n) == 4
    assert sum(full["layer_weights"].values()) == pytest.approx(8.0)
    for stage in ("stage1_losses", "stage2_losses"):  # feature KD and RoI class-logit KD both ran
        assert full[stage]["feat"] > 0 and full[stage]["soft"] > 0, full[stage]
    assert "RoI" in full["distill"]["logit"]
    state = read_compressed_dir(c)[0]  # effective weights, masks, scales
    for n in layers:
        assert is_2to4(state[f"{n}.weight"]) and f"{n}.weight_scale" in state and f"{n}.input_scale" in state
    assert not any(k.startswith(("backbone.fpn.", "roi_heads.", "rpn.")) and k.endswith("_scale") for k in state)

    # the written model, reloaded, scores exactly what compress reported on the same data
    assert main(["eval", "--task=detection", "--checkpoint", str(c), "--data", str(data / "val"), "--json"]) == 0
    ev = _json_out(capsys)
    assert ev["bbox_map"] == pytest.approx(rep["metrics"]["bbox_map"], abs=1e-9)
    assert ev["segm_map"] == pytest.approx(rep["metrics"]["segm_map"], abs=1e-9)

    # every command on the task output: eval without --task (read from task.yaml), stats as stored,
    # export / deploy stop with one line
    assert main(["eval", "--checkpoint", str(c), "--data", str(data / "val"), "--json"]) == 0
    assert _json_out(capsys)["bbox_map"] == pytest.approx(ev["bbox_map"], abs=1e-12)
    assert main(["stats", "--checkpoint", str(c), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["file_bytes"] == (c / "model.safetensors").stat().st_size and st["task"] == "detection"
    assert 1.0 <= st["file_bytes"] / st["size_bytes_compressed"] < 1.1
    assert main(["export", "--checkpoint", str(c), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "writes ONNX for classification models" in err and "detection output" in err
    from gpusq.deploy import deploy
    from gpusq.errors import GpusqError

    with pytest.raises(GpusqError, match="deploy\\(\\) builds classification models"):
        deploy(str(c))


def test_teacher_weights_file_with_model(data, tmp_path, capsys):
    """A user's own checkpoint (a state-dict file) + --model NAME is a valid teacher."""
    import torch

    from gpusq import families

    torch.manual_seed(0)
    m = families.build("maskrcnn_swin_test", num_classes=11)
    torch.save(m.state_dict(), tmp_path / "mine.pth")
    common = ["--task", "detection", "--data", str(data / "val"), "--batch-size", "3", "--json",
              "--set", "train.stage1.epochs=1", *NO_FLOOR, "--set", "train.stage2.epochs=1",
              "--set", "train.calib_batches=1"]
    assert main(["compress", "--teacher", str(tmp_path / "mine.pth"), "--recipe", "sparse",
                 "--model", "maskrcnn_swin_test", "--out", str(tmp_path / "c"), *common]) == 0
    assert len(_json_out(capsys)["compressed_layers"]) == 16
    # --stage1-from: an int8 run on the sparse run's stage 1 (same teacher) skips its stage 1
    assert main(["compress", "--teacher", str(tmp_path / "mine.pth"), "--recipe", "int8", "--model",
                 "maskrcnn_swin_test", "--out", str(tmp_path / "q"), "--stage1-from", str(tmp_path / "c" / "stage1"),
                 *common]) == 0
    capsys.readouterr()
    first, reused = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("c", "q"))
    assert reused["history"]["stage1"] == first["history"]["stage1"] and reused["history"]["stage2"]
    bad = [(["--model", "maskrcnn_swin_t"], "does not match maskrcnn_swin_t"),
           ([], "is a weights file: name its architecture with --model"),
           (["--model", "upernet_swin_test"], "unknown detection model 'upernet_swin_test'"),
           (["--model", "maskrcnn_swin_test", "--set", "train.stage2.label_smoothing=0.1"],
            "train.stage2.label_smoothing is for classification")]  # a recipe field a task cannot use
    for extra, msg in bad:
        assert main(["compress", "--teacher", str(tmp_path / "mine.pth"), "--out", str(tmp_path / "d"),
                     *extra, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_task_errors_are_one_line(data, tmp_path, capsys):
    cases = [
        (["eval", "--task", "detecton", "--checkpoint", str(tmp_path), "--data", str(data / "val")],
         "unknown task 'detecton'; did you mean: detection"),
        (["eval", "--task", "segmentation", "--checkpoint", str(tmp_path), "--data", str(data / "val")],
         "is not a gpusq segmentation output directory"),
        (["train", "--task", "detection", "--model", "maskrcnn_swin_test", "--batch-size", "64",
          "--data", str(data / "val"), "--out", str(tmp_path / "o")], "fewer images (6) than one batch (64)"),
        (["eval", "--task", "detection", "--checkpoint", str(tmp_path), "--data", str(data / "val")],
         "is not a gpusq detection output directory"),
        (["train", "--task", "detection", "--model", "maskrcnn_swin_x", "--data", str(data / "val"),
          "--out", str(tmp_path / "o")], "unknown detection model 'maskrcnn_swin_x'"),
        (["train", "--task", "detection", "--model", "maskrcnn_swin_test", "--data", str(tmp_path / "none"),
          "--out", str(tmp_path / "o")], "does not exist"),
        (["train", "--task", "detection", "--model", "maskrcnn_swin_test", "--model-arg", "num_classes=5",
          "--data", str(data / "val"), "--out", str(tmp_path / "o")], "num_classes=5 but the data has 10 categories"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_classification_task_is_the_default_path(capsys):
    # --task classification strips the flag and reaches the classification parser unchanged
    with pytest.raises(SystemExit) as e:
        main(["eval", "--task", "classification", "--help"])
    assert e.value.code == 0
    assert "Top-1/top-5" in capsys.readouterr().out


def test_segmentation_train_compress_eval(data, tmp_path, capsys):
    pytest.importorskip("transformers")
    t, c = tmp_path / "teacher", tmp_path / "int8"
    common = ["--task", "segmentation", "--data", str(data / "train"), "--val-data", str(data / "val"),
              "--batch-size", "4", "--json"]
    assert main(["train", "--model", "upernet_swin_test", "--epochs", "1", "--out", str(t), *common]) == 0
    dense = _json_out(capsys)["metrics"]
    assert dense["images"] == 6 and 0 <= dense["miou"] <= 1 and 0 <= dense["pixel_acc"] <= 1
    assert main(["compress", "--teacher", str(t), "--set", "train.stage1.epochs=1", *NO_FLOOR,
                 "--set", "train.stage2.epochs=1",
                 "--set", "train.calib_batches=1", "--out", str(c), *common]) == 0
    rep = _json_out(capsys)
    assert len(rep["compressed_layers"]) >= 16
    assert all(n.startswith("backbone.") and ".blocks." in n for n in rep["compressed_layers"])
    state = read_compressed_dir(c)[0]  # effective weights, masks, scales
    assert all(is_2to4(state[f"{n}.weight"]) for n in rep["compressed_layers"])
    full = json.loads((c / "report.json").read_text())
    for stage in ("stage1_losses", "stage2_losses"):  # feature KD and per-pixel logit KD both ran
        assert full[stage]["feat"] > 0 and full[stage]["soft"] > 0, full[stage]
    assert main(["eval", "--task", "segmentation", "--checkpoint", str(c), "--data", str(data / "val"), "--json"]) == 0
    ev = _json_out(capsys)
    assert ev["miou"] == pytest.approx(rep["metrics"]["miou"], abs=1e-9)
    assert ev["pixel_acc"] == pytest.approx(rep["metrics"]["pixel_acc"], abs=1e-9)
