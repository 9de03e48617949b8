"""Train a tiny DeiT and a tiny Swin on the offline CIFAR-10 jpgs and compress them to INT8 / INT4 2:4.

Why: the GPU correctness test (tests/gpu/test_deploy_gpu.py) compares the deployed model with
its fake-quant twin on a *trained* compressed model and real images, where it exists; random
weights hide problems (flat logits, no outliers). Output (git-ignored, carried to the device):

    .carry/cifar_deit_int8/      gpusq compress output format (save_compressed)
    .carry/cifar_deit_int4/      the same 2:4 model after INT4 (W4A8) QAT
    .carry/cifar_swin_int8/, .carry/cifar_swin_int4/   the same for a Swin (16 x 16 tokens, windows of 4)
    .carry/cifar_test.safetensors  2,000 test images (uint8 NCHW) + labels

Run: python tests/gpu/make_cifar_model.py [--zip PATH] [--out .carry] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHS = {  # name -> (timm model, kwargs)
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10, depth=4)),
    # shifted windows in stages 1-2 (16 x 16 and 8 x 8 tokens), head dim 32 as in Swin-T/S/B
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=64,
                                                  depths=(2, 2, 2), num_heads=(2, 4, 8), num_classes=10)),
}


def load_split(zf: zipfile.ZipFile, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs, ys = [], []
    for name in sorted(zf.namelist()):
        parts = name.split("/")
        if len(parts) != 4 or parts[1] != split or not name.endswith(".jpg"):
            continue
        img = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
        xs.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        ys.append(CLASSES.index(parts[2]))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


DEVICE = torch.device("cpu")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (CPU) -> normalized float on ``DEVICE``."""
    x = x.to(DEVICE)
    return (x.float() / 255.0 - MEAN.to(DEVICE)) / STD.to(DEVICE)


def train(model, x, y, epochs: float, lr: float, bs: int = 128) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = int(epochs * len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        xb = normalize(x[idx])
        if torch.rand(1, generator=g) < 0.5:
            xb = xb.flip(3)
        loss = F.cross_entropy(model(xb), y[idx].to(DEVICE), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"  step {step}/{steps} loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        correct += (model(normalize(x[i:i + 500])).argmax(1).cpu() == y[i:i + 500]).sum().item()
    return correct / len(x)


def main() -> None:
    import timm
    from safetensors.torch import save_file

    from gpusq.checkpoint import save_compressed
    from gpusq.quant import calibrate, quantize_
    from gpusq.recipes import load_recipe
    from gpusq.sparsity import sparsify_

    ap = argparse.ArgumentParser()
    ap.add_argument("--zip", default="/work/shared/data/cifar10-jpeg-20k.zip")
    ap.add_argument("--out", default=".carry")
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--archs", default="deit,swin", help=f"comma-separated, of {', '.join(ARCHS)}")
    ap.add_argument("--device", default="cpu", help="cpu (a few minutes on an idle 2-core machine) or cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    t0 = time.time()
    with zipfile.ZipFile(args.zip) as zf:
        xtr, ytr = load_split(zf, "train")
        xte, yte = load_split(zf, "test")
    print(f"data {tuple(xtr.shape)} {tuple(xte.shape)} in {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    accs = {}
    for arch in args.archs.split(","):
        model_name, kwargs = ARCHS[arch]
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, **kwargs).to(DEVICE)
        train(model, xtr, ytr, args.epochs, 1e-3)
        print(f"{arch} dense acc {accuracy(model, xte[:2000], yte[:2000]):.3f} ({time.time() - t0:.0f}s)", flush=True)
        r = load_recipe("int8")
        sparsify_(model, r.sparsity)
        train(model, xtr, ytr, 0.5, 3e-4)
        print(f"{arch} 2:4 acc {accuracy(model, xte[:2000], yte[:2000]):.3f} ({time.time() - t0:.0f}s)", flush=True)
        sparse_state = copy.deepcopy(model.state_dict())
        for name in ("int8", "int4"):  # both QAT'd from the same 2:4 model
            model.load_state_dict(sparse_state)
            r = load_recipe(name)
            quantize_(model, r.quant)
            calibrate(model, lambda m: [m(normalize(xtr[i:i + 256])) for i in range(0, 1024, 256)])
            train(model, xtr, ytr, 0.25, 5e-5)
            accs[f"{arch}_{name}"] = acc = accuracy(model, xte[:2000], yte[:2000])
            print(f"{arch} {name} 2:4 fake-quant acc {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
            save_compressed(model.cpu(), out / f"cifar_{arch}_{name}", r, model_name, kwargs)
            model = timm.create_model(model_name, pretrained=False, **kwargs)
            sparsify_(model, r.sparsity)
            model.to(DEVICE)
    save_file({"images": xte[:2000].contiguous(), "labels": yte[:2000].contiguous()},
              str(out / "cifar_test.safetensors"),
              metadata={f"fake_quant_acc_{k}": f"{v:.4f}" for k, v in accs.items()})
    print("saved", out)


if __name__ == "__main__":
    main()
