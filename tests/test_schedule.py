"""Stage lengths: ``epochs`` over the data, never fewer than ``min_steps`` optimizer steps (issue 15.3)."""

import torch

from gpusq.data import Batches
from gpusq.engine import stage_steps, train_stage
from gpusq.pipeline import ClassificationAdapter
from gpusq.recipes import StageConfig, load_recipe


def test_stage_steps_floor_only_raises_short_stages():
    cfg = lambda ep, ms: StageConfig(epochs=ep, min_steps=ms)  # noqa: E731
    assert stage_steps(cfg(10, 0), 11) == 110
    assert stage_steps(cfg(10, 300), 11) == 300  # small data: 10 epochs are 110 steps, raised to the floor
    assert stage_steps(cfg(10, 300), 1000) == 10_000  # large data: the floor never binds
    assert stage_steps(cfg(0.5, 0), 7) == 4
    assert stage_steps(cfg(0, 300), 11) == 0  # epochs 0 still skips the stage (PTQ-only)


def test_shipped_recipes_have_a_floor_for_both_stages():
    for name in ("int8", "int4", "fp8"):
        r = load_recipe(name)
        assert r.train.stage1.min_steps > 0 and r.train.stage2.min_steps > 0, name
        # a floor only small datasets reach: at the shipped batch size, fewer than 4,000 images
        assert r.train.stage1.min_steps * r.train.stage1.batch_size <= 10 * 4000
    assert load_recipe("sparse").train.stage1.min_steps > 0


def test_train_stage_runs_min_steps_across_epochs(capsys):
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 255, (48, 3, 8, 8), dtype=torch.uint8),
                                        torch.randint(0, 3, (48,)))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    cfg = StageConfig(epochs=1, min_steps=15, lr=1e-2, min_lr=1e-4, weight_decay=0.0, batch_size=8)
    res = train_stage("stage1", net, Batches(ds, 8, shuffle=True, drop_last=True), cfg, torch.device("cpu"),
                      adapter=ClassificationAdapter(None, torch.device("cpu"), flip=False), progress=False)
    assert [h["step"] for h in res.history] == [6, 12, 15]  # 6 steps per epoch; the last epoch is partial
    out = capsys.readouterr().out
    assert "1 epochs are 6 steps on this data; running min_steps=15" in out and "min_steps=0" in out
    res0 = train_stage("stage1", net, Batches(ds, 8, shuffle=True, drop_last=True),
                       StageConfig(epochs=1, min_steps=0, batch_size=8), torch.device("cpu"),
                       adapter=ClassificationAdapter(None, torch.device("cpu"), flip=False), progress=False)
    assert [h["step"] for h in res0.history] == [6] and "min_steps" not in capsys.readouterr().out
