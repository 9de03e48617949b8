"""Dense-prediction models built offline (no weight downloads): Mask R-CNN on a Swin + FPN backbone
(torchvision + timm) and UPerNet-Swin (transformers).

The backbone is timm's Swin (``features_only``, ``strict_img_size=False`` so any image size that
torchvision's transform produces is accepted), its four NHWC stage outputs turned NCHW and fed to
torchvision's ``FeaturePyramidNetwork``; the detector is torchvision's ``MaskRCNN``.

GPUSQ compresses the backbone's transformer GEMMs (per block: ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``); ``DETECTION_INCLUDE`` selects exactly those. The FPN, RPN and RoI heads
stay dense (small convs / task heads; the paper compresses the transformer).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from gpusq.errors import GpusqError, close_matches

# The backbone's transformer-block linears, whatever prefix wraps them ("backbone.body.layers_0.blocks.1.mlp.fc1").
DETECTION_INCLUDE = (r"(^|\.)backbone\.body\.(.+\.)?blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$",)
# Feature KD taps: the outputs of the backbone's transformer blocks and of the FPN (its output convs P2-P5).
DETECTION_FEATURES = r"(^|\.)backbone\.(body\.(.+\.)?blocks\.\d+|fpn\.layer_blocks\.\d+)$"

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


def _maskrcnn_swin_t(num_classes: int = 91, **kw: Any) -> nn.Module:
    return maskrcnn_swin(num_classes, **{"swin": SWIN_T, **kw})


def _maskrcnn_swin_test(num_classes: int = 11, **kw: Any) -> nn.Module:
    """A CPU-sized Mask R-CNN for 64–96 px canvases (MNIST-canvas): tiny Swin, small anchors."""
    base = dict(img_size=64, swin=SWIN_TINY_TEST, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128),
                image_mean=(0.1307,) * 3, image_std=(0.3081,) * 3, rpn_batch_size_per_image=64,
                box_batch_size_per_image=64, box_detections_per_img=20)
    return maskrcnn_swin(num_classes, **{**base, **kw})


# UPerNet-Swin (transformers): every Linear inside a backbone Swin block (q/k/v/o projections and the
# MLP; named differently across transformers versions, hence the loose tail). The UPerNet head is convs.
SEGMENTATION_INCLUDE = (r"(^|\.)backbone\.(.+\.)?blocks\.\d+\..+",)
SEGMENTATION_FEATURES = r"(^|\.)backbone\.(.+\.)?blocks\.\d+$"


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


def _upernet_swin_test(num_labels: int = 11, **kw: Any) -> nn.Module:
    base = dict(img_size=64, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, hidden_size=32)
    return upernet_swin(num_labels, **{**base, **kw})


SEGMENTATION_MODELS = {"upernet_swin_t": lambda num_labels=150, **kw: upernet_swin(num_labels, **kw),
                       "upernet_swin_test": _upernet_swin_test}


def _build(registry: dict, kind: str, name: str, kwargs: dict) -> nn.Module:
    """Build ``name`` from ``registry`` (random init); one-line GpusqError for an unknown name."""
    if name not in registry:
        near = close_matches(name, registry)
        raise GpusqError(f"unknown {kind} model {name!r}" + (f"; did you mean: {near}?" if near else "")
                         + f" (known: {', '.join(registry)})")
    return registry[name](**kwargs)


def create_segmentation_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a semantic-segmentation model by name (random init)."""
    return _build(SEGMENTATION_MODELS, "segmentation", name, kwargs)


DETECTION_MODELS = {"maskrcnn_swin_t": _maskrcnn_swin_t, "maskrcnn_swin_test": _maskrcnn_swin_test}


def create_detection_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a detection model by name (random init)."""
    return _build(DETECTION_MODELS, "detection", name, kwargs)
