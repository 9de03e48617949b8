"""The Python API: ``gpusq.compress`` from a user's own DataLoader (train= / val= / calib=), its refusals,
exact resume from a DataLoader, and ``out`` refused unless new, a resume of the same run, or overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpusq
from gpusq.errors import GpusqError
from gpusq.pipeline import DataOptions, load_any
from gpusq.recipes import load_recipe
from tests.helpers import TINY_KW, crash_after_checkpoint, tiny_vit

MODEL = "deit_tiny_patch16_224"
CPU = torch.device("cpu")
FAST = {"train": {"stage1": {"epochs": 1, "min_steps": 0}, "stage2": {"epochs": 1, "min_steps": 0},
                  "calib_batches": 1, "importance_batches": 1}}


def _data(n: int, seed: int) -> TensorDataset:
    """Learnable: the class is which of 10 fixed patterns (plus noise) the image is."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(10, 3, 16, 16, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(patterns[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g), y)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return tiny_vit().eval()


def _compress(teacher, out, recipe="int8", over=None, **kw):
    train = kw.pop("train", DataLoader(_data(64, 1), batch_size=16, shuffle=True))
    val = kw.pop("val", DataLoader(_data(32, 2), batch_size=16))
    return gpusq.compress(teacher, load_recipe(recipe, over or FAST), train=train, val=val, out=out,
                          model_name=MODEL, model_kwargs=dict(TINY_KW), device=CPU, progress=False, **kw)


@torch.no_grad()
def _top1(model, loader) -> float:
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * right / sum(len(y) for _, y in loader)


def test_compress_from_a_plain_dataloader_and_evaluate(teacher, tmp_path):
    """A TensorDataset in a DataLoader: both stages run on it; the written model, loaded back, scores on
    the val loader what the report says; calib= feeds calibration and the layer importance."""
    val = DataLoader(_data(32, 2), batch_size=16)
    calib = [(x, y) for x, y in DataLoader(_data(16, 3), batch_size=8)]  # a list of batches is re-iterable
    rep = _compress(teacher, tmp_path / "c", val=val, calib=calib)
    assert rep["history"]["stage1"] and rep["history"]["stage2"]
    assert rep["data"] == "DataLoader (Python)" and rep["classes"] is None
    assert set(rep["layer_weights"]) == {"blocks.0", "blocks.1"}
    assert rep["history"]["stage1"][0]["losses"].keys() == {"hard", "soft", "feat"}
    out = load_any(str(tmp_path / "c"))
    assert _top1(out, val) == pytest.approx(rep["metrics"]["top1"])
    assert rep["teacher_metrics"]["top1"] == pytest.approx(_top1(teacher, val))
    assert json.loads((tmp_path / "c" / "report.json").read_text())["recipe"] == "int8"


def test_compress_refuses_what_cannot_work(teacher, tmp_path):
    loader = DataLoader(_data(32, 1), batch_size=16)
    cases = [
        (dict(train=(b for b in loader), val=loader), "one-shot iterator"),
        (dict(train=loader, val=iter(loader)), "val= is a one-shot iterator"),
        (dict(train=loader), "train= needs val= too"),
        (dict(train="data/imagenet", val=loader), "is a path; paths go through DataOptions"),
        (dict(train=loader, val=loader, data=DataOptions("mnist5k")), "one way"),
        (dict(train=[(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))],
              val=loader), "train= batch 0: inputs must be a float tensor"),
        (dict(train=[(torch.zeros(4, 3, 16, 16), torch.full((4,), 10))], val=loader),
         "train= batch 0: label 10 is outside [0, 9]"),
        (dict(train=[{"x": 1}], val=loader), "expected a pair (inputs, labels), got dict"),
        (dict(train=[], val=loader), "train= has no batches"),
    ]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(GpusqError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            gpusq.compress(teacher, load_recipe("int8", FAST), out=tmp_path / f"o{i}", device=CPU, progress=False,
                           **kw)
    with pytest.raises(GpusqError, match="augment.auto_augment is applied by gpusq's image loader"):
        _compress(teacher, tmp_path / "aa", over={**FAST, "augment": {"auto_augment": "rand-m9-mstd0.5-inc1"}})
    with pytest.raises(GpusqError, match="has no length"):
        class NoLen:
            def __iter__(self):
                return iter(loader)

        _compress(teacher, tmp_path / "nl", train=NoLen())


def test_out_is_refused_unless_new_resumed_or_overwritten(teacher, tmp_path):
    """As the CLI: a finished output or a foreign folder is refused; resume must be of the same run."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(GpusqError, match=r"out .*mine is not empty and holds no gpusq output \(thesis.tex\)"):
        _compress(teacher, mine)
    done = tmp_path / "done"
    _compress(teacher, done, "sparse")
    with pytest.raises(GpusqError, match=r"already holds a gpusq output .*; pass overwrite=True to replace it"):
        _compress(teacher, done)
    (done / "notes.txt").write_text("mine")
    rep = _compress(teacher, done, overwrite=True)
    assert rep["recipe"] == "int8" and (done / "notes.txt").read_text() == "mine"
    with pytest.raises(GpusqError, match="pass one of them"):
        _compress(teacher, done, overwrite=True, resume=True)
    with pytest.raises(GpusqError, match="nothing to resume: no checkpoint"):
        _compress(teacher, tmp_path / "new", resume=True)
    theirs = tmp_path / "theirs"  # overwrite keeps your files, and never writes over one of them
    theirs.mkdir()
    (theirs / "report.json").write_text("{}")
    with pytest.raises(GpusqError, match=r"out .*theirs holds report.json, not written by gpusq"):
        _compress(teacher, theirs, overwrite=True)


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_resume_from_a_shuffling_dataloader_is_exact(teacher, tmp_path, monkeypatch):
    """Killed mid-epoch in stage 1 and in stage 2 (shuffled DataLoader: the order is seeded per epoch;
    dropout draws from the global RNG between the loader's draws), resumed: the same tensors as the
    uninterrupted run. Another recipe or another loader length cannot resume the run."""
    torch.manual_seed(0)
    teacher = tiny_vit(drop_rate=0.1).eval()
    over = {"train": {"stage1": {"epochs": 2, "min_steps": 0}, "stage2": {"epochs": 2, "min_steps": 0},
                      "calib_batches": 1, "importance_batches": 1}}
    ref = tmp_path / "ref"
    _compress(teacher, ref, over=over, ckpt_every=3)
    a = _tensors(ref)
    for crash in (1, 5):  # stage 1 at step 3 (mid-epoch), stage 2 at step 3
        out = tmp_path / f"c{crash}"
        crash_after_checkpoint(monkeypatch, crash)
        with pytest.raises(KeyboardInterrupt):
            _compress(teacher, out, over=over, ckpt_every=3)
        monkeypatch.undo()
        with pytest.raises(GpusqError, match=r"holds an interrupted run \(.*\); pass resume=True to continue"):
            _compress(teacher, out, over=over, ckpt_every=3)
        with pytest.raises(GpusqError, match="holds an interrupted run with another recipe"):
            _compress(teacher, out, over={**over, "distill": {"beta": 1.0}}, ckpt_every=3, resume=True)
        with pytest.raises(GpusqError, match=r"another train batches \(4 → 2\)"):
            _compress(teacher, out, over=over, ckpt_every=3, resume=True,
                      train=DataLoader(_data(64, 1), batch_size=32, shuffle=True))
        _compress(teacher, out, over=over, ckpt_every=3, resume=True)
        b = _tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"crash {crash}"


SHARDED = '''
import os, sys
import timm, torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
import gpusq
from gpusq.errors import GpusqError

def data(n, seed):
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(10, 3, 16, 16, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(patterns[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g), y)

out, world = sys.argv[1], int(os.environ.get("WORLD_SIZE", "1"))
torch.manual_seed(0)
teacher = timm.create_model("deit_tiny_patch16_224", **%r)
recipe = gpusq.load_recipe("int8", %r)
tr, va, cpu = data(64, 1), data(32, 2), torch.device("cpu")
if world == 1:
    train, val = DataLoader(tr, batch_size=16), DataLoader(va, batch_size=16)
else:  # the user shards: rank r takes samples r, r + 2, ... (a global batch of 16 is the 1-process batch)
    rank = int(os.environ["RANK"])
    try:  # ranks with different numbers of batches: refused on every rank, before out is touched
        gpusq.compress(teacher, recipe, train=DataLoader(tr, batch_size=8 * (rank + 1)), val=va, out=out, device=cpu)
    except GpusqError as e:
        print(f"REFUSED {e}", flush=True)
    train = DataLoader(tr, batch_size=8, sampler=DistributedSampler(tr, shuffle=False))
    val = DataLoader(va, batch_size=16, sampler=DistributedSampler(va, shuffle=False))
gpusq.compress(teacher, recipe, train=train, val=val, out=out, device=cpu, progress=False)
'''


def test_torchrun_with_user_sharded_loaders_matches_one_process(tmp_path):
    """2 gloo processes, each with its DistributedSampler shard, train what 1 process trains on the whole
    batches (same masks, calibration, metrics; weights up to float summation order)."""
    import os
    import subprocess
    import sys

    from gpusq.checkpoint import read_compressed_dir

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED % (dict(TINY_KW), FAST))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "c1")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), str(tmp_path / "c2")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("under torchrun every rank's train= must have the same number of batches") == 2
    r1, r2 = (json.loads((tmp_path / c / "report.json").read_text()) for c in ("c1", "c2"))
    assert r1["processes"] == 1 and r2["processes"] == 2
    assert r1["teacher_metrics"] == pytest.approx(r2["teacher_metrics"])  # val shards summed: all 32 once
    assert [h["step"] for h in r1["history"]["stage1"]] == [h["step"] for h in r2["history"]["stage1"]] == [4]
    for stage, rel in (("stage1", 1e-5), ("stage2", 1e-4)):  # stage 2: importance = mean of the ranks' ratios
        assert r2["history"][stage][0]["train_loss"] == pytest.approx(r1["history"][stage][0]["train_loss"], rel=rel)
    assert r2["layer_weights"] == pytest.approx(r1["layer_weights"], rel=1e-4)
    assert r2["metrics"]["loss"] == pytest.approx(r1["metrics"]["loss"], rel=1e-3)
    w1, w2 = (read_compressed_dir(tmp_path / c)[0] for c in ("c1", "c2"))
    assert w1.keys() == w2.keys()
    for k in w1:
        if k.endswith("weight_mask"):
            assert torch.equal(w1[k], w2[k]), k
        elif k.endswith("input_scale"):  # calibrated on the same images, then learned (LSQ) in 4 steps
            assert torch.allclose(w1[k], w2[k], rtol=0.1), k
        elif w1[k].dtype.is_floating_point:
            assert torch.allclose(w1[k].float(), w2[k].float(), atol=2e-2), k
