"""Dense-prediction tasks (detection, instance and semantic segmentation).

* ``mnist_canvas``: builder of a small real-data detection / segmentation set (MNIST digits on canvases).
* ``coco``: COCO-format dataset (instances json + image folder) with one-line errors on bad input.
* ``metrics``: COCO bbox / segm mAP (pycocotools) and mIoU / pixel accuracy.
* ``segdata``: ADE20K-style folders (``images/`` + ``labels/`` PNGs).
* ``models``: the builders of the detection / segmentation families (Mask R-CNN Swin + FPN, DETR,
  Deformable-DETR, UPerNet-Swin), offline; their records (what is compressed, KD taps) are ``gpusq.families``.
* ``detr``: the DETR / Deformable-DETR adapter: data in DETR's dialect, set loss, matched-query logit KD.
* ``pipeline``: ``gpusq train|compress|eval --task detection|segmentation``.

See docs/tasks.md.
"""
