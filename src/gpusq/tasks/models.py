"""The builders of the dense-prediction families (registered in ``gpusq.families``), offline and with
random weights: Mask R-CNN on a Swin + FPN backbone (torchvision + timm), UPerNet-Swin and DETR /
Deformable-DETR (transformers).

Mask R-CNN's backbone is timm's Swin (``features_only``, ``strict_img_size=False`` so any image size
that torchvision's transform produces is accepted), its four NHWC stage outputs turned NCHW and fed to
torchvision's ``FeaturePyramidNetwork``; the detector is torchvision's ``MaskRCNN``.

DETR / Deformable-DETR are built from configs on transformers' own ``ResNetConfig`` (no timm, no hub),
``use_pretrained_backbone=False``; Deformable-DETR runs its pure-PyTorch multi-scale deformable
attention (``disable_custom_kernels=True``), so nothing is compiled on any machine.

Which layers of these models GPUSQ compresses and distils is not here: it is their family's record.
timm, torchvision and transformers are imported only when a model is built.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from gpusq.errors import GpusqError

SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
# For tests and the CPU smoke runs: one block per stage, 32-wide.
SWIN_TINY_TEST = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4)


class SwinFPN(nn.Module):
    """timm Swin stages → torchvision FPN (+ max-pool level): the backbone torchvision's
    detectors expect (a module with ``out_channels`` returning an OrderedDict of NCHW maps)."""

    def __init__(self, img_size: int = 224, fpn_channels: int = 256, swin_name: str = "swin_tiny_patch4_window7_224",
                 **swin_kwargs: Any):
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = timm.create_model(swin_name, pretrained=False, features_only=True, img_size=img_size,
                                      strict_img_size=False, out_indices=(0, 1, 2, 3), **swin_kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f.permute(0, 3, 1, 2).contiguous()) for i, f in enumerate(feats)))


def maskrcnn_swin(num_classes: int, img_size: int = 224, swin: dict | None = None, fpn_channels: int = 256,
                  anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512), min_size: int | None = None,
                  max_size: int | None = None, image_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                  image_std: tuple[float, ...] = (0.229, 0.224, 0.225), **kwargs: Any) -> nn.Module:
    """torchvision ``MaskRCNN`` on ``SwinFPN``. ``num_classes`` includes background.

    ``min_size``/``max_size`` (torchvision's resize) default to ``img_size`` so that images of the
    training size are not rescaled; other sizes are resized and padded to a multiple of 32.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = SwinFPN(img_size=img_size, fpn_channels=fpn_channels, **(swin or SWIN_T))
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return MaskRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
                    min_size=min_size or img_size, max_size=max_size or img_size,
                    image_mean=list(image_mean), image_std=list(image_std), **kwargs)


def maskrcnn_swin_t(num_classes: int = 91, **kw: Any) -> nn.Module:
    """Mask R-CNN on Swin-T + FPN (COCO's 80 categories + background by default)."""
    return maskrcnn_swin(num_classes, **{"swin": SWIN_T, **kw})


def maskrcnn_swin_test(num_classes: int = 11, **kw: Any) -> nn.Module:
    """A CPU-sized Mask R-CNN for 64–96 px canvases (MNIST-canvas): tiny Swin, small anchors."""
    base = dict(img_size=64, swin=SWIN_TINY_TEST, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128),
                image_mean=(0.1307,) * 3, image_std=(0.3081,) * 3, rpn_batch_size_per_image=64,
                box_batch_size_per_image=64, box_detections_per_img=20)
    return maskrcnn_swin(num_classes, **{**base, **kw})


def upernet_swin(num_labels: int, img_size: int = 512, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, hidden_size: int = 512,
                 auxiliary_head: bool = True, drop_path_rate: float = 0.1) -> nn.Module:
    """transformers' ``UperNetForSemanticSegmentation`` with a randomly initialised Swin backbone
    (``drop_path_rate``: stochastic depth of the backbone, transformers' default).

    ``model(pixel_values=x, labels=y)`` returns the loss (cross entropy, ignore index 255) and
    logits at the input resolution.
    """
    try:
        from transformers import SwinConfig, UperNetConfig, UperNetForSemanticSegmentation
    except ImportError:
        raise GpusqError("UPerNet needs the 'transformers' package (pip install 'gpusq[dense]')") from None
    backbone = SwinConfig(image_size=img_size, patch_size=4, num_channels=3, embed_dim=embed_dim, depths=list(depths),
                          num_heads=list(num_heads), window_size=window_size, drop_path_rate=drop_path_rate,
                          out_features=[f"stage{i + 1}" for i in range(len(depths))])
    cfg = UperNetConfig(backbone_config=backbone, hidden_size=hidden_size, num_labels=num_labels,
                        use_auxiliary_head=auxiliary_head, auxiliary_in_channels=embed_dim * 2 ** (len(depths) - 2),
                        auxiliary_channels=hidden_size // 2)
    return UperNetForSemanticSegmentation(cfg)


def upernet_swin_t(num_labels: int = 150, **kw: Any) -> nn.Module:
    """UPerNet on Swin-T (ADE20K's 150 classes by default)."""
    return upernet_swin(num_labels, **kw)


def upernet_swin_test(num_labels: int = 11, **kw: Any) -> nn.Module:
    """A CPU-sized UPerNet for 64-96 px canvases (MNIST-canvas): one Swin block per stage, 32 wide."""
    base = dict(img_size=64, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, hidden_size=32)
    return upernet_swin(num_labels, **{**base, **kw})




# -- DETR / Deformable-DETR (transformers) ---------------------------------------------------------
R50 = dict(embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3), layer_type="bottleneck")
RESNET_TINY = dict(embedding_size=16, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), layer_type="basic")
# DETR reads only the backbone's last stage: 2 stages (stride 8) keep an 8x8 map on a 64 px canvas
# (4 stages would leave 2x2 tokens to localize 20 px digits with).
RESNET_TINY_S8 = dict(embedding_size=16, hidden_sizes=(32, 64), depths=(1, 1), layer_type="basic")
DETR_TINY = dict(num_queries=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GpusqError("DETR / Deformable-DETR need 'transformers' (pip install 'gpusq[dense]')") from None
    return transformers


def _detr_config(cls, backbone: dict, out_features: list[str], kwargs: dict[str, Any]):
    """A DETR-family config on a random-init transformers ResNet; a one-line error for an unknown field."""
    tf = _transformers()
    known = set(cls().to_dict()) | {"num_labels"}  # a property, not a to_dict key
    bad = sorted(k for k in kwargs if k not in known)
    if bad:
        raise GpusqError(f"unknown {cls.__name__} field(s): {', '.join(bad)}")
    bb = tf.ResNetConfig(num_channels=3, **{k: list(v) if isinstance(v, tuple) else v for k, v in backbone.items()},
                         out_features=out_features)
    return cls(use_timm_backbone=False, backbone_config=bb, backbone=None, use_pretrained_backbone=False, **kwargs)


def _trainable(model: nn.Module) -> nn.Module:
    """transformers freezes (part of) the ResNet, expecting pretrained weights; from random init all of it trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def detr(num_labels: int = 91, backbone: dict | None = None, **kwargs: Any) -> nn.Module:
    """``DetrForObjectDetection`` (random init). ``num_labels`` = K object classes (no-object is added)."""
    tf = _transformers()
    backbone = backbone or R50
    last = f"stage{len(backbone['depths'])}"
    cfg = _detr_config(tf.DetrConfig, backbone, [last], {"num_labels": num_labels, **kwargs})
    return _trainable(tf.DetrForObjectDetection(cfg))


def deformable_detr(num_labels: int = 91, backbone: dict | None = None, **kwargs: Any) -> nn.Module:
    """``DeformableDetrForObjectDetection`` (random init, single stage, no box refinement), 3 ResNet levels
    (strides 8/16/32) + one extra stride-64 level, pure-PyTorch deformable attention."""
    tf = _transformers()
    kw = {"num_labels": num_labels, "disable_custom_kernels": True, **kwargs}
    cfg = _detr_config(tf.DeformableDetrConfig, backbone or R50, ["stage2", "stage3", "stage4"], kw)
    return _trainable(tf.DeformableDetrForObjectDetection(cfg))


def detr_r50(num_labels: int = 91, **kw: Any) -> nn.Module:
    """DETR-R50 as in the paper (6+6 layers, d_model 256, 100 queries, auxiliary decoding losses)."""
    return detr(num_labels, **{"auxiliary_loss": True, **kw})


def deformable_detr_r50(num_labels: int = 91, **kw: Any) -> nn.Module:
    """Deformable-DETR-R50 (6+6 layers, d_model 256, 300 queries, 4 levels, auxiliary losses)."""
    return deformable_detr(num_labels, **{"auxiliary_loss": True, **kw})


def detr_test(num_labels: int = 10, **kw: Any) -> nn.Module:
    """CPU-sized DETR for 64 px canvases: 2-stage basic ResNet (stride 8, 64 wide), 1+1 layers, d_model 32,
    16 queries."""
    return detr(num_labels, backbone=RESNET_TINY_S8, **{**DETR_TINY, **kw})


def deformable_detr_test(num_labels: int = 10, **kw: Any) -> nn.Module:
    """CPU-sized Deformable-DETR: as ``detr_test`` with 2 decoder layers (transformers 5 cannot tie the
    per-layer heads of a 1-layer decoder) and 2 sampling points."""
    base = {**DETR_TINY, "decoder_layers": 2, "encoder_n_points": 2, "decoder_n_points": 2}
    return deformable_detr(num_labels, backbone=RESNET_TINY, **{**base, **kw})
