"""Tiny models shared by the tests."""

import timm

TINY_KW = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(**kw):
    return timm.create_model("deit_tiny_patch16_224", **{**TINY_KW, **kw})
