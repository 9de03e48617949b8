"""Human-readable report of a compression run: ``report.md`` with a training-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpusq.checkpoint import atomic_write, atomic_write_text


def plot_history(report: dict[str, Any], path: Path) -> bool:
    """Validation top-1 per epoch through both stages, with the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report.get("history", {})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x0 = 0
    drew = False
    for stage in ("stage1", "stage2"):
        pts = [(h["epoch"], h["val_top1"]) for h in hist.get(stage, []) if "val_top1" in h]
        if pts:
            ax.plot([x0 + e for e, _ in pts], [v for _, v in pts], marker="o", label=stage)
            x0 += pts[-1][0]
            drew = True
    ax.axhline(report["teacher_metrics"]["top1"], color="gray", ls="--", label="dense teacher")
    ax.set_xlabel("epoch (stage 1, then stage 2)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{report.get('model')} · {report.get('recipe')}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return drew


def _size_line(s: dict[str, Any]) -> str:
    """Size as stored on disk (model.safetensors) next to the accounting (``gpusq stats``)."""
    fp32 = s["size_bytes_fp32"]
    if s.get("file_bytes"):
        return (f"Size: {fp32 / 1e6:.2f} MB (FP32 parameters) → model.safetensors {s['file_bytes'] / 1e6:.2f} MB on "
                f"disk (**{fp32 / s['file_bytes']:.2f}×** smaller; accounting: {s['size_bytes_compressed'] / 1e6:.2f} "
                f"MB, {s['size_ratio']:.2f}×).")
    return (f"Size: {fp32 / 1e6:.2f} MB (FP32) → {s['size_bytes_compressed'] / 1e6:.2f} MB "
            f"(**{s['size_ratio']:.2f}×** smaller).")


def write_report_md(out: Path, report: dict[str, Any]) -> None:
    plot_history(report, out / "training.png")
    t, s = report["teacher_metrics"], report["stats"]
    rows = [("dense teacher", t)]
    for key, label in (("stage1_metrics", "after stage 1 (2:4 + KD)"),
                       ("calibrated_metrics", "after calibration (PTQ)"), ("metrics", "final")):
        if key in report:
            rows.append((label, report[key]))
    lines = [
        f"# gpusq compression report: {report.get('model')} · recipe `{report.get('recipe')}`",
        "",
        f"Data: `{report.get('data')}`",
        "",
        "| model | top-1 | top-5 |",
        "|---|---|---|",
        *[f"| {label} | {r['top1']:.2f} | {r['top5']:.2f} |" for label, r in rows],
        "",
        _size_line(s) + f" Bit-ops: **{s['bitops_ratio']:.1f}×** fewer over all matrix "
        f"products, {s['bitops_ratio_linear'] or 0:.1f}× over the compressed layers "
        f"({s['layers_compressed']} layers).",
        "",
        "![training curve](training.png)",
        "",
    ]
    if report.get("layer_weights"):
        how = {"relative": "from the stage-1 feature distortion relative to the teacher's",
               "paper": "from each layer's share of the stage-1 feature-distillation loss (the paper's)",
               "uniform": "uniform: layer weighting off"}.get(report.get("layer_importance", "relative"), "")
        mse = report.get("layer_feature_mse") or {}
        lines += [f"Layer-importance weights for stage 2 ({how}):", "",
                  "| layer | relative distortion | feature MSE | weight |", "|---|---|---|---|"]
        dist = report["layer_distortion"]
        lines += [f"| {k} | {dist[k]:.4g} | {mse[k]:.4g} | {v:.3f} |" if k in mse else
                  f"| {k} | {dist[k]:.4g} | | {v:.3f} |" for k, v in report["layer_weights"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
