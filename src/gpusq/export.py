"""ONNX export of a compressed model with explicit Q/DQ and 2:4 weights (TensorRT explicit quantization).

Graph convention, for every compressed layer (``CompressedLinear`` / ``CompressedConv2d``):

* **weights**: the integer (or FP8) *codes* are stored as an initializer (``int8``; ``int4`` at
  opset 21; ``float8e4m3fn`` for FP8) followed by one ``DequantizeLinear`` with the per-output-channel
  float32 scale (``axis=0``, zero point 0). The 2:4 zeros are therefore visible in the initializer
  itself, which is the form TensorRT recommends for weights (quantized constant + DQ).
  Linear: ``DQ(W[out,in]) -> Transpose -> MatMul -> Add(bias)``; Conv: ``DQ(W) -> Conv``.
* **activations** (the layer input): ``QuantizeLinear -> DequantizeLinear`` with a per-tensor
  float32 scale and an ``int8`` (or ``float8e4m3fn``) zero point of 0.

So a layer with quantized weights and inputs has exactly one weight DQ and one activation Q/DQ
pair: ``#QuantizeLinear == L`` and ``#DequantizeLinear == 2 L`` for ``L`` such layers
(``qdq_summary``). The numbers are gpusq's fake quantization exactly: symmetric, zero point 0,
round half to even, weights in [-127, 127] / [-7, 7], activations saturated to [-128, 127].

How: each compressed layer is swapped for a stub whose ``torch.autograd.Function`` computes the
fake-quant forward in PyTorch and emits a placeholder node ``gpusq::CompressedGemm`` in the
TorchScript exporter (``dynamo=False``, available from torch 2.6 through at least 2.15); the
placeholders are then replaced with the Q/DQ subgraphs and integer initializers through the
``onnx`` graph API. Everything else (attention/SDPA, LayerNorm, GELU, Swin window ops) is the
exporter's ordinary float graph.

Opsets: 17-21. Default: 21 when a layer has INT4 weights (INT4 tensors need opset 21), 19 for FP8
(float8 Q/DQ need opset 19), else 17. INT4 weights below opset 21 fall back to ``int8``
initializers holding the same codes in [-7, 7] (recorded in ``ExportResult.fallbacks``).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpusq.errors import GpusqError, InternalError
from gpusq.layers import CompressedConv2d, CompressedLayer, CompressedLinear, compressed_layers

MIN_OPSET, MAX_OPSET = 17, 21
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter stops at 20; 20 -> 21 is done here
STUB_OP = "CompressedGemm"
STUB_DOMAIN = "gpusq"
# Ops whose opset-21 definition differs from opset 20 by more than added tensor types.
_CHANGED_IN_21 = {"GroupNormalization"}


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote."""

    path: Path
    opset: int
    layers: int
    weight_formats: dict[str, int]
    act_formats: dict[str, int]
    qdq: dict[str, int]
    fallbacks: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Stub modules: fake-quant forward in PyTorch, one placeholder node in the ONNX graph
# ---------------------------------------------------------------------------------------------
_ACTIVE: dict[str, nn.Module] = {}  # key -> layer, filled only while an export traces
_SHAPES: dict[str, tuple[int, ...]] = {}  # key -> traced output shape (for the placeholder's type)


class _StubFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:  # noqa: ARG004
        # The layer's own ops must not enter the trace (its weights would become constants).
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            y = _ACTIVE[key](x)
        finally:
            torch._C._set_tracing_state(state)
        _SHAPES[key] = tuple(y.shape)
        return y

    @staticmethod
    def symbolic(g, x, key: str):
        out = g.op(f"{STUB_DOMAIN}::{STUB_OP}", x, key_s=key)
        try:  # give the placeholder a type: dims dynamic in the input stay dynamic (batch)
            xs = x.type().varyingSizes()
            shape = list(_SHAPES[key])
            n_lead = len(shape) - 1 if isinstance(_ACTIVE[key], CompressedLinear) else 1
            sizes = [None if i < n_lead and xs[i] is None else shape[i] for i in range(len(shape))]
            out.setType(x.type().with_sizes(sizes))
        except Exception:  # noqa: BLE001 - typing is an optimization; onnx shape inference redoes it
            pass
        return out


class _Stub(nn.Module):
    def __init__(self, key: str, layer: nn.Module):
        super().__init__()
        self.key = key
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight, for models that read it off the module (Hugging Face ViT checks the patch
        projection's dtype); only its metadata may be used, the trace never sees its values."""
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StubFn.apply(x, self.key)


def _stubbed_copy(model: nn.Module) -> tuple[nn.Module, dict[str, CompressedLayer]]:
    from gpusq.layers import replace_module

    m = copy.deepcopy(model).float().eval()
    layers = compressed_layers(m)
    for name, layer in layers.items():
        replace_module(m, name, _Stub(name, layer))
    return m, layers


# ---------------------------------------------------------------------------------------------
# Tensors of one layer
# ---------------------------------------------------------------------------------------------
def _fmt(spec) -> str:
    return "none" if spec is None else spec.dtype


def _weight_codes(layer: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(codes or float weight, per-channel scale or None, format) exactly as the layer multiplies,
    in the weight's own shape; the stored codes of a loaded model (``gpusq.codes.layer_codes``)."""
    from gpusq.codes import layer_codes

    c = layer_codes(layer)
    shape = tuple(layer.weight.shape)
    if c.w_fmt == "none":
        return c.codes.reshape(shape), None, "float"
    return c.codes.reshape(shape), c.weight_scale, c.w_fmt


def _pack_int4(codes: np.ndarray) -> bytes:
    """ONNX INT4 raw data: the flattened codes packed two per byte (``gpusq.codes.pack_int4``'s layout)."""
    from gpusq.codes import pack_int4

    flat = torch.from_numpy(codes.astype(np.int8).reshape(-1))
    return pack_int4(torch.nn.functional.pad(flat, (0, flat.numel() % 2))).numpy().tobytes()


def _unpack_int4(raw: bytes, n: int) -> np.ndarray:
    from gpusq.codes import unpack_int4

    return unpack_int4(torch.frombuffer(bytearray(raw), dtype=torch.uint8)).numpy()[:n]


def _weight_tensor(name: str, codes: torch.Tensor, fmt: str, int4_native: bool):
    import onnx

    dims = list(codes.shape)
    if fmt == "float":
        return onnx.numpy_helper.from_array(codes.numpy().astype(np.float32), name)
    if fmt == "fp8_e4m3":
        raw = codes.view(torch.uint8).numpy().tobytes()
        return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, dims, raw, raw=True)
    if fmt == "int4" and int4_native:
        return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, dims, _pack_int4(codes.numpy()), raw=True)
    return onnx.numpy_helper.from_array(codes.numpy().astype(np.int8), name)


def initializer_array(t) -> np.ndarray:
    """An initializer as numpy: int4 unpacked to int8, fp8 to float32 (for checks)."""
    import onnx

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type == onnx.TensorProto.INT4:
        if t.raw_data:
            return _unpack_int4(t.raw_data, n).reshape(tuple(t.dims))
        return onnx.numpy_helper.to_array(t).astype(np.int8)
    if t.data_type == onnx.TensorProto.FLOAT8E4M3FN:
        raw = np.frombuffer(t.raw_data, dtype=np.uint8).copy()
        return torch.from_numpy(raw).view(torch.float8_e4m3fn).float().numpy().reshape(tuple(t.dims))
    return onnx.numpy_helper.to_array(t)


# ---------------------------------------------------------------------------------------------
# Graph surgery
# ---------------------------------------------------------------------------------------------
def _layer_nodes(key: str, layer: CompressedLayer, x: str, y: str, int4_native: bool,
                 fallbacks: list[str]) -> tuple[list, list]:
    """Nodes and initializers computing ``y = layer(x)`` with explicit Q/DQ."""
    import onnx
    from onnx import helper

    nodes, inits = [], []
    p = key
    # activation Q/DQ (per tensor)
    a = x
    if layer.input_quant is not None:
        afmt = layer.input_quant.spec.dtype
        scale = float(layer.input_quant.scale.detach().abs().float().cpu())
        inits.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{p}.input_scale"))
        if afmt == "int8":
            inits.append(onnx.numpy_helper.from_array(np.array(0, np.int8), f"{p}.input_zero_point"))
        elif afmt == "fp8_e4m3":
            inits.append(helper.make_tensor(f"{p}.input_zero_point", onnx.TensorProto.FLOAT8E4M3FN, [],
                                            b"\x00", raw=True))
        else:
            raise InternalError(f"layer {key}: activation format {afmt} has no ONNX Q/DQ mapping")
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{p}.input_scale", f"{p}.input_zero_point"],
                                      [f"{p}.input_q"], name=f"{p}.input_quantize"))
        nodes.append(helper.make_node("DequantizeLinear",
                                      [f"{p}.input_q", f"{p}.input_scale", f"{p}.input_zero_point"],
                                      [f"{p}.input_dq"], name=f"{p}.input_dequantize"))
        a = f"{p}.input_dq"
    # weight: codes initializer + DQ (per output channel, axis 0)
    codes, wscale, wfmt = _weight_codes(layer)
    if wfmt == "int4" and not int4_native:
        fallbacks.append(f"{key}: int4 codes stored as int8 (opset < 21)")
    if wfmt == "float":
        inits.append(_weight_tensor(f"{p}.weight", codes, wfmt, int4_native))
        w = f"{p}.weight"
    else:
        inits.append(_weight_tensor(f"{p}.weight_quantized", codes, wfmt, int4_native))
        inits.append(onnx.numpy_helper.from_array(wscale.numpy().astype(np.float32), f"{p}.weight_scale"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.weight_quantized", f"{p}.weight_scale"],
                                      [f"{p}.weight_dq"], name=f"{p}.weight_dequantize", axis=0))
        w = f"{p}.weight_dq"
    bias = getattr(layer, "bias", None)
    if bias is not None:
        inits.append(onnx.numpy_helper.from_array(bias.detach().float().cpu().numpy(), f"{p}.bias"))
    if isinstance(layer, CompressedLinear):
        nodes.append(helper.make_node("Transpose", [w], [f"{p}.weight_t"], name=f"{p}.weight_transpose",
                                      perm=[1, 0]))
        mm_out = f"{p}.matmul" if bias is not None else y
        nodes.append(helper.make_node("MatMul", [a, f"{p}.weight_t"], [mm_out], name=f"{p}.matmul"))
        if bias is not None:
            nodes.append(helper.make_node("Add", [mm_out, f"{p}.bias"], [y], name=f"{p}.add_bias"))
    elif isinstance(layer, CompressedConv2d):
        if layer.padding_mode != "zeros":
            raise GpusqError(f"layer {key}: padding_mode={layer.padding_mode!r} is not exportable "
                             "(zeros only)")
        attrs: dict[str, Any] = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                                     dilations=list(layer.dilation), group=int(layer.groups))
        if isinstance(layer.padding, str):
            if layer.padding == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            else:
                attrs["pads"] = [0, 0, 0, 0]
        else:
            ph, pw = layer.padding
            attrs["pads"] = [ph, pw, ph, pw]
        ins = [a, w] + ([f"{p}.bias"] if bias is not None else [])
        nodes.append(helper.make_node("Conv", ins, [y], name=f"{p}.conv", **attrs))
    else:
        raise InternalError(f"layer {key}: {type(layer).__name__} is not exportable")  # only the two layer types exist
    return nodes, inits


def _replace_stubs(model_proto, layers: dict[str, CompressedLayer], int4_native: bool) -> list[str]:
    graph = model_proto.graph
    fallbacks: list[str] = []
    new_nodes, seen = [], set()
    for node in graph.node:
        if node.domain == STUB_DOMAIN and node.op_type == STUB_OP:
            key = next(a.s.decode() for a in node.attribute if a.name == "key")
            if key in seen:
                raise GpusqError(f"layer {key} is called more than once in the traced graph; not supported")
            seen.add(key)
            nodes, inits = _layer_nodes(key, layers[key], node.input[0], node.output[0], int4_native,
                                        fallbacks)
            new_nodes.extend(nodes)
            graph.initializer.extend(inits)
        else:
            new_nodes.append(node)
    missing = set(layers) - seen
    if missing:
        raise GpusqError(f"{len(missing)} compressed layers were not reached by the forward pass "
                         f"(e.g. {sorted(missing)[0]})")
    del graph.node[:]
    graph.node.extend(new_nodes)
    for imp in list(model_proto.opset_import):
        if imp.domain == STUB_DOMAIN:
            model_proto.opset_import.remove(imp)
    return fallbacks


def _set_opset(model_proto, opset: int) -> None:
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if opset == 21 and imp.version == 20:
                bad = {n.op_type for n in model_proto.graph.node if n.op_type in _CHANGED_IN_21}
                if bad:
                    raise GpusqError(f"opset 21 changes the semantics of {', '.join(sorted(bad))}; "
                                     "export with --opset 20 (int4 weights are then stored as int8)")
            imp.version = opset


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def load_model(model_or_dir: nn.Module | str | Path) -> nn.Module:
    """A compressed (fake-quant) model from a ``gpusq compress`` directory, or the module itself."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir
    from gpusq.checkpoint import load_compressed

    p = Path(model_or_dir)
    if not p.exists():
        raise GpusqError(f"checkpoint not found: {p}")
    if p.is_dir() and (p / "model.safetensors").is_file() and not (p / "recipe.yaml").is_file():
        raise GpusqError(f"{p} holds a dense model (no recipe.yaml); export needs a `gpusq compress` output")
    model, _, info = load_compressed(p)
    if info.get("task") not in (None, "classification"):
        raise GpusqError(f"gpusq export writes ONNX for classification models; {p} is a {info['task']} output "
                         f"({info['model']}), not supported (evaluate it with `gpusq eval --checkpoint {p}`)")
    return model


def default_opset(model: nn.Module) -> int:
    fmts = set()
    for layer in compressed_layers(model).values():
        fmts.add(_fmt(layer.weight_quant.spec if layer.weight_quant else None))
        fmts.add(_fmt(layer.input_quant.spec if layer.input_quant else None))
    if "int4" in fmts:
        return 21
    if "fp8_e4m3" in fmts:
        return 19
    return MIN_OPSET


def export_onnx(
    model_or_dir: nn.Module | str | Path,
    path: str | Path,
    opset: int | None = None,
    example_input: torch.Tensor | None = None,
    batch_size: int = 2,
    input_name: str = "input",
    output_name: str = "logits",
) -> ExportResult:
    """Export a compressed model to ONNX with Q/DQ on weights and inputs of every compressed layer.

    The batch axis is dynamic; other input dims are fixed to ``example_input`` (default: the
    model's input size). Raises ``GpusqError`` for bad input (not a gpusq output, missing output
    directory, unsupported opset).
    """
    import onnx

    from gpusq.checkpoint import atomic_write
    from gpusq.families import model_input_size

    out = Path(path)
    if not out.parent.is_dir():
        raise GpusqError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise GpusqError(f"output path is a directory: {out}")
    model = load_model(model_or_dir)
    layers0 = compressed_layers(model)
    if not layers0:
        raise GpusqError("the model has no compressed layers (is it a gpusq output?)")
    if opset is None:
        opset = default_opset(model)
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise GpusqError(f"unsupported opset {opset}: use {MIN_OPSET}..{MAX_OPSET}")
    wfmts: dict[str, int] = {}
    afmts: dict[str, int] = {}
    for layer in layers0.values():
        wf = _fmt(layer.weight_quant.spec if layer.weight_quant else None)
        af = _fmt(layer.input_quant.spec if layer.input_quant else None)
        wfmts[wf] = wfmts.get(wf, 0) + 1
        afmts[af] = afmts.get(af, 0) + 1
    if opset < 19 and ("fp8_e4m3" in wfmts or "fp8_e4m3" in afmts):
        raise GpusqError(f"FP8 Q/DQ needs opset >= 19 (got {opset})")

    stubbed, layers = _stubbed_copy(model)
    if example_input is None:
        example_input = torch.randn(batch_size, *model_input_size(model))
    example_input = example_input.detach().float().cpu()
    stubbed = stubbed.cpu()
    buf = io.BytesIO()
    _ACTIVE.clear()
    _SHAPES.clear()
    _ACTIVE.update(layers)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
          torch.onnx.export(
            stubbed, (example_input,), buf, dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True, custom_opsets={STUB_DOMAIN: 1},
          )
        finally:
            _ACTIVE.clear()
            _SHAPES.clear()
    proto = onnx.load_model_from_string(buf.getvalue())
    fallbacks = _replace_stubs(proto, layers, int4_native=opset >= 21)
    _set_opset(proto, opset)
    proto.producer_name = "gpusq"
    onnx.helper.set_model_props(proto, {"gpusq_layers": json.dumps(list(layers)), "gpusq_opset": str(opset)})
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise InternalError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from e
    data = proto.SerializeToString()
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return ExportResult(out, opset, len(layers), wfmts, afmts, qdq_summary(proto), fallbacks)


def qdq_summary(model_proto) -> dict[str, int]:
    """Counts of Q/DQ nodes: ``weight_dq`` (DQ of an initializer), ``act_qdq`` (Q followed by DQ)."""
    graph = model_proto.graph
    inits = {t.name for t in graph.initializer}
    q_out = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    return {
        "QuantizeLinear": sum(n.op_type == "QuantizeLinear" for n in graph.node),
        "DequantizeLinear": sum(n.op_type == "DequantizeLinear" for n in graph.node),
        "weight_dq": sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in graph.node),
        "act_qdq": sum(n.op_type == "DequantizeLinear" and n.input[0] in q_out for n in graph.node),
    }


def layer_keys(model_proto) -> list[str]:
    """Names of the compressed layers recorded in the exported file's metadata."""
    meta = {p.key: p.value for p in model_proto.metadata_props}
    return json.loads(meta.get("gpusq_layers", "[]"))


def weight_initializers(model_proto) -> dict[str, np.ndarray]:
    """Each compressed layer's weight initializer (quantized codes, or the float weight) as numpy."""
    by_name = {t.name: t for t in model_proto.graph.initializer}
    out = {}
    for key in layer_keys(model_proto):
        t = by_name.get(f"{key}.weight_quantized") or by_name.get(f"{key}.weight")
        if t is None:
            raise KeyError(f"no weight initializer for layer {key}")
        out[t.name] = initializer_array(t)
    return out


def is_2to4_array(w: np.ndarray) -> bool:
    """2:4 along the GEMM input dim (the weight flattened to [out, -1]), as ``gpusq.sparsity``."""
    from gpusq.sparsity import is_2to4

    return is_2to4(torch.from_numpy(np.array(w, dtype=np.float32)))


# ---------------------------------------------------------------------------------------------
# Verification with onnxruntime
# ---------------------------------------------------------------------------------------------
def ort_session(path: str | Path, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare(model: nn.Module, session, batches, floor: bool = False) -> dict[str, float]:
    """Top-1 agreement and logits relative error (||ort - torch|| / ||torch||) over ``batches``.

    ``floor``: also compare PyTorch with itself, two ways. ``floor_*``: fused SDPA vs the math
    SDPA kernel (two valid float orderings of the same attention; ORT's decomposed attention is a
    third). ``noise_*``: the input times ``1 + 1e-6 N(0, 1)`` (a few float32 ulps). In a quantized
    net such float-rounding differences flip an activation code at a rounding boundary now and
    then, and the flips propagate: this is the disagreement to expect of *any* faithful runtime.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    name = session.get_inputs()[0].name
    n = agree = 0
    num = den = fnum = 0.0
    max_abs = 0.0
    fagree = correct_ref = correct_ort = nagree = 0
    nnum = 0.0
    g = torch.Generator().manual_seed(1234)
    labelled = False
    for x, y in batches:
        x = x.float().cpu()
        ref = model(x.to(dev)).float().cpu()
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        if y is not None:
            labelled = True
            correct_ref += int((ref.argmax(1) == y).sum())
            correct_ort += int((got.argmax(1) == y).sum())
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        n += x.shape[0]
        num += float((got - ref).double().pow(2).sum())
        den += float(ref.double().pow(2).sum())
        max_abs = max(max_abs, float((got - ref).abs().max()))
        if floor:
            with sdpa_kernel([SDPBackend.MATH]):
                alt = model(x.to(dev)).float().cpu()
            fagree += int((ref.argmax(1) == alt.argmax(1)).sum())
            fnum += float((alt - ref).double().pow(2).sum())
            xn = x * (1 + 1e-6 * torch.randn(x.shape, generator=g))
            alt = model(xn.to(dev)).float().cpu()
            nagree += int((ref.argmax(1) == alt.argmax(1)).sum())
            nnum += float((alt - ref).double().pow(2).sum())
    model.train(was_training)
    out = {"n": n, "top1_agree": agree / max(n, 1), "rel_err": (num / max(den, 1e-30)) ** 0.5,
           "max_abs_err": max_abs}
    if labelled:
        out.update(torch_top1=correct_ref / max(n, 1), ort_top1=correct_ort / max(n, 1))
    if floor:
        out.update(floor_top1_agree=fagree / max(n, 1), floor_rel_err=(fnum / max(den, 1e-30)) ** 0.5,
                   noise_top1_agree=nagree / max(n, 1), noise_rel_err=(nnum / max(den, 1e-30)) ** 0.5)
    return out


def random_batches(size: tuple[int, ...], n: int, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left = n
    while left > 0:
        b = min(batch_size, left)
        yield torch.randn(b, *size, generator=g), None
        left -= b


def data_batches(data: str, size: tuple[int, int, int], n: int, batch_size: int, norm=None):
    """(normalized images, labels) from ``data`` ('mnist5k', an ImageFolder dir or .zip), at most ``n``;
    ``norm``: the model's own (mean, std) (``gpusq.data.model_norm``), default gpusq's."""
    from gpusq.data import Batches, build_dataset, prepare_batch

    ds, _ = build_dataset(data, "val", size)
    if len(ds) > n:
        ds = torch.utils.data.Subset(ds, list(range(0, len(ds), max(1, len(ds) // n)))[:n])
    for x, y, _ in Batches(ds, batch_size, shuffle=False, workers=0):
        yield prepare_batch(x, torch.device("cpu"), train=False, flip=False, norm=norm), y


def verify(model: nn.Module, onnx_path: str | Path, data: str = "random", n: int = 256,
           batch_size: int = 32, optimize: bool = True, floor: bool = False) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU) next to the PyTorch fake-quant model."""
    from gpusq.families import model_input_size

    size = model_input_size(model)
    if data == "random":
        batches = random_batches(size, n, batch_size)
    else:
        from gpusq.data import model_norm

        batches = data_batches(data, size, n, batch_size, norm=model_norm(model))
    return compare(model, ort_session(onnx_path, optimize=optimize), batches, floor=floor)
