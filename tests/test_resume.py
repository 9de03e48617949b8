"""Exact resume: kill -9 a compress run mid-stage (twice: in stage 1, then in stage 2), resume, and
end with the same tensors as an uninterrupted run; truncated checkpoints fall back to ``.prev``."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from gpusq.data import Batches
from gpusq.engine import load_latest_state, prev_path, train_stage
from gpusq.pipeline import ClassificationAdapter, DataOptions, train_dense
from gpusq.recipes import StageConfig
from tests.helpers import make_colour_folder

KWD = dict(img_size=16, patch_size=4, num_classes=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"), 1, {"train": 32, "val": 8})


@pytest.fixture(scope="module")
def teacher(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    train_dense("deit_tiny_patch16_224", dict(KWD), DataOptions(str(folder), workers=0), out, epochs=1,
                lr=2e-3, batch_size=16, warmup_epochs=0.2, progress=False, device=torch.device("cpu"))
    return out


def _args(folder, teacher, out) -> list[str]:
    # 8 steps per epoch; stage 1: 1 epoch raised to min_steps=24 (the floor spans epochs), stage 2: exactly
    # 3 epochs = 24 steps; a checkpoint every 3 steps (mid-epoch)
    return [sys.executable, "-m", "gpusq", "compress", "--teacher", str(teacher), "--recipe", "int8",
            "--data", str(folder), "--workers", "0", "--batch-size", "16", "--device", "cpu",
            "--set", "train.stage1.epochs=1", "--set", "train.stage1.min_steps=24",
            "--set", "train.stage2.epochs=3", "--set", "train.stage2.min_steps=0", "--set", "train.calib_batches=2",
            "--set", "train.importance_batches=2", "--ckpt-every", "3", "--out", str(out)]


def _run_and_kill(argv: list[str], ckpt) -> None:
    """Start ``argv``; SIGKILL it as soon as ``ckpt`` exists (polled every 5 ms)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_kill9_and_resume_is_bitwise_exact(folder, teacher, tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_args(folder, teacher, ref), env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    _run_and_kill(_args(folder, teacher, out), out / "checkpoints" / "stage1.safetensors")
    assert not (out / "model.safetensors").exists() and not (out / "stage1").exists(), "killed too late"
    _run_and_kill(_args(folder, teacher, out) + ["--resume"], out / "checkpoints" / "stage2.safetensors")
    assert not (out / "model.safetensors").exists(), "killed too late"
    assert (out / "stage1" / "stage1.json").is_file()
    p = subprocess.run(_args(folder, teacher, out) + ["--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"resumed stage2 at step (\d+)/(\d+)", p.stdout)
    assert m and 0 < int(m[1]) < int(m[2]), p.stdout
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise equal on CPU
    assert not (out / "checkpoints").exists()


def test_truncated_checkpoint_falls_back_to_prev(tmp_path, capsys):
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 255, (48, 3, 8, 8), dtype=torch.uint8),
                                        torch.randint(0, 3, (48,)))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    cfg = StageConfig(epochs=1, lr=1e-2, min_lr=1e-4, weight_decay=0.0, warmup_epochs=0, batch_size=8)
    ck = tmp_path / "ck.safetensors"
    train_stage("s", net, Batches(ds, 8, shuffle=True, drop_last=True), cfg, torch.device("cpu"),
                adapter=ClassificationAdapter(None, torch.device("cpu"), flip=True),
                ckpt_path=ck, ckpt_every=2, progress=False)
    assert load_latest_state(ck)["step"] == 6 and load_latest_state(prev_path(ck))["step"] == 4
    ck.write_bytes(ck.read_bytes()[:100])  # a torn write (e.g. a copy cut short)
    st = load_latest_state(ck)
    out = capsys.readouterr().out
    assert st["step"] == 4 and "unreadable" in out and "using the previous checkpoint" in out
    # resuming from it continues at step 4 and finishes
    net2 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    train_stage("s", net2, Batches(ds, 8, shuffle=True, drop_last=True), cfg, torch.device("cpu"),
                adapter=ClassificationAdapter(None, torch.device("cpu"), flip=True),
                ckpt_path=ck, ckpt_every=2, resume=True, progress=False)
    assert "resumed s at step 4/6" in capsys.readouterr().out
    assert torch.equal(net2[1].weight, net[1].weight)  # same end point as the uninterrupted run
