"""``gpusq train | compress | eval`` for classification (``gpusq.pipeline``); with ``--task detection`` or
``--task segmentation`` the same commands go to ``gpusq.cli.tasks``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from gpusq import distributed as D
from gpusq.cli.args import (
    add_augment_args,
    add_json,
    add_model_arg,
    add_no_flip,
    add_out_args,
    add_recipe_args,
    add_stage_args,
    augment_of,
    device_of,
    emit_json,
    parse_model_kwargs,
    recipe_of,
)
from gpusq.errors import GpusqError
from gpusq.outdir import check_out_dir
from gpusq.pipeline import DataOptions, compress, eval_checkpoint, resolve_model, train_dense


def _data_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, help="ImageFolder dir, a .zip of one, or 'mnist5k'")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    ap.add_argument("--no-cache", action="store_true", help="never decode the dataset into memory")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def _model_args(ap: argparse.ArgumentParser, required: bool = False) -> None:
    ap.add_argument("--model", required=required, help="timm model name, e.g. deit_tiny_patch16_224, or a local "
                    "Hugging Face ViT / DeiT / Swin directory (docs/hf.md)")
    add_model_arg(ap, "timm keyword override, e.g. img_size=32 (repeatable, or comma-separated)")


def _data_opts(a) -> DataOptions:
    if a.batch_size is not None and a.batch_size <= 0:
        raise GpusqError(f"--batch-size must be > 0, got {a.batch_size}")
    return DataOptions(a.data, a.batch_size, a.workers, False if a.no_cache else None, a.skip_bad_images, a.seed)


def _task_of_checkpoint(argv: list[str]) -> str | None:
    """The task recorded in ``--checkpoint DIR``'s task.yaml (detection / segmentation outputs), if any."""
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--checkpoint" and i + 1 < len(argv) else (
            a.split("=", 1)[1] if a.startswith("--checkpoint=") else None)
        if path and (Path(path) / "task.yaml").is_file():
            return (yaml.safe_load((Path(path) / "task.yaml").read_text()) or {}).get("task")
    return None


def cli_main(argv: list[str], prog: str, command: str) -> int:
    if command == "eval" and not any(a == "--task" or a.startswith("--task=") for a in argv):
        task = _task_of_checkpoint(argv)  # a detection / segmentation output evaluates as its task
        if task and task != "classification":
            argv = ["--task", task, *argv]
    try:
        if any(a == "--task" or a.startswith("--task=") for a in argv):  # dense-prediction tasks (issue 6)
            from gpusq.cli.tasks import cli_main as task_cli_main
            from gpusq.cli.tasks import split_task_arg

            task, rest = split_task_arg(argv)
            if task != "classification":
                return task_cli_main(argv, prog, command)
            argv = rest
        return _cli_main(argv, prog, command)
    finally:
        D.shutdown()


def _clean_failed_out(out: Path, created: bool) -> None:
    """After a failure: remove an --out dir this run created if it holds nothing to resume from."""
    if not created or not D.is_main() or not out.is_dir():
        return
    resumable = any((out / "checkpoints").glob("*.safetensors*")) or (out / "stage1" / "stage1.json").is_file()
    if not resumable:
        shutil.rmtree(out, ignore_errors=True)


def _run_writing(out: str, clear, fn):
    """``clear()`` (the old output's files, under --overwrite) then ``fn()``; on failure, leave no
    half-made --out behind (checkpoints for --resume are kept)."""
    created = not Path(out).exists()
    try:
        clear()
        return fn()
    except BaseException:
        _clean_failed_out(Path(out), created)
        raise


def _cli_main(argv: list[str], prog: str, command: str) -> int:
    ap = argparse.ArgumentParser(prog=prog)
    # (read by cli_main before this parser: listed here so that --help shows it)
    ap.add_argument("--task", choices=("classification", "detection", "segmentation"), default="classification",
                    help="classification (default, the options below); detection / segmentation take their own "
                         f"options: gpusq {command} --task detection --help")
    if command == "train":
        ap.description = "Train a dense model from scratch (or fine-tune --init) and write DIR/model.safetensors."
        _model_args(ap)
        _data_args(ap)
        ap.add_argument("--init", help="initial weights: a gpusq output dir, .safetensors, timm .pth or a Hugging Face "
                        "directory")
        ap.add_argument("--epochs", type=float, default=10)
        ap.add_argument("--lr", type=float, default=1e-3)
        ap.add_argument("--warmup-epochs", type=float, default=1.0)
        ap.add_argument("--weight-decay", type=float, default=0.05)
        ap.add_argument("--label-smoothing", type=float, default=0.1)
        add_augment_args(ap)
        add_out_args(ap)
        ap.add_argument("--compile", action="store_true", help="torch.compile the model for training")
        add_json(ap, "the final metrics")
        a = ap.parse_args(argv)
        d = _data_opts(a)
        augment = augment_of(a)
        clear = check_out_dir(a.out, overwrite=a.overwrite, resume=a.resume)
        rep = _run_writing(a.out, clear, lambda: train_dense(
            a.model, parse_model_kwargs(a.model_arg), d, a.out, epochs=a.epochs, lr=a.lr,
            batch_size=a.batch_size or 128, warmup_epochs=a.warmup_epochs, weight_decay=a.weight_decay,
            label_smoothing=a.label_smoothing, init=a.init, resume=a.resume, device=device_of(a),
            compile=a.compile, augment=augment))
        if D.is_main():
            _print_metrics(rep["metrics"], a.json, f"dense model written to {a.out}")
        return 0
    if command == "compress":
        ap.description = "GPUSQ: 2:4 prune + KD fine-tune (stage 1), then sparse-aware QAT with KD (stage 2)."
        _model_args(ap)
        _data_args(ap)
        ap.add_argument("--teacher", required=True, help="the trained dense model (gpusq train output dir, "
                        ".safetensors, timm .pth, or a local Hugging Face ViT / DeiT / Swin directory)")
        add_recipe_args(ap)
        add_no_flip(ap)
        add_out_args(ap)
        add_stage_args(ap)
        ap.add_argument("--compile", action="store_true", help="torch.compile student and teacher for training")
        add_json(ap, "the final and the teacher's metrics")
        a = ap.parse_args(argv)
        d = _data_opts(a)
        clear = check_out_dir(a.out, overwrite=a.overwrite, resume=a.resume)
        recipe = recipe_of(a)
        recipe.loader_batch_size(d.batch_size)  # refused before clear(): costs no earlier output
        teacher, name, kwargs = resolve_model(a.model, parse_model_kwargs(a.model_arg), a.teacher)
        rep = _run_writing(a.out, clear, lambda: compress(
            teacher, recipe, d, a.out, model_name=name, model_kwargs=kwargs, resume=a.resume, overwrite=a.overwrite,
            device=device_of(a), ckpt_every=a.ckpt_every, stage1_from=a.stage1_from, compile=a.compile))
        if not D.is_main():
            return 0
        if not emit_json({"metrics": rep["metrics"], "teacher_metrics": rep["teacher_metrics"]}, a.json):
            t, m = rep["teacher_metrics"], rep["metrics"]
            print(f"teacher top-1 {t['top1']:.2f}  →  {recipe.name} top-1 {m['top1']:.2f} "
                  f"(top-5 {m['top5']:.2f}); size {rep['stats']['size_ratio']:.2f}x smaller, "
                  f"bit-ops {rep['stats']['bitops_ratio']:.1f}x fewer; written to {a.out}")
        return 0
    if command == "eval":
        ap.description = "Top-1/top-5 of a checkpoint (gpusq output dir or weights file) on a dataset."
        ap.add_argument("--checkpoint", required=True)
        _model_args(ap)
        _data_args(ap)
        add_json(ap, "the metrics")
        a = ap.parse_args(argv)
        m = eval_checkpoint(a.checkpoint, _data_opts(a), a.model, parse_model_kwargs(a.model_arg),
                            device_of(a))
        if D.is_main():
            _print_metrics(m, a.json)
        return 0
    raise GpusqError(f"unknown command {command}")


def _print_metrics(m: dict, json_dest: str | None, note: str = "") -> None:
    if not emit_json(m, json_dest):
        print(f"top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  ({m['images']} images)" + (f"; {note}" if note else ""),
              file=sys.stdout)
