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
``gpusq.tasks.models``) are measured in two parts: ``NAME:backbone`` (the Swin backbone, where the
compressed GEMMs are, from a CUDA graph) and ``NAME:whole`` (the whole model: UPerNet from a CUDA
graph; Mask R-CNN eagerly, its backbone replaying the variant's graph and the rest, with its
data-dependent NMS / RoI sampling, under bf16 autocast, fp32 for the fp32/tf32 variants).

Weights are random (timm init), pruned 2:4 and calibrated on random images for the compressed
variants: speed does not depend on trained weights. Latency at small batch and throughput at
large batch are medians of repeated CUDA-event timings of graph replays after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

VARIANTS = ("fp32", "tf32", "bf16", "bf16-compile", "fp8-dense", "gpusq")
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CATEGORIES = ("gemm 2:4", "gemm dense", "attention", "norm(+quant)", "gelu(+quant)", "quantize", "other")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _parse_batches(text: str) -> list[int]:
    from gpusq.errors import GpusqError

    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise GpusqError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not out or any(b <= 0 for b in out):
        raise GpusqError(f"--batch must list positive integers, got {text!r}")
    return out


def _parse_hw(text: str | None) -> tuple[int, int] | None:
    from gpusq.errors import GpusqError

    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise GpusqError(f"--input-size must be H,W (two integers), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise GpusqError(f"--input-size must be positive, got {text!r}")
    return h, w


def build_parser(prog: str) -> argparse.ArgumentParser:
    from gpusq.cli.args import add_json, add_model_arg

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_base_patch16_224",
                    help="timm model name(s), comma-separated (default deit_base_patch16_224)")
    add_model_arg(ap, "timm create_model keyword (repeatable, or comma-separated)")
    ap.add_argument("--input-size", default=None, metavar="H,W",
                    help="image size for detection/segmentation models (default 800,1344 for Mask R-CNN, "
                         "512,512 for UPerNet)")
    ap.add_argument("--recipe", default="int8",
                    help="recipe of the gpusq variant (int8, int4, fp8, sparse, a YAML)")
    ap.add_argument("--batch", default="1,256", help="batch sizes, comma-separated (default 1,256)")
    ap.add_argument("--sweep", action="store_true", help=f"batch sweep {','.join(map(str, SWEEP))}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="torch.compile each transformer block (default; fast to compile) or the whole model")
    ap.add_argument("--fp8-kernel", default="auto", choices=("auto", "sparse", "dense"),
                    help="for --recipe fp8: time 2:4 cuSPARSELt vs dense per shape (auto) or force one")
    ap.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                    help="fused transformer blocks for gpusq and fp8-dense: where they qualify (auto), required "
                         "(on: also Hugging Face Swin, opt-in for now), or never (off: the per-layer path)")
    ap.add_argument("--fused-attn", default="off", choices=("on", "off"),
                    help="attention through SDPA in every variant where timm has the switch (Swin's window "
                         "attention; default off, as gpusq.deploy: slower on the H100)")
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timing sample (default 0.02)")
    ap.add_argument("--reps", type=int, default=15, help="timing samples per measurement (median reported)")
    add_json(ap, "all results (environment, timings, profiles, kernel choices)")
    ap.add_argument("--plot", metavar="FILE", help="write a plot (PNG) of the results")
    ap.add_argument("--profile", action="store_true", help="per-op GPU time breakdown at the largest batch")
    return ap


# ------------------------------------------------------------------------------------------------
# building the variants
# ------------------------------------------------------------------------------------------------
# Detection / segmentation models: compress what ``gpusq compress --task`` compresses (the Linears of
# the backbone's transformer blocks; patch embedding and merging stay dense).
TASK_SPARSITY_INCLUDE = (r"(^|\.)blocks\.\d+\.",)


def _task_model(name: str, hw: tuple[int, int] | None):
    """(base module timed from a CUDA graph, (C, H, W), part label, extra-part timer factory) for a
    detection/segmentation model name, or None for a timm name."""
    import torch
    from torch import nn

    from gpusq.tasks.models import DETECTION_MODELS, SEGMENTATION_MODELS

    if name in DETECTION_MODELS:
        h, w = hw or (800, 1344)
        det = DETECTION_MODELS[name](img_size=(h, w), min_size=min(h, w), max_size=max(h, w),
                                     box_score_thresh=0.0).eval()  # 100 detections/image reach the mask head
        return det.backbone.body, (3, h, w), "backbone", ("whole", _maskrcnn_whole(det, h, w))
    if name in SEGMENTATION_MODELS:
        h, w = hw or (512, 512)
        if h != w:
            from gpusq.errors import GpusqError

            raise GpusqError(f"UPerNet-Swin is benchmarked at square sizes, got {h}x{w}")
        seg = SEGMENTATION_MODELS[name](img_size=h).eval()

        class Logits(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.seg = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.seg(pixel_values=x).logits

        return Logits(seg), (3, h, w), "whole", ("backbone", _upernet_backbone)
    return None


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


def _calibrated(model, recipe_quant, batch_x, sparse: bool, sparsity=None):
    """A copy of ``model`` with ``recipe_quant`` (on 2:4 masks when ``sparse``) applied and calibrated on
    ``batch_x`` (``gpusq.prepare.prepare_``)."""
    from gpusq.prepare import prepare_
    from gpusq.recipes import Recipe
    from gpusq.sparsity import SparsityConfig

    m = copy.deepcopy(model)
    sp = (sparsity or SparsityConfig()) if sparse else SparsityConfig(pattern="none")
    prepare_(m, Recipe(sparsity=sp, quant=recipe_quant), calibrate_fn=lambda mm: mm(batch_x))
    return m.eval()


class Variant:
    """A callable ``batch -> runner`` for one variant (runner(x) replays a CUDA graph)."""

    def __init__(self, name: str, base, args, recipe, input_size):
        import torch

        from gpusq.deploy import deploy
        from gpusq.deploy.fused import compile_regions

        self.name, self.setup_s, self.info = name, 0.0, {}
        t0 = time.perf_counter()
        dev = torch.device("cuda")
        self.deployed = None
        self.dtype = torch.float32
        if name in ("fp32", "tf32"):
            self.model = copy.deepcopy(base).to(dev).eval()
        elif name in ("bf16", "bf16-compile"):
            self.model = copy.deepcopy(base).to(dev, torch.bfloat16).eval()
            self.dtype = torch.bfloat16
            if name == "bf16-compile":
                compile_regions(self.model, args.compile_scope)
        else:
            from gpusq.quant import QuantConfig, QuantSpec

            g = torch.Generator().manual_seed(1)
            calib_x = torch.randn(8, *input_size, generator=g).to(dev)
            fused = {"auto": "auto", "on": True, "off": False}[getattr(args, "fused", "auto")]
            src = copy.deepcopy(base).to(dev).eval()
            if name == "fp8-dense":
                fp8 = QuantConfig(QuantSpec("fp8_e4m3"), QuantSpec("fp8_e4m3"))
                fq = _calibrated(src, fp8, calib_x, sparse=False)
                self.deployed = deploy(fq, None, batch_sizes=(), compile=args.compile_scope,
                                       fp8_kernel="dense", input_size=input_size, fused=fused)
            else:
                fq = _calibrated(src, recipe.quant, calib_x, sparse=recipe.sparse, sparsity=recipe.sparsity)
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


def cli_main(argv: list[str], prog: str = "gpusq bench", command: str = "bench") -> int:
    from gpusq.errors import GpusqError

    args = build_parser(prog).parse_args(argv)
    batches = list(SWEEP) if args.sweep else _parse_batches(args.batch)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise GpusqError(f"unknown variant(s) {', '.join(bad)} (choose from {', '.join(VARIANTS)})")
    from gpusq.deploy import check_gpu, enable_fused_attention, searched_algs
    from gpusq.models import create_model, model_input_size, parse_model_kwargs
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import SparsityConfig

    check_gpu()
    import torch

    recipe = load_recipe(args.recipe)
    kwargs = parse_model_kwargs(args.model_arg)
    torch.manual_seed(0)
    rows: list[dict] = []
    profiles: dict = {}
    kernels: dict = {}
    setup: dict = {}
    hw = _parse_hw(args.input_size)
    for model_name in [m.strip() for m in args.model.split(",") if m.strip()]:
        task = _task_model(model_name, hw)
        extra = None
        rec = recipe
        if task is not None:
            base, size, part, extra = task
            label = f"{model_name}:{part}"
            rec = copy.deepcopy(recipe)
            rec.sparsity = SparsityConfig(pattern=recipe.sparsity.pattern, include=list(TASK_SPARSITY_INCLUDE),
                                          exclude=list(recipe.sparsity.exclude))
        else:
            base = create_model(model_name, **kwargs).eval()
            size = model_input_size(base)
            label = model_name
        if args.fused_attn == "on":  # on the shared base: every variant, deployed ones included, is a copy
            enable_fused_attention(base)
        for vname in variants:
            print(f"[{label}] building {vname} ...", file=sys.stderr, flush=True)
            var = Variant(vname, base, args, rec, size)
            setup[f"{model_name}/{vname}"] = {"build_s": var.setup_s}
            for b in batches:
                xs = [torch.randn(b, *size, device="cuda") for _ in range(2)]
                t0 = time.perf_counter()
                try:
                    runner, fn = var.runner(xs[0])
                except torch.cuda.OutOfMemoryError:
                    print(f"[{model_name}] {vname} batch {b}: out of GPU memory, skipped", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                setup[f"{model_name}/{vname}"][f"capture_s_b{b}"] = time.perf_counter() - t0
                t = time_runner(runner, xs, args.min_time, args.reps)
                row = {"model": label, "variant": vname, "batch": b, **t, "img_s": b / t["ms"] * 1e3}
                rows.append(row)
                print(f"[{label}] {vname:<13} batch {b:>4}: {t['ms']:.3f} ms  {row['img_s']:.0f} img/s",
                      file=sys.stderr, flush=True)
                if extra is not None:
                    part2, timer = extra
                    t2 = timer(var, runner, b, args.min_time, args.reps)
                    row2 = {"model": f"{model_name}:{part2}", "variant": vname, "batch": b, **t2,
                            "img_s": b / t2["ms"] * 1e3}
                    rows.append(row2)
                    print(f"[{model_name}:{part2}] {vname:<13} batch {b:>4}: {t2['ms']:.3f} ms  "
                          f"{row2['img_s']:.0f} img/s", file=sys.stderr, flush=True)
                if args.profile:
                    var._set_tf32()
                    if b == max(batches):
                        profiles[f"{label}/{vname}/b{b}"] = p = profile(fn, xs[0])
                    else:  # smaller batches: the kernel count only (the latency target is a count target)
                        p = {"kernels_per_forward": profile(fn, xs[0])["kernels_per_forward"]}
                        profiles[f"{label}/{vname}/b{b}"] = p
                    p["graph_ms"] = t["ms"]
                    m = var.deployed.model if var.deployed is not None else var.model
                    blk = first_block_call(m, xs[0].to(var.deployed.input_dtype if var.deployed is not None
                                                       else var.dtype))
                    if blk is not None:
                        p["kernels_per_block"] = profile(blk, xs[0])["kernels_per_forward"]
                del runner, fn
            if var.deployed is not None:
                kernels[f"{label}/{vname}"] = var.deployed.kernel_report()
                path = {"blocks": var.deployed.fused, "embed_and_head": var.deployed.fused_forward}
                setup[f"{model_name}/{vname}"]["path"] = path
                print(f"[{label}] {vname}: {path}", file=sys.stderr)
            del var
            torch.cuda.empty_cache()
        if len(args.model.split(",")) > 1:  # each model's table as soon as it is done
            add_ratios(rows)
            print(format_table([r for r in rows if r["model"].split(":")[0] == model_name]) + "\n", flush=True)
    add_ratios(rows)
    print(format_table(rows))
    if profiles:
        print("\nGPU kernel time per forward (ms) by category, largest batch (eager calls, profiler); kernel "
              "launches per forward and per transformer block:")
        print(f"{'run':<48} " + " ".join(f"{c:>12}" for c in CATEGORIES)
              + f" {'sum':>8} {'graph':>8} {'kern/fwd':>8} {'kern/blk':>8}")
        for k, p in profiles.items():
            cats = p.get("by_category_ms")
            cols = " ".join(f"{cats[c]:>12.3f}" for c in CATEGORIES) if cats else " ".join(f"{'':>12}" for _ in
                                                                                           CATEGORIES)
            tot = f"{p['total_kernel_ms']:>8.3f}" if cats else f"{'':>8}"
            kb = p.get("kernels_per_block")
            print(f"{k:<48} {cols} {tot} {p['graph_ms']:>8.3f} {p['kernels_per_forward']:>8.0f} "
                  + (f"{kb:>8.0f}" if kb is not None else f"{'-':>8}"))
    for key, rep in kernels.items():
        kinds: dict[str, int] = {}
        for layer in rep:
            for kern, _alg in layer["choice"].values():
                tag = f"{layer['kind']}:{kern}"
                kinds[tag] = kinds.get(tag, 0) + 1
        print(f"kernels {key}: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    if args.json:
        from gpusq.cli.args import emit_json
        from gpusq.deploy.cusparselt import cusparselt_version

        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cusparselt": cusparselt_version(), "nvmath": _version("nvmath-python"),
               "triton": _version("triton"), "timm": _version("timm"), "argv": ["gpusq", command, *argv]}
        emit_json({"env": env, "results": rows, "profiles": profiles, "kernels": kernels, "setup": setup,
                   "cslt_algs": searched_algs()}, args.json, indent=1)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return 0
