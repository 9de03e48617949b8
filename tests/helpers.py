"""Tiny models shared by the tests."""

import timm

TINY_KW = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2)


# the CLI tests' tiny 4-class model and a compress run of a few steps
MODEL = "deit_tiny_patch16_224"
KWD = dict(img_size=16, patch_size=4, num_classes=4, embed_dim=32, depth=1, num_heads=2)
KW = ",".join(f"{k}={v}" for k, v in KWD.items())
FAST = ["--workers", "0", "--batch-size", "8", "--device", "cpu"]
TINY_RECIPE = ["--set", "train.stage1.epochs=0.25", "--set", "train.stage2.epochs=0.25",
               "--set", "train.stage1.min_steps=0", "--set", "train.stage2.min_steps=0",
               "--set", "train.calib_batches=1", "--set", "train.importance_batches=1"]


def tiny_vit(**kw):
    return timm.create_model("deit_tiny_patch16_224", **{**TINY_KW, **kw})


def make_colour_folder(root, seed: int, counts: dict, classes: int = 4, size: int = 16):
    """An ImageFolder of noisy colour images whose mean colour is the class (learnable in a few steps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def crash_after_checkpoint(monkeypatch, n: int) -> None:
    """Make the n-th training checkpoint write the last thing the run does (as a kill right after it)."""
    import gpusq.engine

    real = gpusq.engine.save_train_state
    calls = {"n": 0}

    def save_then_die(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(gpusq.engine, "save_train_state", save_then_die)
