"""Dense-prediction tasks (detection, instance and semantic segmentation).

* ``mnist_canvas``: builder of a small real-data detection / segmentation set (MNIST digits on canvases).
* ``coco``: COCO-format dataset (instances json + image folder) with one-line errors on bad input.
* ``metrics``: COCO bbox / segm mAP (pycocotools) and mIoU / pixel accuracy.
* ``segdata``: ADE20K-style folders (``images/`` + ``labels/`` PNGs).
* ``models``: Mask R-CNN (Swin + FPN) and UPerNet-Swin, built offline, and the layer patterns that compress them.
* ``detr``: DETR and Deformable-DETR (transformers), matched-query logit KD.
* ``pipeline``: ``gpusq train|compress|eval --task detection|segmentation``.

See docs/tasks.md.
"""
