"""GPU test of ``gpusq bench`` on detection / segmentation models (tiny configs): every part of
every variant is measured, and the deployed model really runs 2:4 kernels on the backbone blocks.

Run on the device machine: ``python -m pytest -m gpu tests/gpu -q -s``.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_bench_task_models(tmp_path):
    pytest.importorskip("transformers")
    from gpusq.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench", "--model", "maskrcnn_swin_test,upernet_swin_test", "--input-size", "64,64",
               "--batch", "1,2", "--variants", "bf16,gpusq", "--reps", "3", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    got = {(r["model"], r["variant"], r["batch"]) for r in res["results"]}
    for model in ("maskrcnn_swin_test:backbone", "maskrcnn_swin_test:whole", "upernet_swin_test:whole",
                  "upernet_swin_test:backbone"):
        for v in ("bf16", "gpusq"):
            for b in (1, 2):
                assert (model, v, b) in got, (model, v, b)
    assert all(r["ms"] > 0 for r in res["results"])
    for key, layers in res["kernels"].items():  # 4 stages x 1 block: qkv, proj, fc1, fc2 (Mask R-CNN)
        assert layers and all(rep["kind"] == "int8" and rep["sparse"] for rep in layers), key
        assert all(".blocks." in rep["layer"] for rep in layers), key
    assert len(res["kernels"]["maskrcnn_swin_test:backbone/gpusq"]) == 16
