"""Accuracy benchmark on real data: CIFAR-10 (20k train / 10k test JPEGs), GPUSQ vs ablations.

A DeiT-Tiny-shaped teacher (embed 192, depth 12, 3 heads; 32×32 input, patch 4) is trained from
scratch, then compressed with ``int8`` and ``int4``, plus ablations of the int8 method:

* ``int8-noKD``: hard labels only in both stages;
* ``int8-noFeat``: KD on logits, no feature terms;
* ``int8-noWeight``: feature KD without layer-importance weighting;
* ``int8-PTQ``: 2:4 + calibration, no training at all.

Each seed runs in its own process (they share the GPU); the table is the mean over seeds.

    python benchmarks/cifar10_accuracy.py --data ../shared/data/cifar10-jpeg-20k.zip --out runs/cifar
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpusq.pipeline import DataOptions, compress, resolve_model, train_dense
from gpusq.recipes import load_recipe

MODEL = "deit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10}

VARIANTS = {  # name: (recipe, overrides, reuse stage 1 of)
    "int8": ("int8", {}, None),
    "int4": ("int4", {}, "int8"),
    "int8-noWeight": ("int8", {"distill": {"layer_weighting": False}}, "int8"),
    "int8-noKD": ("int8", {"distill": {"beta": 0.0, "gamma": 0.0}}, None),
    "int8-noFeat": ("int8", {"distill": {"gamma": 0.0}}, None),
    "int8-PTQ": ("int8", {"train": {"stage1": {"epochs": 0}, "stage2": {"epochs": 0}}}, None),
}


def run_seed(args, seed: int) -> dict:
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    teacher, name, kw = resolve_model(None, {}, str(Path(args.out) / "teacher"))
    data = DataOptions(args.data, batch_size=args.batch_size, workers=args.workers, seed=seed)
    common = {"train": {"stage1": {"epochs": args.stage1_epochs, "lr": args.stage1_lr, "warmup_epochs": 0.5},
                        "stage2": {"epochs": args.stage2_epochs, "lr": args.stage2_lr},
                        "calib_batches": 16, "importance_batches": 8}}
    res = {}
    for v, (recipe_name, over, reuse) in VARIANTS.items():
        if args.only and v not in args.only.split(","):
            continue
        from gpusq.recipes import _merge

        recipe = load_recipe(recipe_name, _merge(common, over))
        t = time.time()
        rep = compress(teacher, recipe, data, out / v, model_name=name, model_kwargs=kw, progress=False,
                       compile=args.compile,
                       stage1_from=(out / reuse / "stage1") if reuse and (out / reuse / "stage1").is_dir() else None)
        res[v] = {"top1": rep["metrics"]["top1"], "top5": rep["metrics"]["top5"],
                  "stage1_top1": rep["stage1_metrics"]["top1"], "seconds": time.time() - t}
        print(f"[seed {seed}] {v:<14} top-1 {res[v]['top1']:.2f}  (stage 1 {res[v]['stage1_top1']:.2f}) "
              f"{res[v]['seconds']:.0f}s", flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg-20k.zip")
    ap.add_argument("--out", default="runs/cifar10")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--teacher-epochs", type=float, default=60)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--stage1-epochs", type=float, default=8)
    ap.add_argument("--stage1-lr", type=float, default=2e-4)
    ap.add_argument("--stage2-epochs", type=float, default=8)
    ap.add_argument("--stage2-lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated subset of variants")
    ap.add_argument("--compile", action="store_true", help="torch.compile training (much faster on GPU)")
    ap.add_argument("--teacher-only", action="store_true", help="stop after training the teacher")
    ap.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-arg", default="", help="extra timm kwargs for a smaller/larger teacher")
    args = ap.parse_args()
    if args.worker_seed is not None:
        run_seed(args, args.worker_seed)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kw = dict(KWARGS)
    if args.model_arg:
        from gpusq.models import parse_model_kwargs

        kw.update(parse_model_kwargs([args.model_arg]))
    if not (out / "teacher" / "model.safetensors").is_file():
        rep = train_dense(MODEL, kw, DataOptions(args.data, workers=args.workers, seed=0), out / "teacher",
                          epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                          warmup_epochs=5, label_smoothing=0.1, progress=False, compile=args.compile)
        print(f"teacher: top-1 {rep['metrics']['top1']:.2f} in {rep['train_seconds']:.0f}s "
              f"({rep['train_images_per_s']:.0f} img/s)", flush=True)
    if args.teacher_only:
        return
    teacher_top1 = json.loads((out / "teacher" / "report.json").read_text())["metrics"]["top1"]
    seeds = [int(s) for s in args.seeds.split(",")]
    argv = [a for a in sys.argv[1:]]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker-seed", str(s)],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for s in seeds]
    if any(p.wait() for p in procs):
        sys.exit("a seed run failed")
    per_seed = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in seeds]
    rows = []
    for v in per_seed[0]:
        vals = [r[v]["top1"] for r in per_seed]
        mean = sum(vals) / len(vals)
        rows.append((v, mean, vals, sum(r[v]["top5"] for r in per_seed) / len(per_seed)))
    lines = [f"teacher (dense, from scratch): top-1 {teacher_top1:.2f}", "",
             "| variant | top-1 (mean) | Δ vs teacher | per seed | top-5 (mean) |", "|---|---|---|---|---|"]
    for v, mean, vals, t5 in rows:
        lines.append(f"| {v} | {mean:.2f} | {mean - teacher_top1:+.2f} | {', '.join(f'{x:.2f}' for x in vals)} "
                     f"| {t5:.2f} |")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines.append(f"\nseeds {seeds}; total {time.time() - t0:.0f}s on {dev}")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
