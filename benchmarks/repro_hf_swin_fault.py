"""Reproducer of the open GPU fault of the fused Hugging Face Swin path (docs/deploy.md, "Open").

UPerNet's test model (transformers Swin, 64x64 input, batch 1) deployed with ``fused=True``: on the
H200 the CUDA-graph replay hit "an illegal memory access" (``tests/gpu/test_bench_tasks_gpu.py``);
run eagerly without the caching allocator and with launch blocking, the fault surfaced at the proj
GEMM of a fused block (the first checked call after the Triton window-attention kernel), with
``compile="blocks"``; ``compile="none"`` with graphs passed once. The timm Swin (Mask R-CNN's test
model, same widths and windows) passes every variant. Each mode runs in its own process:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_LAUNCH_BLOCKING=1 python benchmarks/repro_hf_swin_fault.py eager up
    python benchmarks/repro_hf_swin_fault.py graphs up        # the failing bench configuration
    python benchmarks/repro_hf_swin_fault.py nocompile up     # passed once
    python benchmarks/repro_hf_swin_fault.py eager mr         # the timm twin (Mask R-CNN backbone + FPN)
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch import nn

MODES = {"graphs": {}, "eager": {"cuda_graphs": False}, "nocompile": {"compile": "none"},
         "perlayer": {"fused": False}, "eagernc": {"cuda_graphs": False, "compile": "none"}}


class Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.seg = m

    def forward(self, t):
        return self.seg(pixel_values=t).logits


class Fpn(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, t):
        return torch.cat([f.flatten(1) for f in self.m(t).values()], 1)


def main() -> None:
    from gpusq import families
    from gpusq.deploy import deploy
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import SparsityConfig, sparsify_

    mode, which = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    if which == "up":
        m = Logits(families.build("upernet_swin_test", img_size=64))
    else:
        m = Fpn(families.build("maskrcnn_swin_test", img_size=64, min_size=64, max_size=64).backbone)
    m = m.cuda().eval()
    r = load_recipe("int8")
    sparsify_(m, SparsityConfig(include=[r"(^|\.)blocks\.\d+\."]))
    quantize_(m, r.quant)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    calibrate(m, lambda mm: mm(x))
    kw = {"fused": True, **MODES[mode]}
    try:
        dm = deploy(m, r, batch_sizes=(1,), input_size=(3, 64, 64), **kw)
        for _ in range(3):
            y = dm(x[:1])
        torch.cuda.synchronize()
        print(mode, which, "OK", dm.fused, float(y.float().abs().mean()))
    except Exception:  # noqa: BLE001 - a reproducer reports, whatever it is
        print(mode, which, "FAILED")
        traceback.print_exc(limit=-8)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip destructors: after a fault they only add noise


if __name__ == "__main__":
    main()
