"""Deployment of compressed models on real sparse / low-precision GPU kernels.

``deploy(model_or_dir, recipe=None, batch_sizes=(1,))`` turns a compressed model (with
``CompressedLinear`` / ``CompressedConv2d`` layers) or a ``gpusq compress`` output directory into
a ``DeployedModel`` on the GPU:

* INT8 (and INT4, unpacked to INT8 at load: the H100 has no INT4 tensor cores) 2:4 layers run on
  cuSPARSELt with INT8 activations; the per-channel scale and the bias go into the GEMM epilogue;
* where every transformer block is a plain timm ViT block, a timm Swin block or (``fused=True``
  only, for now) a Hugging Face ``SwinLayer`` (UPerNet's backbone) with INT8/INT4 2:4 Linears and
  nvmath-python is installed (the ``gpu`` extra), the blocks run fused (``gpusq.deploy.vit``,
  ``gpusq.deploy.swin``): our own cuSPARSELt plans with GELU + INT8 output in fc1's epilogue and
  the residual added through C in proj / fc2, one Triton kernel per LayerNorm + quantize, and
  attention as SDPA + one head-merge quantize kernel (ViT, eight kernels per block) or one Triton
  window-attention kernel that reads q/k/v in shifted-window order and writes proj's INT8 input
  per token (Swin, seven kernels per block); ``fused=False`` keeps the per-layer path below;
* FP8 layers run dense on ``torch._scaled_mm`` (row-wise scales, bias fused) unless cuSPARSELt
  applies the scale vector and bias in its epilogue for FP8 (it does not with cuSPARSELt 0.8.0
  on the H100: measured, the FP8 2:4 model was then slower than dense FP8, docs/deploy.md);
  ``fp8_kernel="sparse"`` forces 2:4, ``"auto"`` otherwise times both per shape;
* activation quantization is fused by ``torch.compile`` into the op producing the activation
  (LayerNorm, GELU, the attention output transpose), so int8 crosses memory, not bf16;
* the rest (attention through SDPA, norms, head) runs in bf16 (``recipe.deploy.dense_dtype``); on
  the per-layer path Swin's window attention stays on timm's explicit path unless
  ``fused_attention=True`` (SDPA with the bias + shift mask as a float mask: slower, docs/deploy.md);
* the whole forward is captured in a CUDA graph per batch size.

Without a suitable GPU (CUDA, compute capability >= 8.0, cuSPARSELt) it raises ``GpusqError``;
there is no silent CPU fallback.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gpusq.codes import pack_int4, unpack_int4
from gpusq.deploy.cusparselt import check_gpu, searched_algs
from gpusq.deploy.modules import layer_codes
from gpusq.errors import GpusqError

__all__ = ["deploy", "DeployedModel", "enable_fused_attention", "check_gpu", "pack_int4", "unpack_int4",
           "layer_codes", "searched_algs"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeployedModel(nn.Module):
    """A deployed model: ``forward(x)`` replays the CUDA graph captured for ``x.shape[0]``.

    The output is the graph's static buffer (overwritten by the next call of the same batch
    size); ``.clone()`` it to keep it. New batch sizes are prepared on first use.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int], *, compile: str = "blocks",
                 cuda_graphs: bool = True, input_dtype: torch.dtype = torch.bfloat16,
                 dense_dtype: torch.dtype = torch.bfloat16, regions: tuple[str, ...] | None = None):
        super().__init__()
        from gpusq.families import compile_regions_of

        self.regions = tuple(regions) if regions is not None else compile_regions_of(model)  # compiled one by one
        self.model = model
        self.input_size = tuple(input_size)
        self.compile_scope = compile
        self.cuda_graphs = cuda_graphs
        self.input_dtype = input_dtype
        self.dense_dtype = dense_dtype
        self._compiled = False
        self.fused = "off"  # set by deploy(): "fused" or why the blocks run per layer
        self.fused_forward: str | None = None  # whether the token assembly / final norm are fused too
        self._runners: dict[int, object] = {}
        self._pool = None

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.input_dtype))

    @torch.no_grad()
    def prepare(self, batch: int):
        """Choose kernels for this batch size (eager pass), compile, and capture its graph."""
        from gpusq.deploy.fused import compile_regions
        from gpusq.deploy.graphs import GraphRunner

        dev = next(self.model.parameters()).device
        x = torch.randn(batch, *self.input_size, device=dev)
        stance = getattr(torch.compiler, "set_stance", None)
        if self._compiled and stance is not None:
            with stance("force_eager"):
                self._core(x)
        elif not self._compiled:
            self._core(x)
        else:  # torch < 2.6 cannot pause compiled regions: search by calling each layer directly
            raise GpusqError("preparing a new batch size after compilation needs torch >= 2.6")
        if not self._compiled:
            compile_regions(self.model, self.compile_scope, self.regions)
            self._compiled = True
        if not self.cuda_graphs:
            self._core(x)
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        runner = GraphRunner(self._core, x, pool=self._pool)
        self._runners[batch] = runner
        return runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_size:
            raise GpusqError(f"input of shape {tuple(x.shape)} does not match the deployed model's "
                             f"(B, {', '.join(map(str, self.input_size))})")
        b = x.shape[0]
        if not self.cuda_graphs:
            if not self._compiled:
                self.prepare(b)
            return self._core(x)
        runner = self._runners.get(b) or self.prepare(b)
        return runner(x)

    def kernel_report(self) -> list[dict]:
        """Per deployed layer: kind, shape, epilogue mode and the kernel/alg chosen per row count."""
        from gpusq.deploy.cslt import SparseGemm
        from gpusq.deploy.modules import DeployedLinear
        out = []
        for name, m in self.model.named_modules():
            if getattr(m, "gpusq_fused", False):  # FusedBlocks / FusedSwinBlocks
                for gname, g in m.gemms().items():
                    ep = [t for t, on in (("alpha", True), ("bias", g.bias is not None), ("gelu", g.gelu),
                                          ("residual", g.residual)) if on]
                    sparse = isinstance(g, SparseGemm)  # else the dense FP8 baseline's DenseFp8Gemm
                    lib = "cusparselt-nvmath" if sparse else "cublaslt-nvmath"
                    out.append({"layer": f"{name}.{gname}", "kind": "int8" if sparse else "fp8", "sparse": sparse,
                                "n": g.n, "k": g.k, "epilogue": "+".join(ep) + f"->{g.out}",
                                "choice": {str(mp): [lib, t["alg"]] for mp, t in g.report().items()},
                                "ms": {str(mp): {lib: t["ms"]} for mp, t in g.report().items()}})
        for name, m in self.model.named_modules():
            if isinstance(m, DeployedLinear):
                out.append({"layer": name, "kind": m.kind, "sparse": m.sparse, "n": m.out_features,
                            "k": m.in_features, "epilogue": m.epilogue,
                            "choice": {str(k): list(v) for k, v in m.choice.items()},
                            "ms": {str(k): v for k, v in m.timings.items()}})
        return out


def _as_model(model_or_dir, recipe):
    from gpusq.recipes import Recipe, load_recipe

    if isinstance(model_or_dir, (str, Path)):
        from gpusq.checkpoint import load_compressed

        model, rec, info = load_compressed(model_or_dir)
        if info.get("task") not in (None, "classification"):
            raise GpusqError(f"deploy() builds classification models; {model_or_dir} is a {info['task']} output "
                             f"({info['model']}): `gpusq bench --model {info['model']}` measures its Swin backbone and "
                             "the whole model on the GPU kernels")
        if recipe is None:
            recipe = rec
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        raise GpusqError("deploy takes a model or a gpusq output directory, got "
                         f"{type(model_or_dir).__name__}")
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return model, recipe


def enable_fused_attention(model: nn.Module) -> int:
    """Turn on timm's ``fused_attn`` (SDPA) wherever a module has the switch; returns how many.

    timm's Swin leaves it off ("experimental"): its window attention is then two explicit batched
    matmuls with the bias/mask softmax between them, on alignment-1 kernels for 49-token windows.
    Through SDPA the same math runs in one kernel (bias and mask as ``attn_mask``), but with a float
    mask SDPA can only use its memory-efficient kernel: Swin-T batch 256 attention 13.0 ms vs 7.4 ms
    explicit on the H100 (benchmarks/results/bench_swin_t_sdpa.json). Kept as an option to measure."""
    n = 0
    for m in model.modules():
        if getattr(m, "fused_attn", None) is False:
            m.fused_attn = True
            n += 1
    return n


def deploy(model_or_dir, recipe=None, batch_sizes=(1,), *, input_size: tuple[int, int, int] | None = None,
           compile: str = "blocks", cuda_graphs: bool = True, fp8_kernel: str = "auto",
           fused_attention: bool = False, fused: str | bool = "auto",
           device: torch.device | None = None) -> DeployedModel:
    """Build the inference module (see the module docstring).

    ``compile``: ``blocks`` (each transformer block compiled once and reused), ``model`` (one graph)
    or ``none``. ``fused_attention``: attention through SDPA wherever timm has the switch (see
    ``enable_fused_attention``; off: slower for Swin on the H100). ``fp8_kernel`` (also used for
    un-quantized 2:4 layers): ``auto`` times cuSPARSELt 2:4 against the dense kernel per shape;
    ``sparse`` / ``dense`` force one. ``fused``: ``auto`` (default) runs the transformer blocks on
    the fused path (``gpusq.deploy.vit``) where they qualify and nvmath-python is installed;
    ``True`` requires it (one-line error naming why not); ``False`` never uses it. The result's
    ``fused`` attribute says which path ran and why.
    """
    from gpusq import hf
    from gpusq.deploy.modules import DeployedLinear, DeployedPatchEmbed
    from gpusq.families import model_input_size
    from gpusq.layers import compressed_layers, replace_module

    if fp8_kernel not in ("auto", "sparse", "dense"):
        raise GpusqError(f"fp8_kernel must be auto, sparse or dense, got {fp8_kernel!r}")
    if compile not in ("blocks", "model", "none"):
        raise GpusqError(f"compile must be blocks, model or none, got {compile!r}")
    model, recipe = _as_model(model_or_dir, recipe)  # (an unsupported output says so before the GPU check)
    dev = device or check_gpu()
    layers = compressed_layers(model)
    if not layers:
        raise GpusqError("the model has no compressed layers (run sparsify_/quantize_ or gpusq compress "
                         "first)")
    dense_dtype = DTYPES[recipe.deploy.dense_dtype] if recipe is not None else torch.bfloat16
    model = copy.deepcopy(model).eval()
    if hf.is_hf_model(model):
        hf.mask_free_attention_(model)  # no attention mask built inside a CUDA-graph capture
    if fused_attention:
        enable_fused_attention(model)
    layers = compressed_layers(model)
    fused_status = _fuse(model, layers, fused, dev)
    layers = {n: m for n, m in layers.items() if _resolves(model, n, m)}  # those the fused blocks took are gone
    new: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        kind, codes, ws, s_in = layer_codes(layer)
        if isinstance(layer, nn.Conv2d) and not DeployedPatchEmbed.supported(layer):
            raise GpusqError(f"{name}: only non-overlapping patch convolutions (stride = kernel, no "
                             "padding) can be deployed")
        kernel = "sparse" if kind == "int8" else fp8_kernel
        lin = DeployedLinear(codes, kind, weight_scale=ws, input_scale=s_in, bias=layer.bias,
                             sparse=layer.weight_mask is not None, device=dev, kernel=kernel, name=name)
        new[name] = DeployedPatchEmbed(layer, lin) if isinstance(layer, nn.Conv2d) else lin
    size = input_size or model_input_size(model)
    # a compressed patch conv (timm's patch_embed.proj, HF's patch_embeddings.projection) takes float32 images
    pe_compressed = any(isinstance(m, nn.Conv2d) for m in layers.values())
    input_dtype = torch.float32 if pe_compressed else dense_dtype
    model.to(device=dev, dtype=dense_dtype)
    for name, mod in new.items():
        replace_module(model, name, mod)
    out = DeployedModel(model, size, compile=compile, cuda_graphs=cuda_graphs, input_dtype=input_dtype,
                        dense_dtype=dense_dtype)
    out.fused = fused_status
    if fused_status == "fused":
        from gpusq.deploy.vit import fuse_vit_forward

        why = fuse_vit_forward(model)
        out.fused_forward = "fused" if why is None else f"the model's own ({why})"
    for b in batch_sizes:
        out.prepare(int(b))
    return out


def _resolves(model: nn.Module, name: str, module: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def _fuse(model: nn.Module, layers: dict, fused, dev: torch.device) -> str:
    """Try the fused-block path; returns ``"fused"`` or why not (``fused=True`` makes "why not" an
    error)."""
    if fused not in ("auto", True, False):
        raise GpusqError(f"fused must be auto, True or False, got {fused!r}")
    if fused is False:
        return "off (fused=False)"
    from gpusq.deploy import cslt
    from gpusq.deploy.hf_vit import fuse_hf_vit_layers, hf_vit_layers
    from gpusq.deploy.swin import fuse_swin_blocks, swin_stages
    from gpusq.deploy.vit import fuse_vit_blocks

    why = None if cslt.available() else "nvmath-python is not installed (pip install 'gpusq[gpu]')"
    if why is None:
        why = (fuse_swin_blocks(model, layers, dev) if swin_stages(model)
               else fuse_hf_vit_layers(model, layers, dev) if hf_vit_layers(model)
               else fuse_vit_blocks(model, layers, dev))
    if why is None:
        return "fused"
    if fused is True:
        raise GpusqError(f"the fused block path cannot be used: {why}")
    return f"per-layer ({why})"
