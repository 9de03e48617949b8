"""Dense-prediction tasks (detection, instance and semantic segmentation): partial work on issue 6.

* ``mnist_canvas``: builder of a small real-data detection / segmentation set (MNIST digits on canvases).
* ``coco``: COCO-format dataset (instances json + image folder) with one-line errors on bad input.
* ``metrics``: COCO bbox / segm mAP (pycocotools) and mIoU / pixel accuracy.
* ``models``: Mask R-CNN with a Swin + FPN backbone, built offline, and the layer patterns that compress it.
"""
