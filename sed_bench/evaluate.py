"""sed-eval's engine: several backends x several k over one dataset, interleaved per image, plus the reports.

Each (backend, k) pair accumulates its own confusion matrix; the first backend at the same k is the reference
for seg agreement (share of labelled-or-not pixels where both predict the same class). Images are streamed:
nothing per image is kept once it has been scored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.evaluation import Dataset
from sed_runtime.metrics import ConfusionMatrix, SegMetrics

from .measure import cpu_model

__all__ = ["Cell", "EvalRun", "run_eval", "write_reports"]


@dataclass
class Cell:
    backend: str
    topk: int | None
    cm: ConfusionMatrix
    times_ms: list[float] = field(default_factory=list)
    kept: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    pixels: int = 0

    @property
    def k_label(self) -> str:
        return "all" if self.topk is None else str(self.topk)

    def summary(self, class_names: tuple[str, ...]) -> dict[str, Any]:
        m: SegMetrics = self.cm.metrics()
        kept = np.mean(np.stack(self.kept), axis=0).round(2).tolist() if self.kept else None
        return {
            "backend": self.backend,
            "topk": self.k_label,
            "miou": _pct(m.miou),
            "pixel_accuracy": _pct(m.pixel_accuracy),
            "mean_accuracy": _pct(m.mean_accuracy),
            "seg_agreement_vs_reference": _pct(self.agree / self.pixels) if self.pixels else None,
            "ms_per_image_median": round(float(np.median(self.times_ms)), 2) if self.times_ms else None,
            "kept_counts_mean": kept,
            "per_class_iou": {c: _pct(v) for c, v in zip(class_names, m.iou)},
            "labelled_pixels": m.pixels,
        }


def _pct(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(100.0 * float(x), 3)


@dataclass
class EvalRun:
    dataset: str
    images: int
    class_names: tuple[str, ...]
    cells: list[Cell]
    backends: dict[str, dict[str, Any]]  # label -> describe()
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "images": self.images,
            "num_classes": len(self.class_names),
            "classes": list(self.class_names),
            "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count()},
            "backends": self.backends,
            "seconds": round(self.seconds, 1),
            "cells": [c.summary(self.class_names) for c in self.cells],
        }


def run_eval(pipelines: dict[str, Any], topks: list[int | None], dataset: Dataset, num_classes: int,
             progress: bool = True) -> EvalRun:
    """pipelines: label -> SedPipeline (the first is the reference). Every image runs through every cell."""
    from tqdm import tqdm

    cells = [Cell(label, k, ConfusionMatrix(num_classes, dataset.ignore_index))
             for k in topks for label in pipelines]
    first = next(iter(pipelines))
    t0 = time.perf_counter()
    images = 0
    names: tuple[str, ...] = ()
    for sample in tqdm(dataset.samples(), total=dataset.size, desc="eval", unit="img", disable=not progress):
        ref_seg: dict[int | None, np.ndarray] = {}
        for cell in cells:
            pipe = pipelines[cell.backend]
            pipe.topk = cell.topk
            t = time.perf_counter()
            result = pipe(sample.image)
            cell.times_ms.append((time.perf_counter() - t) * 1e3)
            cell.cm.update(result.seg, sample.label)
            if result.kept is not None:
                cell.kept.append(np.array([len(k) for k in result.kept], np.float64))
            if cell.backend == first:
                ref_seg[cell.topk] = result.seg
            else:
                cell.agree += int((result.seg == ref_seg[cell.topk]).sum())
                cell.pixels += result.seg.size
            names = result.class_names
        images += 1
    return EvalRun(dataset.name, images, names, cells, {k: p.backend.describe() for k, p in pipelines.items()},
                   time.perf_counter() - t0)


def render_markdown(run: EvalRun) -> str:
    data = run.to_json()
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
    data = run.to_json()
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
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written
