"""``gpusq bench``: speed of the gpusq-deployed model against the usual baselines, in one process.

Variants (all with CUDA graphs, so launch overhead is out of every number):

* ``fp32``       eager FP32 (TF32 off);
* ``tf32``       eager FP32 with TF32 matmuls/convs;
* ``bf16``       eager BF16;
* ``bf16-compile`` BF16 under ``torch.compile`` (default mode; same compile scope as gpusq);
* ``fp8-dense``  FP8 E4M3 dense GEMMs, the strongest dense FP8 we can build: where gpusq's blocks
  run fused (``gpusq.deploy.vit``, nvmath-python installed) the same fused blocks on cuBLASLt FP8
  (bias, GELU + FP8 output, residual through C in its epilogue; per-tensor scales; tanh GELU, the
  only one cuBLASLt has), else ``torch._scaled_mm`` with row-wise weight scales and quantization
  fused by ``torch.compile`` as in gpusq's per-layer path; static activation scales from calibration;
* ``gpusq``      the deployed compressed model (``gpusq.deploy``) for ``--recipe``.

``--profile`` adds, per variant, the GPU kernel time by category at the largest batch and the number
of kernel launches per forward and per transformer block at every batch (the batch-1 latency is
mostly a kernel-count matter).

Detection and segmentation models (``maskrcnn_swin_t``, ``upernet_swin_t``, ...; see
``gpusq.families``) are measured in two parts: ``NAME:backbone`` (the Swin backbone, where the
compressed GEMMs are, from a CUDA graph) and ``NAME:whole`` (the whole model: UPerNet from a CUDA
graph; Mask R-CNN eagerly, its backbone replaying the variant's graph and the rest, with its
data-dependent NMS / RoI sampling, under bf16 autocast, fp32 for the fp32/tf32 variants).

Weights are random (timm init), pruned 2:4 and calibrated on random images for the compressed
variants: speed does not depend on trained weights. Latency at small batch and throughput at
large batch are medians of repeated CUDA-event timings of graph replays after warm-up.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpusq.families import BLOCK_COMPILE_REGIONS

VARIANTS = ("fp32", "tf32", "bf16", "bf16-compile", "fp8-dense", "gpusq")
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CATEGORIES = ("gemm 2:4", "gemm dense", "attention", "norm(+quant)", "gelu(+quant)", "quantize", "other")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# building the variants
# ------------------------------------------------------------------------------------------------
@dataclass
class TaskParts:
    """What ``gpusq bench`` times of a detection / segmentation model (``task_parts``)."""

    base: Any  # the module timed from a CUDA graph
    size: tuple[int, int, int]  # (C, H, W)
    part: str  # what ``base`` is: "backbone" | "whole"
    extra: tuple[str, Callable]  # (the other part, its timer factory)
    family: Any  # its gpusq.families record: the GEMMs compressed, the compile regions
    prefix: str = ""  # the name of ``base`` in the whole model (for the family's layer patterns)

    def select(self, exclude=()) -> Callable[[str, Any], bool]:
        """filter_fn: the GEMMs ``gpusq compress --task`` compresses (minus ``exclude``), named as in ``base``."""
        return self.family.gemm_filter(exclude, self.prefix)


def task_parts(name: str, hw: tuple[int, int] | None) -> TaskParts | None:
    """The parts of a detection / segmentation model name to time (at ``hw``, default its family's input
    size), or None for a classifier. A family without a GPU deployment path is a one-line error."""
    import torch
    from torch import nn

    from gpusq import families
    from gpusq.errors import GpusqError

    fam = families.lookup(name)
    if fam.task == "classification":
        return None
    h, w = hw or fam.input_size[1:]
    if fam is families.MASKRCNN:
        det = fam.build(name, img_size=(h, w), min_size=min(h, w), max_size=max(h, w),
                        box_score_thresh=0.0).eval()  # 100 detections/image reach the mask head
        # the Swin body alone: its module names lack the "backbone.body." the family's patterns start from
        return TaskParts(det.backbone.body, (3, h, w), "backbone", ("whole", _maskrcnn_whole(det, h, w)), fam,
                         prefix="backbone.body.")
    if fam is families.UPERNET:
        if h != w:
            raise GpusqError(f"UPerNet-Swin is benchmarked at square sizes, got {h}x{w}")
        seg = fam.build(name, img_size=h).eval()

        class Logits(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.seg = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.seg(pixel_values=x).logits

        return TaskParts(Logits(seg), (3, h, w), "whole", ("backbone", _upernet_backbone), fam)
    raise GpusqError(f"gpusq bench measures classifiers and the Swin backbones of Mask R-CNN and UPerNet; {name} "
                     f"is a {fam.name} model, which has no GPU deployment path")


def _maskrcnn_whole(det, h: int, w: int):
    """Timer of the whole Mask R-CNN for one variant: its backbone body replays that variant's graph."""
    import torch
    from torch import nn

    class Replay(nn.Module):
        def __init__(self, runner):
            super().__init__()
            self.runner = runner

        def forward(self, x):
            return self.runner(x)

    def timer(var, runner, batch: int, min_time: float, reps: int) -> dict:
        det.to("cuda")
        body = det.backbone.body
        det.backbone.body = Replay(runner)
        bf16 = var.name not in ("fp32", "tf32")
        imgs = [[torch.rand(3, h, w, device="cuda") for _ in range(batch)] for _ in range(2)]

        def call(images):
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                return det(images)

        try:
            return time_runner(call, imgs, min_time, reps)
        finally:
            det.backbone.body = body

    return timer


def _upernet_backbone(var, runner, batch: int, min_time: float, reps: int) -> dict:
    """Timer of UPerNet's Swin backbone alone, from a graph of the variant's (already compiled) model."""
    from gpusq.deploy.graphs import GraphRunner

    m = var.deployed.model if var.deployed is not None else var.model
    dt = var.deployed.input_dtype if var.deployed is not None else var.dtype
    x = runner.static_in

    def fn(inp):
        return tuple(m.seg.backbone(inp.to(dt)).feature_maps)

    g = GraphRunner(fn, x)
    return time_runner(g, [x], min_time, reps)


def _calibrated(model, recipe_quant, batch_x, sparse: bool, sparsity=None, filter_fn=None):
    """A copy of ``model`` with ``recipe_quant`` (on 2:4 masks when ``sparse``) applied and calibrated on
    ``batch_x`` (``gpusq.prepare.prepare_``) to the layers ``sparsity`` selects (dense when not ``sparse``);
    ``filter_fn`` selects them instead of its patterns."""
    from gpusq.prepare import prepare_
    from gpusq.recipes import Recipe
    from gpusq.sparsity import SparsityConfig

    m = copy.deepcopy(model)
    sp = sparsity or SparsityConfig()
    if not sparse:
        sp = dataclasses.replace(sp, pattern="none")
    prepare_(m, Recipe(sparsity=sp, quant=recipe_quant), calibrate_fn=lambda mm: mm(batch_x), filter_fn=filter_fn)
    return m.eval()


class Variant:
    """A callable ``batch -> runner`` for one variant (runner(x) replays a CUDA graph). ``select``: the
    layers the gpusq and fp8-dense variants compress (default the recipe's sparsity selection);
    ``regions``: what ``bf16-compile`` compiles one by one (the family's compile regions)."""

    def __init__(self, name: str, base, args, recipe, input_size, select=None,
                 regions: tuple[str, ...] = BLOCK_COMPILE_REGIONS):
        import torch

        from gpusq import hf
        from gpusq.deploy import deploy
        from gpusq.deploy.fused import compile_regions

        self.name, self.setup_s, self.info = name, 0.0, {}
        t0 = time.perf_counter()
        dev = torch.device("cuda")
        self.deployed = None
        self.dtype = torch.float32
        if name in ("fp32", "tf32", "bf16", "bf16-compile"):
            dt = torch.bfloat16 if name.startswith("bf16") else torch.float32
            self.model = copy.deepcopy(base).to(dev, dt).eval()
            self.dtype = dt
            if hf.is_hf_model(self.model):
                hf.mask_free_attention_(self.model)  # as deploy() does: no mask built inside the graph capture
            if name == "bf16-compile":
                compile_regions(self.model, args.compile_scope, regions)
        else:
            from gpusq.quant import QuantConfig, QuantSpec

            g = torch.Generator().manual_seed(1)
            calib_x = torch.randn(8, *input_size, generator=g).to(dev)
            fused = {"auto": "auto", "on": True, "off": False}[getattr(args, "fused", "auto")]
            src = copy.deepcopy(base).to(dev).eval()
            if name == "fp8-dense":
                fp8 = QuantConfig(QuantSpec("fp8_e4m3"), QuantSpec("fp8_e4m3"))
                fq = _calibrated(src, fp8, calib_x, sparse=False, sparsity=recipe.sparsity,
                                 filter_fn=select)  # the gpusq variant's layers, dense
                self.deployed = deploy(fq, None, batch_sizes=(), compile=args.compile_scope,
                                       fp8_kernel="dense", input_size=input_size, fused=fused)
            else:
                fq = _calibrated(src, recipe.quant, calib_x, sparse=recipe.sparse, sparsity=recipe.sparsity,
                                 filter_fn=select)
                self.deployed = deploy(fq, recipe, batch_sizes=(), compile=args.compile_scope,
                                       fp8_kernel=args.fp8_kernel, input_size=input_size, fused=fused)
            del src, fq
        self.setup_s = time.perf_counter() - t0

    def _set_tf32(self) -> None:
        import torch

        on = self.name == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    def runner(self, x):
        """(runner, eager_fn) for this input's batch size: graph capture happens here."""
        from gpusq.deploy.graphs import GraphRunner

        self._set_tf32()
        if self.deployed is not None:
            return self.deployed.prepare(x.shape[0]), self.deployed._core
        dt = self.dtype

        def fn(inp):
            return self.model(inp.to(dt))

        return GraphRunner(fn, x), fn


# ------------------------------------------------------------------------------------------------
# timing and profiling
# ------------------------------------------------------------------------------------------------
def time_runner(runner, xs, min_time: float, reps: int) -> dict:
    """Median ms per call of ``runner`` over ``reps`` samples, each >= ``min_time`` seconds."""
    import torch

    for i in range(5):
        runner(xs[i % len(xs)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner(xs[0])
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-5)
    inner = max(1, min(200, math.ceil(min_time / est)))
    samples = []
    for r in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(inner):
            runner(xs[(r + i) % len(xs)])
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / inner)
    med = statistics.median(samples)
    return {"ms": med, "min_ms": min(samples), "max_ms": max(samples), "inner": inner, "reps": reps}


def classify(kernel: str) -> str:
    k = kernel.lower()
    if "sparse" in k or "cusparselt" in k or "spmma" in k or "_sp_" in k:
        return "gemm 2:4"
    if any(s in k for s in ("flash", "fmha", "attention", "attn", "softmax")):
        return "attention"
    if any(s in k for s in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "f8f8bf16", "conv", "implicit",
                            "sm90_", "sm80_", "ampere", "hopper", "gemv", "splitk")):
        return "gemm dense"
    if "layer_norm" in k or "layernorm" in k:
        return "norm(+quant)"
    if "gelu" in k or "erf" in k:
        return "gelu(+quant)"
    if "round" in k or "clamp" in k or "float8" in k:
        return "quantize"
    return "other"


def profile(fn, x, iters: int = 3) -> dict:
    """GPU kernel time per forward by category (eager replays of the compiled function)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn(x)
            torch.cuda.synchronize()
    cats = dict.fromkeys(CATEGORIES, 0.0)
    top: dict[str, float] = {}
    launches = 0
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "cuda_time_total", 0.0)
        if not dev_us or evt.key.startswith(("ProfilerStep", "cudaGraph", "Memcpy", "Memset")):
            continue
        if getattr(evt, "device_type", None) is not None and "CUDA" not in str(evt.device_type):
            continue
        cats[classify(evt.key)] += dev_us / 1000.0 / iters
        top[evt.key] = top.get(evt.key, 0.0) + dev_us / 1000.0 / iters
        launches += getattr(evt, "count", 0)
    total = sum(cats.values())
    return {"total_kernel_ms": total, "by_category_ms": cats, "kernels_per_forward": launches / iters,
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


def first_block_call(model, x):
    """A no-argument call of a timm ViT's first transformer block on its real input (fused or not),
    for counting the kernels of one block; ``None`` for models without that structure."""
    import torch

    from gpusq.deploy.vit import FusedBlocks

    need = ("patch_embed", "_pos_embed", "blocks")
    if not all(hasattr(model, a) for a in need):
        return None
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        t = getattr(model, "norm_pre", lambda v: v)(getattr(model, "patch_drop", lambda v: v)(t))
        blocks = model.blocks
        if isinstance(blocks, FusedBlocks):
            b, n, _ = t.shape
            xr = FusedBlocks.pad(t)
            blk = blocks.blocks[0]
            return lambda _x: blk(xr, b, n)
        blk = blocks[0]
        return lambda _x: blk(t)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    ref = {}
    for r in rows:
        ref[(r["model"], r["variant"], r["batch"])] = r["ms"]
    for r in rows:
        for label, v in (("x_fp32", "fp32"), ("x_bf16", "bf16"), ("x_bf16c", "bf16-compile"),
                         ("x_fp8", "fp8-dense")):
            other = ref.get((r["model"], v, r["batch"]))
            r[label] = other / r["ms"] if other else None


def format_table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = []
    hdr = (f"{'model':<30} {'variant':<13} {'batch':>5} {'ms':>9} {'img/s':>9} {'vsFP32':>7} {'vsBF16':>7} "
           f"{'vsBF16c':>7} {'vsFP8':>7}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in rows:
        lines.append(f"{r['model']:<30} {r['variant']:<13} {r['batch']:>5} {r['ms']:>9.3f} "
                     f"{r['img_s']:>9.0f} "
                     f"{f(r['x_fp32'], '>7.2f')} {f(r['x_bf16'], '>7.2f')} {f(r['x_bf16c'], '>7.2f')} "
                     f"{f(r['x_fp8'], '>7.2f')}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in sub})
        for v in dict.fromkeys(r["variant"] for r in sub):
            pts = sorted((r["batch"], r["img_s"]) for r in sub if r["variant"] == v)
            if len(batches) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            else:
                ax.bar(v, pts[0][1])
        if len(batches) > 1:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.legend()
        ax.set_ylabel("images / s")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
