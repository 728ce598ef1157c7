"""sed-eval's reports: the paper's layout (mIoU per k, ms/image beside it) as markdown, csv and json.

The scoring itself (every backend x k over a streamed dataset) is `sed_runtime.evaluation.run_eval`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

from sed_runtime.evaluation import EvalRun

from .measure import cpu_model
from .report import write_whole

__all__ = ["render_markdown", "run_json", "write_reports"]


def run_json(run: EvalRun) -> dict[str, Any]:
    """The JSON report: the run's cells plus the machine it ran on."""
    return {
        "dataset": run.dataset,
        "images": run.images,
        "num_classes": len(run.class_names),
        "classes": list(run.class_names),
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count()},
        "backends": run.backends,
        "seconds": round(run.seconds, 1),
        "cells": [c.summary(run.class_names) for c in run.cells],
    }


def render_markdown(run: EvalRun) -> str:
    data = run_json(run)
    out = io.StringIO()
    out.write(f"# sed-eval: {run.dataset}\n\n")
    out.write(f"{run.images} images, {len(run.class_names)} classes; machine: {data['machine']['processor']}, "
              f"{data['machine']['cpus']} CPUs ({data['machine']['platform']}); {run.seconds:.0f} s in all.\n\n")
    for label, desc in run.backends.items():
        fields = ", ".join(f"{k}: {v}" for k, v in desc.items() if v is not None and k != "backend")
        out.write(f"- **{label}**: {fields}\n")
    ref = next(iter(run.backends))
    out.write(f"\nmIoU per k, as in the paper's tables; ms/image is the median pipeline time (preprocess + model + "
              f"postprocess) on this machine; agreement is the share of pixels with the same class as {ref} at the "
              "same k; kept is the mean number of classes alive after each CER point.\n\n")
    out.write("| backend | k | mIoU | pixel acc | mean acc | agreement | ms/image | kept (CER 1/2/3) |\n")
    out.write("|---|---|---|---|---|---|---|---|\n")
    for c in data["cells"]:
        agree = "reference" if c["seg_agreement_vs_reference"] is None else f"{c['seg_agreement_vs_reference']:.2f}%"
        kept = "all" if c["kept_counts_mean"] is None else " / ".join(f"{x:g}" for x in c["kept_counts_mean"])
        out.write(f"| {c['backend']} | {c['topk']} | {_fmt(c['miou'])} | {_fmt(c['pixel_accuracy'])} | "
                  f"{_fmt(c['mean_accuracy'])} | {agree} | {c['ms_per_image_median']} | {kept} |\n")
    out.write("\n## Per-class IoU\n\n")
    cols = data["cells"]
    out.write("| class | " + " | ".join(f"{c['backend']} k={c['topk']}" for c in cols) + " |\n")
    out.write("|---|" + "---|" * len(cols) + "\n")
    for name in run.class_names:
        out.write(f"| {name} | " + " | ".join(_fmt(c["per_class_iou"][name]) for c in cols) + " |\n")
    return out.getvalue()


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def write_reports(run: EvalRun, out: Path) -> list[Path]:
    """report.md, results.json and results.csv (one row per backend x k), each written whole."""
    data = run_json(run)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["backend", "topk", "miou", "pixel_accuracy", "mean_accuracy", "seg_agreement_vs_reference",
                     "ms_per_image_median", "kept_counts_mean"])
    for c in data["cells"]:
        writer.writerow([c["backend"], c["topk"], c["miou"], c["pixel_accuracy"], c["mean_accuracy"],
                         c["seg_agreement_vs_reference"], c["ms_per_image_median"],
                         "" if c["kept_counts_mean"] is None else " ".join(map(str, c["kept_counts_mean"]))])
    files = {"report.md": render_markdown(run), "results.json": json.dumps(data, indent=2) + "\n",
             "results.csv": buf.getvalue()}
    return write_whole(out, files)
