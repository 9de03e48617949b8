"""``gpusq train | compress | eval --task detection | segmentation`` (``gpusq.tasks.pipeline``)."""

from __future__ import annotations

import argparse
import sys

from gpusq import distributed as D
from gpusq import families
from gpusq.classes import check_classes
from gpusq.cli.args import (
    add_json,
    add_model_arg,
    add_out_args,
    add_recipe_args,
    add_stage_args,
    device_of,
    emit_json,
    parse_model_kwargs,
    recipe_of,
)
from gpusq.errors import GpusqError
from gpusq.outdir import check_out_dir
from gpusq.recipes import StageConfig
from gpusq.tasks.pipeline import (
    TASKS,
    check_recipe,
    check_task,
    compress_task,
    data_classes,
    evaluate_task,
    load_task_dir,
    model_classes,
    task_spec,
    train_dense_task,
)


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--task", required=True, help="detection | segmentation")
    ap.add_argument("--data", required=True, help="detection: COCO-format folder (instances.json + images/); "
                    "segmentation: images/ + labels/ folder")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; torchrun: this rank's)")
    ap.add_argument("--seed", type=int, default=0)
    add_json(ap, "the metrics")


def _models_help() -> str:
    return "; ".join(f"{task}: {' | '.join(families.names(task))}" for task in TASKS[1:])


def cli_main(argv: list[str], prog: str, command: str) -> int:
    """``gpusq train|compress|eval --task detection|segmentation ...`` (dispatched by ``gpusq.pipeline``)."""
    ap = argparse.ArgumentParser(prog=prog)
    _common(ap)
    if command == "train":
        ap.add_argument("--model", required=True, help=_models_help())
        add_model_arg(ap)
        ap.add_argument("--val-data", default=None)
        ap.add_argument("--epochs", type=float, default=10)
        ap.add_argument("--lr", type=float, default=1e-3)
        add_out_args(ap)
        a = ap.parse_args(argv)
        t = task_spec(check_task(a.task), a.model)
        check_out_dir(a.out, overwrite=a.overwrite, resume=a.resume)()
        cfg = StageConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size or 8, min_lr=a.lr * 0.01)
        rep = train_dense_task(t.name, a.model, parse_model_kwargs(a.model_arg), a.data, a.out, val_data=a.val_data,
                               cfg=cfg, seed=a.seed, device=device_of(a), resume=a.resume,
                               progress=True)
        if D.is_main() and not emit_json({"metrics": rep["metrics"]}, a.json):
            print(f"{t.summary(rep['metrics'])}; dense {t.name} model written to {a.out}")
        return 0
    if command == "compress":
        ap.add_argument("--teacher", required=True,
                        help="the dense model: a gpusq train --task TASK output dir, or a weights file "
                             "(.safetensors/.pt/.pth state dict) of --model")
        ap.add_argument("--model", default=None, help="architecture of a --teacher weights file: " + _models_help())
        add_model_arg(ap)
        ap.add_argument("--val-data", default=None)
        add_recipe_args(ap)
        add_stage_args(ap)
        add_out_args(ap)
        a = ap.parse_args(argv)
        task = check_task(a.task)
        if a.model:
            task_spec(task, a.model)
        clear = check_out_dir(a.out, overwrite=a.overwrite, resume=a.resume)
        recipe = recipe_of(a)
        check_recipe(recipe)  # before clear(): a refused recipe costs no earlier output
        recipe.loader_batch_size(a.batch_size)
        clear()
        rep = compress_task(task, a.teacher, recipe, a.data, a.out, model=a.model,
                            model_kwargs=parse_model_kwargs(a.model_arg), val_data=a.val_data,
                            batch_size=a.batch_size, seed=a.seed, device=device_of(a), resume=a.resume,
                            progress=True, ckpt_every=a.ckpt_every, stage1_from=a.stage1_from)
        t = task_spec(task, rep["model"])
        summary = {k: rep[k] for k in ("metrics", "teacher_metrics", "compressed_layers")}
        if D.is_main() and not emit_json(summary, a.json):
            print(f"teacher {t.summary(rep['teacher_metrics'])}  →  {recipe.name} {t.summary(rep['metrics'])}; "
                  f"{len(rep['compressed_layers'])} layers compressed; written to {a.out}")
        return 0
    if command == "eval":
        ap.add_argument("--checkpoint", required=True)
        a = ap.parse_args(argv)
        task = check_task(a.task)
        model, info = load_task_dir(a.checkpoint, task, device_of(a))
        t = task_spec(task, info["model"])
        ds = t.load_data(a.data)
        names = data_classes(ds)
        if names is not None:
            check_classes(info.get("classes"), model_classes(model), names, who=f"checkpoint {a.checkpoint}",
                          data=a.data)
        if "label_to_cat" in info and ds.label_to_cat != {int(k): v for k, v in info["label_to_cat"].items()}:
            raise GpusqError(f"the category ids of {a.data} differ from the checkpoint's ({a.checkpoint})")
        m = evaluate_task(t, model, ds, a.batch_size or 8)
        if D.is_main() and not emit_json(m, a.json):
            print(f"{t.summary(m)}  ({m['images']} images)", file=sys.stdout)
        return 0
    raise GpusqError(f"--task is not supported by gpusq {command}")


def split_task_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--task NAME`` / ``--task=NAME`` out of ``argv``: (NAME or None, the other arguments)."""
    rest: list[str] = []
    task = None
    it = iter(argv)
    for arg in it:
        if arg == "--task":
            task = next(it, None)
            if task is None:
                raise GpusqError(f"--task needs a value ({', '.join(TASKS)})")
        elif arg.startswith("--task="):
            task = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return task, rest
