"""Accuracy ablation on real data: CIFAR-10 (20k train / 10k test JPEGs), GPUSQ vs ablations (issue 15).

A DeiT-Tiny-shaped teacher (embed 192, depth 12, 3 heads; 32×32 input, patch 4) is trained from
scratch once, then compressed, for INT8 (W8A8) and INT4 (W4A8), each with a short and a normal
stage-2 length, over several seeds. Rows:

* ``full``: the method as shipped (feature KD weighted per layer by relative stage-1 distortion);
* ``uniform``: feature KD without layer weighting (``distill.layer_weighting: false``);
* ``paper``: weights from each layer's share of the stage-1 feature loss (``distill.importance: paper``);
* ``noFeat``: KD on logits only (``gamma: 0``, both stages);
* ``noKD``: hard labels only (``beta: 0, gamma: 0``, both stages);
* ``PTQ``: 2:4 + calibration, no training at all.

Sharing: per seed, one stage-1 run per KD setting (full KD, logits only, none) serves every
precision, length and weighting that uses it (stage 1 does not depend on them). All lengths are
exact (``min_steps: 0``), so the table says what it ran.

The teacher trains with gpusq's standard augmentation (pad-crop + flip), or with ``--teacher-augment
deit``: DeiT's recipe through the recipe's ``augment`` fields (RandAugment rand-m9-mstd0.5-inc1,
Mixup 0.8, CutMix 1.0, random erasing 0.25, with the label smoothing 0.1), against the overfitting
of the standard teacher (98.6% train / 71% test top-1 after 100 epochs); ``--teacher-set
augment.FIELD=VALUE`` changes single fields. The choice is written to ``teacher/augment.json``.

Jobs run in ``--procs`` worker processes on one GPU (small ViTs are bound by kernel launches, so
several processes share a GPU well); each job's result is a JSON file as soon as it ends and the
table is rewritten after every job, so a run cut short by ``--deadline`` still reports every finished
job (``n`` per row). Workers claim no job that would not end before the deadline.

    python benchmarks/cifar10_accuracy.py --data ../shared/data/cifar10-jpeg-20k.zip --out runs/cifar
    python benchmarks/cifar10_accuracy.py --teacher-only --teacher-augment deit --teacher-epochs 300 ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "deit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10}

# variant: (distill overrides, stage-1 KD setting it reuses)
VARIANTS = {
    "full": ({}, "kd"),
    "uniform": ({"layer_weighting": False}, "kd"),
    "paper": ({"importance": "paper"}, "kd"),
    "noFeat": ({"gamma": 0.0}, "nofeat"),
    "noKD": ({"beta": 0.0, "gamma": 0.0}, "nokd"),
    "PTQ": ({}, None),
}
STAGE1 = {"kd": {}, "nofeat": {"gamma": 0.0}, "nokd": {"beta": 0.0, "gamma": 0.0}}
TRAIN_IMAGES = 20_000
# DeiT's augmentation (Touvron et al. 2021, timm's train.py flags): the recipe's augment fields
TEACHER_AUGMENT = {
    "none": {},
    "deit": {"auto_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "re_prob": 0.25,
             "re_mode": "pixel"},
    # DeiT's batch-level half only (no RandAugment; Mixup/CutMix on the GPU, erasing drawn on the CPU and
    # written in one copy per batch; docs/results.md on the speeds measured)
    "mix": {"mixup": 0.8, "cutmix": 1.0, "re_prob": 0.25, "re_mode": "pixel"},
    # DeiT's per-image half only (RandAugment in the loader, random erasing; no mixed samples, which need
    # far more optimizer steps than a 20k-image set gives: see the mix teacher in docs/results.md)
    "ra": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel"},
}
EST_IMG_PER_S = 1_000  # conservative per-process rate with many processes on one GPU (for the deadline)


def parse_lengths(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, ep = part.partition("=")
        out[name.strip()] = float(ep)
    return out


def jobs(args) -> list[dict]:
    """Every job in priority order; a job's ``needs`` names the stage-1 job it reuses."""
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    precisions = args.precisions.split(",")
    lengths = parse_lengths(args.lengths)
    kinds = [k for k in STAGE1 if any(VARIANTS[v][1] == k for v in variants)]
    out = [{"name": f"s1-{k}-seed{s}", "kind": "stage1", "s1": k, "seed": s} for k in kinds for s in seeds]
    for length in lengths:  # short first: where an effect of the weighting is most likely
        for prec in precisions:
            for v in variants:
                if v == "PTQ":
                    continue
                for s in seeds:
                    out.append({"name": f"{prec}-{length}-{v}-seed{s}", "kind": "stage2", "precision": prec,
                                "length": length, "epochs": lengths[length], "variant": v, "seed": s,
                                "needs": f"s1-{VARIANTS[v][1]}-seed{s}"})
    if "PTQ" in variants:
        out += [{"name": f"{p}-PTQ-seed{s}", "kind": "ptq", "precision": p, "variant": "PTQ", "seed": s}
                for p in precisions for s in seeds]
    return out


def teacher_augment(args):
    """The teacher's ``AugmentConfig``: the ``--teacher-augment`` preset, then ``--teacher-set`` fields."""
    from gpusq.augment import AugmentConfig
    from gpusq.recipes import _build, _merge, parse_override

    over = dict(TEACHER_AUGMENT[args.teacher_augment])
    for s in args.teacher_set:
        o = parse_override(s)
        if set(o) != {"augment"}:
            raise SystemExit(f"--teacher-set {s}: only augment.FIELD=VALUE")
        over = _merge(over, o["augment"])
    return _build(AugmentConfig, over, "augment")


def est_seconds(job: dict, args) -> float:
    if job["kind"] == "stage1":
        return args.stage1_epochs * TRAIN_IMAGES / EST_IMG_PER_S + 15
    if job["kind"] == "stage2":
        return job["epochs"] * TRAIN_IMAGES / EST_IMG_PER_S + 15
    return 15


def run_job(job: dict, args, teacher, name, kw, root: Path) -> dict:
    from gpusq.pipeline import DataOptions, compress
    from gpusq.recipes import _merge, load_recipe

    data = DataOptions(args.data, batch_size=args.batch_size, workers=0, seed=job["seed"])
    s1 = {"epochs": args.stage1_epochs, "min_steps": 0, "lr": args.stage1_lr, "warmup_epochs": 0.5}
    common = {"train": {"calib_batches": 16, "importance_batches": 8}}
    if job["kind"] == "stage1":
        over = _merge(common, {"train": {"stage1": s1, "stage2": {"epochs": 0}}, "distill": STAGE1[job["s1"]]})
        recipe, s1_from = load_recipe("sparse", over), None
    elif job["kind"] == "stage2":
        s2 = {"epochs": job["epochs"], "min_steps": 0, **({"lr": args.stage2_lr} if args.stage2_lr else {})}
        over = _merge(common, {"train": {"stage2": s2}, "distill": VARIANTS[job["variant"]][0]})
        recipe, s1_from = load_recipe(job["precision"], over), root / "runs" / job["needs"] / "stage1"
    else:  # PTQ: 2:4 (magnitude) + calibration, no training
        over = _merge(common, {"train": {"stage1": {"epochs": 0}, "stage2": {"epochs": 0}}})
        recipe, s1_from = load_recipe(job["precision"], over), None
    t = time.time()
    rep = compress(teacher, recipe, data, root / "runs" / job["name"], model_name=name, model_kwargs=kw,
                   progress=False, stage1_from=s1_from, epoch_eval=False)
    return {**{k: v for k, v in job.items() if k != "needs"}, "top1": rep["metrics"]["top1"],
            "top5": rep["metrics"]["top5"], "stage1_top1": rep["stage1_metrics"]["top1"],
            "calibrated_top1": rep.get("calibrated_metrics", {}).get("top1"), "seconds": time.time() - t,
            "layer_weights": rep.get("layer_weights")}


def claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker(args, wid: int) -> None:
    """Claim and run jobs (priority order) whose stage 1 is done, until none is left or time is up."""
    import torch

    from gpusq.pipeline import resolve_model

    torch.set_num_threads(1)
    root = Path(args.out)
    teacher, name, kw = resolve_model(None, {}, str(root / "teacher"))
    todo = jobs(args)
    res, claims = root / "results", root / "claims"
    while True:
        left = [j for j in todo if not (claims / j["name"]).exists()]
        if not left:
            return
        ran = False
        for j in left:
            if j.get("needs") and not (res / f"{j['needs']}.json").is_file():
                if (res / f"{j['needs']}.failed").exists() or (res / f"{j['needs']}.skipped").exists():
                    if claim(claims / j["name"]):
                        (res / f"{j['name']}.skipped").write_text(f"needs {j['needs']}\n")
                continue
            if args.deadline and time.time() + est_seconds(j, args) > args.deadline:
                if claim(claims / j["name"]):  # would not finish in time: skipped (n < seeds in the table)
                    (res / f"{j['name']}.skipped").write_text("deadline\n")
                continue
            if not claim(claims / j["name"]):
                continue
            try:
                r = run_job(j, args, teacher, name, kw, root)
            except Exception as e:  # noqa: BLE001 - one failed job must not stop the sweep
                (res / f"{j['name']}.failed").write_text(f"{type(e).__name__}: {e}\n")
                print(f"[w{wid}] {j['name']} FAILED: {e}", flush=True)
            else:
                tmp = res / f".{j['name']}.tmp"
                tmp.write_text(json.dumps(r, indent=2))
                os.replace(tmp, res / f"{j['name']}.json")
                print(f"[w{wid}] {j['name']:<28} top-1 {r['top1']:.2f} (stage 1 {r['stage1_top1']:.2f}) "
                      f"{r['seconds']:.0f}s", flush=True)
            ran = True
            break
        if not ran:
            time.sleep(1.0)


def mean_sd(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    return f"{m:.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{m:.2f}"


def table(args, t0: float) -> str:
    root = Path(args.out)
    teacher_top1 = json.loads((root / "teacher" / "report.json").read_text())["metrics"]["top1"]
    aug_file = root / "teacher" / "augment.json"
    teacher_aug = json.loads(aug_file.read_text())["preset"] if aug_file.is_file() else "none"
    results = {p.stem: json.loads(p.read_text()) for p in (root / "results").glob("*.json")}
    lengths = parse_lengths(args.lengths)
    variants = args.variants.split(",")
    lines = [f"teacher (dense, from scratch, {teacher_aug} augmentation): top-1 {teacher_top1:.2f}", "",
             "| precision | stage 2 | variant | n | top-1 mean ± sd | Δ vs teacher | "
             "Δ vs full, same stage 1 (mean ± sd) | per seed |", "|---|---|---|---|---|---|---|---|"]
    for prec in args.precisions.split(","):
        for length, ep in lengths.items():
            full = {r["seed"]: r["top1"] for r in results.values()
                    if r.get("precision") == prec and r.get("length") == length and r["variant"] == "full"}
            for v in variants:
                if v == "PTQ":
                    rs = [r for r in results.values() if r.get("precision") == prec and r["variant"] == "PTQ"]
                    stage = "none"
                else:
                    rs = [r for r in results.values() if r.get("precision") == prec and r.get("length") == length
                          and r["variant"] == v]
                    stage = f"{length} ({ep:g} ep)"
                if v == "PTQ" and length != list(lengths)[0]:
                    continue
                rs.sort(key=lambda r: r["seed"])
                vals = [r["top1"] for r in rs]
                paired = v != "full" and VARIANTS[v][1] == "kd"  # same stage 1 as full, seed by seed
                diffs = [r["top1"] - full[r["seed"]] for r in rs if r["seed"] in full] if paired else []
                d_teacher = f"{statistics.fmean(vals) - teacher_top1:+.2f}" if vals else "–"
                lines.append(f"| {prec} | {stage} | {v} | {len(vals)} | {mean_sd(vals)} | {d_teacher} | "
                             f"{mean_sd(diffs) if diffs else ''} | {', '.join(f'{x:.2f}' for x in vals)} |")
    s1 = [r for r in results.values() if r["kind"] == "stage1"]
    lines.append("")
    for k in STAGE1:
        vals = [r["top1"] for r in s1 if r["s1"] == k]
        if vals:
            lines.append(f"stage 1 ({k}; 2:4, BF16 stored): {mean_sd(vals)} (n={len(vals)})  ")
    for what in ("failed", "skipped"):
        names = sorted(p.stem for p in (root / "results").glob(f"*.{what}"))
        if names:
            lines.append(f"\n{what}: {', '.join(names)}")
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines.append(f"\n{len(results)} jobs done of {len(jobs(args))}; {time.time() - t0:.0f}s on {dev}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg-20k.zip")
    ap.add_argument("--out", default="runs/cifar10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precisions", default="int4,int8", help="int4 first: the paper reports its ablation on INT4")
    ap.add_argument("--lengths", default="short=1,normal=4", help="stage-2 lengths: NAME=EPOCHS,...")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--teacher-epochs", type=float, default=100)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--teacher-batch-size", type=int, default=512)
    ap.add_argument("--teacher-compile", action="store_true", help="torch.compile the teacher's training")
    ap.add_argument("--teacher-augment", choices=sorted(TEACHER_AUGMENT), default="none",
                    help="the teacher's augmentation: none (pad-crop + flip), mix (Mixup 0.8, CutMix 1.0, "
                         "erasing 0.25), ra (RandAugment m9, erasing 0.25) or deit (RandAugment m9, "
                         "Mixup 0.8, CutMix 1.0, random erasing 0.25; label smoothing 0.1 as always)")
    ap.add_argument("--teacher-set", action="append", default=[], metavar="augment.FIELD=VALUE",
                    help="one augmentation field of the teacher over --teacher-augment (repeatable)")
    ap.add_argument("--teacher-label-smoothing", type=float, default=0.1)
    ap.add_argument("--stage1-epochs", type=float, default=4)
    ap.add_argument("--stage1-lr", type=float, default=2e-4)
    ap.add_argument("--stage2-lr", type=float, default=None, help="default: the recipe's (int8 5e-5, int4 1e-4)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=6, help="loader workers of the teacher's training")
    ap.add_argument("--procs", type=int, default=12, help="worker processes sharing the GPU")
    ap.add_argument("--deadline", type=float, default=0, help="unix time: claim no job that would end later")
    ap.add_argument("--teacher-only", action="store_true", help="stop after training the teacher")
    ap.add_argument("--model-arg", default="", help="extra timm kwargs for a smaller/larger teacher (a=1,b=2)")
    ap.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_id is not None:
        worker(args, args.worker_id)
        return
    from gpusq.pipeline import DataOptions, train_dense

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (out / "teacher" / "model.safetensors").is_file():
        kw = dict(KWARGS)
        if args.model_arg:
            from gpusq.cli.args import parse_model_kwargs

            kw.update(parse_model_kwargs([args.model_arg]))
        import dataclasses

        aug = teacher_augment(args)
        rep = train_dense(MODEL, kw, DataOptions(args.data, workers=args.workers, seed=0), out / "teacher",
                          epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.teacher_batch_size,
                          warmup_epochs=5, label_smoothing=args.teacher_label_smoothing, progress=False,
                          compile=args.teacher_compile, augment=aug)
        (out / "teacher" / "augment.json").write_text(json.dumps(
            {"preset": args.teacher_augment, "label_smoothing": args.teacher_label_smoothing,
             **dataclasses.asdict(aug)}, indent=1) + "\n")
        last = rep["history"][-1] if rep["history"] else {}
        print(f"teacher ({args.teacher_augment} augmentation): top-1 {rep['metrics']['top1']:.2f}, train top-1 "
              f"{last.get('train_top1', float('nan')):.2f} (on augmented images) in {rep['train_seconds']:.0f}s "
              f"({rep['train_images_per_s']:.0f} img/s)", flush=True)
    if args.teacher_only:
        return
    (out / "results").mkdir(exist_ok=True)
    (out / "claims").mkdir(exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [a for a in sys.argv[1:]]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker-id", str(i)], env=env)
             for i in range(args.procs)]
    done = -1
    while any(p.poll() is None for p in procs):
        n = len(list((out / "results").glob("*.json")))
        if n != done:
            done = n
            (out / "table.md").write_text(table(args, t0) + "\n")
        if args.deadline and time.time() > args.deadline + 30:  # a job overran its estimate: stop
            for p in procs:
                p.kill()
            break
        time.sleep(2.0)
    text = table(args, t0)
    (out / "table.md").write_text(text + "\n")
    all_results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    (out / "results.json").write_text(json.dumps(all_results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
