"""Issue 17.7: nothing overwritten, nothing silently mismatched (tried as a new user would).

* ``--out`` holding a gpusq output is refused unless ``--overwrite`` / ``--resume``; a non-empty
  folder that is not a gpusq output is always refused, naming what is there;
* class names travel with every output (teacher and compressed); train / compress / eval /
  export --verify check the data's classes against them and stop with one line naming the difference.
"""

import json
import os

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from gpusq.classes import recorded_classes
from gpusq.cli import main
from gpusq.pipeline import _write_dense
from tests.helpers import FAST, KW, KWD, MODEL, TINY_RECIPE

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(root, classes, n=8, val_classes=None):
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _teacher(out, classes, num_classes=None):
    torch.manual_seed(0)
    kw = {**KWD, "num_classes": num_classes or (len(classes) if classes else 4)}
    _write_dense(timm.create_model(MODEL, **kw), out, MODEL, kw, classes)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("imgs"), ["c0", "c1", "c2", "c3"])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("three"), ["cat", "dog", "frog"])


def _fails(capsys, argv, msg, code=2):
    capsys.readouterr()
    assert main(argv) == code, argv
    full = capsys.readouterr().err.strip()
    err = full.splitlines()[-1]
    assert msg in err, (argv, full)
    assert err.startswith(f"gpusq {argv[0]}: error: "), full
    assert "Traceback" not in full and full.count("error:") == 1, full
    return err


def _snapshot(d):
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*"))
            if p.is_file()}


# -- --out: nothing overwritten ---------------------------------------------------------------------
def test_out_holding_a_result_is_refused_unless_overwrite(capsys, tmp_path, folder, monkeypatch):
    """The README's own sequence in one working directory: `compress --out int8`, then another recipe
    into the same --out is refused (and does not fail on recipe lookup, issue 17.6); --overwrite replaces
    the result and keeps the user's own files."""
    monkeypatch.chdir(tmp_path)
    teacher = _teacher(tmp_path / "teacher", ["c0", "c1", "c2", "c3"])
    base = ["compress", "--teacher", str(teacher), "--data", str(folder), *FAST, *TINY_RECIPE]
    assert main([*base, "--recipe", "int8", "--out", "int8"]) == 0
    out = tmp_path / "int8"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "int8"
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    err = _fails(capsys, [*base, "--recipe", "int4", "--out", "int8"], "--out int8 already holds a gpusq output (")
    assert err.endswith("--out int8 already holds a gpusq output (model.safetensors, model.yaml, recipe.yaml, "
                        "report.json, report.md and 2 more); pass --overwrite to replace it"), err
    assert _snapshot(out) == before  # nothing touched
    # the same for train and for a shipped recipe that bases on int8 (int4) read from this directory
    _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(folder), "--out", "int8", *FAST],
           "--out int8 already holds a gpusq output")
    assert _snapshot(out) == before
    (out / "stage1" / "stale.txt").write_text("x")  # inside a gpusq entry: replaced with it
    assert main([*base, "--recipe", "int4", "--out", "int8", "--overwrite"]) == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "int4"
    assert (out / "notes.txt").read_text() == "mine"  # not gpusq's: kept
    assert not (out / "stage1" / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["recipe"] == "int4"
    _fails(capsys, [*base, "--out", "int8", "--overwrite", "--resume"], "pass one of them")


def test_out_that_is_not_a_gpusq_output_is_refused(capsys, tmp_path, folder):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    for name in ("photo.jpg", "model.safetensors", "report.json", "a.txt", "b.txt", "c.txt"):
        (home / name).write_text("user data")  # names gpusq uses, but not gpusq's files
    before = _snapshot(home)
    teacher = _teacher(tmp_path / "teacher", ["c0", "c1", "c2", "c3"])
    for argv in (["compress", "--teacher", str(teacher)], ["train", "--model", MODEL, "--model-arg", KW]):
        for extra in ([], ["--overwrite"], ["--resume"]):
            err = _fails(capsys, [*argv, "--data", str(folder), "--out", str(home), *FAST, *extra],
                         f"--out {home} is not empty and holds no gpusq output (")
            assert "Documents/, a.txt, b.txt, c.txt, model.safetensors and 2 more); choose a new or empty " \
                   "directory" in err, err
    assert _snapshot(home) == before and (home / "Documents").is_dir()


def test_interrupted_run_needs_resume_or_overwrite(capsys, tmp_path, folder):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "train.safetensors").write_bytes(b"state")
    err = _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(folder), "--out", str(out),
                          *FAST], f"--out {out} holds an interrupted run (checkpoints/)")
    assert err.endswith("pass --resume to continue it or --overwrite to start over"), err
    # a run that failed before saving a checkpoint leaves nothing that blocks the next one
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "checkpoints" / "classes.json").write_text('["c0"]')
    assert main(["train", "--model", MODEL, "--model-arg", KW, "--data", str(folder), "--out", str(empty),
                 "--epochs", "0.1", *FAST]) == 0
    assert (empty / "model.safetensors").is_file() and not (empty / "checkpoints").exists()


def test_demo_refuses_foreign_and_earlier_output(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("gpusq.demo.run_demo", lambda out, *a, **k: calls.append(out))
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    _fails(capsys, ["demo", "--out", str(foreign), "--overwrite"],
           "is not empty and holds no gpusq output (thesis.tex)")
    demo = tmp_path / "gpusq-demo"
    (demo / "teacher").mkdir(parents=True)
    (demo / "summary.json").write_text("{}")
    (demo / "keep.txt").write_text("x")
    _fails(capsys, ["demo", "--out", str(demo)], "already holds a gpusq demo output (summary.json, teacher/); "
           "pass --overwrite to replace it")
    assert calls == []
    assert main(["demo", "--out", str(demo), "--overwrite"]) == 0
    assert calls == [str(demo)] and sorted(p.name for p in demo.iterdir()) == ["keep.txt"]


# -- classes: nothing silently mismatched --------------------------------------------------------------
def test_classes_are_recorded_by_train_and_compress(capsys, tmp_path, folder):
    t, c = tmp_path / "t", tmp_path / "c"
    assert main(["train", "--model", MODEL, "--model-arg", KW, "--data", str(folder), "--out", str(t),
                 "--epochs", "0.2", *FAST]) == 0
    names = ["c0", "c1", "c2", "c3"]
    assert recorded_classes(t) == names and yaml.safe_load((t / "model.yaml").read_text())["classes"] == names
    assert main(["compress", "--teacher", str(t), "--recipe", "sparse", "--data", str(folder), "--out", str(c),
                 *FAST, *TINY_RECIPE]) == 0
    from gpusq.checkpoint import read_compressed_dir

    assert read_compressed_dir(c)[1]["classes"] == names and recorded_classes(c / "stage1") == names
    assert yaml.safe_load((c / "model.yaml").read_text())["classes"] == names
    assert json.loads((c / "report.json").read_text())["classes"] == names


def test_teacher_of_other_classes_is_refused_everywhere(capsys, tmp_path, folder, three):
    """A 10-class CIFAR teacher on a 3-class folder: compress, eval, train --init and export --verify stop."""
    cifar = _teacher(tmp_path / "cifar", CIFAR)
    out = tmp_path / "o"
    expect = (f"the teacher was trained on 10 classes [airplane, automobile, bird, cat, deer, ...]; "
              f"the data ({three}) has 3 [cat, dog, frog]")
    err = _fails(capsys, ["compress", "--teacher", str(cifar), "--data", str(three), "--out", str(out), *FAST],
                 expect)
    assert err == f"gpusq compress: error: {expect}"
    assert not out.exists()
    _fails(capsys, ["eval", "--checkpoint", str(cifar), "--data", str(three), *FAST],
           f"checkpoint {cifar} was trained on 10 classes [airplane, automobile, bird, cat, deer, ...]; "
           f"the data ({three}) has 3 [cat, dog, frog]")
    _fails(capsys, ["train", "--init", str(cifar), "--data", str(three), "--out", str(out), *FAST],
           f"--init {cifar} was trained on 10 classes")
    assert not out.exists()
    # same number, other names; same names, other order
    other = _teacher(tmp_path / "other", ["c0", "c1", "c2", "cX"])
    _fails(capsys, ["compress", "--teacher", str(other), "--data", str(folder), "--out", str(out), *FAST],
           f"the teacher was trained on other classes than the data ({folder}) has: [cX] only in the teacher, "
           "[c3] only in the data")
    swapped = _teacher(tmp_path / "swapped", ["c0", "c2", "c1", "c3"])
    _fails(capsys, ["eval", "--checkpoint", str(swapped), "--data", str(folder), *FAST],
           f"class order differs at index 1: checkpoint {swapped} has 'c2' there, the data ({folder}) has 'c1'")
    # a model trained from scratch whose head does not fit the data
    _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(three), "--out", str(out), *FAST],
           f"the model {MODEL} has a 4-class head; the data ({three}) has 3 classes [cat, dog, frog]; "
           "pass --model-arg num_classes=3")
    assert not out.exists()


def test_outputs_without_names_fall_back_to_the_head_size(capsys, tmp_path, folder, three):
    old = _teacher(tmp_path / "old", None)  # as written before class names were recorded
    assert recorded_classes(old) is None
    _fails(capsys, ["compress", "--teacher", str(old), "--data", str(three), "--out", str(tmp_path / "o"), *FAST],
           f"the teacher has a 4-class head; the data ({three}) has 3 classes [cat, dog, frog] (the teacher records "
           "no class names, so only their number is checked)")
    torch.save(timm.create_model(MODEL, **KWD).state_dict(), tmp_path / "w.pth")
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "w.pth"), "--model", MODEL, "--model-arg", KW,
                    "--data", str(three), *FAST], "has a 4-class head; the data")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(old), "--data", str(folder), *FAST]) == 0
    assert f"note: checkpoint {old} records no class names; their number (4) matches its head" in \
        capsys.readouterr().err


def test_resume_and_splits_with_other_classes(capsys, tmp_path, folder):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "train.safetensors").write_bytes(b"state")
    (out / "checkpoints" / "classes.json").write_text('["a", "b", "c", "d"]')
    _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(folder), "--out", str(out),
                    "--resume", *FAST],
           f"the interrupted run in {out} was trained on other classes than the data ({folder}) has: "
           "[a, b, c, d] only in the interrupted run")
    lopsided = _images(tmp_path / "lop", ["c0", "c1", "c2", "c3"], val_classes=["c0", "c1", "c3", "c4"])
    _fails(capsys, ["train", "--model", MODEL, "--model-arg", KW, "--data", str(lopsided), "--out",
                    str(tmp_path / "o"), *FAST],
           f"the train split of {lopsided} and its val split have different classes: [c2] only in the train "
           f"split of {lopsided}, [c4] only in its val split")


def test_export_verify_checks_classes(capsys, tmp_path, folder, three):
    pytest.importorskip("onnxruntime")
    t, c = _teacher(tmp_path / "t", ["c0", "c1", "c2", "c3"]), tmp_path / "c"
    assert main(["compress", "--teacher", str(t), "--recipe", "int8", "--data", str(folder), "--out", str(c),
                 *FAST, *TINY_RECIPE]) == 0
    onnx = tmp_path / "m.onnx"
    _fails(capsys, ["export", "--checkpoint", str(c), "--out", str(onnx), "--verify", str(three)],
           f"checkpoint {c} was trained on 4 classes [c0, c1, c2, c3]; the data ({three}) has 3 [cat, dog, frog]")
    assert not onnx.exists()
    assert main(["export", "--checkpoint", str(c), "--out", str(onnx), "--verify", str(folder),
                 "--verify-samples", "8", "--batch-size", "8"]) == 0


# -- dense-prediction tasks ---------------------------------------------------------------------------
def _task_dir(out, task, model, kwargs, classes, label_to_cat=None):
    from safetensors.torch import save_file

    from gpusq import families

    torch.manual_seed(0)
    m = families.build(model, task, **kwargs)
    out.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"gpusq_task": task})
    info = {"task": task, "format": "task-1", "model": model, "model_kwargs": kwargs, "compressed": False}
    if label_to_cat:
        info["label_to_cat"] = label_to_cat
    if classes is not None:
        info["classes"] = classes
    (out / "task.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return out


def test_task_outputs_check_classes_and_out(capsys, tmp_path):
    pytest.importorskip("pycocotools")
    from gpusq.tasks.mnist_canvas import build_mnist_canvas

    data = tmp_path / "canvas"
    build_mnist_canvas(data, n=3, size=64, seed=0)
    assert (data / "classes.txt").read_text().split() == ["background", *map(str, range(10))]
    digits = [str(d) for d in range(10)]
    # the same categories under other names
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    os.symlink(data / "images", renamed / "images")
    coco = json.loads((data / "instances.json").read_text())
    for c in coco["categories"]:
        c["name"] = f"digit{c['name']}"
    (renamed / "instances.json").write_text(json.dumps(coco))
    t = _task_dir(tmp_path / "t", "detection", "maskrcnn_swin_test", {"num_classes": 11}, digits,
                  {i: i for i in range(1, 11)})
    _fails(capsys, ["eval", "--task", "detection", "--checkpoint", str(t), "--data", str(renamed)],
           f"checkpoint {t} was trained on other classes than the data ({renamed}) has: [0, 1, 2, 3, 4, ...] only "
           "in checkpoint")
    out = tmp_path / "c"
    _fails(capsys, ["compress", "--task", "detection", "--teacher", str(t), "--data", str(renamed), "--out",
                    str(out)], "the teacher was trained on other classes")
    assert not out.exists()
    # --out of a task run holding a task output
    _fails(capsys, ["train", "--task", "detection", "--model", "maskrcnn_swin_test", "--data", str(data),
                    "--out", str(t)], f"--out {t} already holds a gpusq output (model.safetensors, task.yaml)")
    _fails(capsys, ["compress", "--task", "detection", "--teacher", str(t), "--data", str(data), "--out", str(t)],
           "pass --overwrite to replace it")
    # segmentation: a folder's classes.txt names its labels; a teacher of another label set is refused
    pytest.importorskip("transformers")
    seg = _task_dir(tmp_path / "seg", "segmentation", "upernet_swin_test", {"num_labels": 11},
                    ["background", *digits])
    (renamed / "labels").symlink_to(data / "labels")
    (renamed / "classes.txt").write_text("\n".join(["background", *[f"d{d}" for d in digits]]) + "\n")
    _fails(capsys, ["eval", "--task", "segmentation", "--checkpoint", str(seg), "--data", str(renamed)],
           f"checkpoint {seg} was trained on other classes than the data ({renamed}) has")
    (renamed / "classes.txt").write_text("background\none\ntwo\n")
    _fails(capsys, ["eval", "--task", "segmentation", "--checkpoint", str(seg), "--data", str(renamed)],
           f"checkpoint {seg} was trained on 11 classes [background, 0, 1, 2, 3, ...]; the data ({renamed}) has 3 "
           "[background, one, two]")
    _fails(capsys, ["train", "--task", "segmentation", "--model", "upernet_swin_test", "--model-arg", "num_labels=5",
                    "--data", str(renamed), "--out", str(tmp_path / "s2")],
           "num_labels=5 but the data names 3 classes (background included) in its classes.txt")
