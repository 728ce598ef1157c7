"""Reports of a `sed-bench` run: Markdown (laid out like the paper's Table 7), CSV and JSON of every cell, a
PNG plot of latency versus k, and a linear cost model fitted to the measured cells.

Everything here works from the JSON-able results of `runner.run_bench`, so reports can be re-rendered from a
saved `results.json` without re-running anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .paper import PAPER_DEVICE, PAPER_SOURCE, paper_column

STAGE_ORDER = ("preprocess", "encoder", "cost_volume", "cer0", "decoder1", "cer1", "decoder2", "cer2", "decoder3",
               "head", "decoder", "postprocess", "total")
DECODER_STAGES = ("cost_volume", "cer0", "decoder1", "cer1", "decoder2", "cer2", "decoder3", "head")
CER_STAGES = ("cer0", "cer1", "cer2")
FILES = {"markdown": "report.md", "csv": "cells.csv", "json": "results.json", "plot": "latency_vs_k.png"}


# --------------------------------------------------------------------------------------------------- labels


def labels(results: dict[str, Any]) -> dict[str, Any]:
    """What kind of numbers these are; SYNTHETIC whenever kept counts or text embeddings are made up."""
    s = results["settings"]
    kept = s.get("kept")
    random_weights = any(str(b.get("weights", "")).startswith("random") for b in results["backends"].values()) \
        or (not results["backends"] and s.get("checkpoint") is None)
    out: dict[str, Any] = {"synthetic_kept": kept is not None, "synthetic_text": s.get("text") == "synthetic",
                           "random_weights": random_weights, "banners": []}
    if kept is not None:
        how = ("the counts implied by the paper's A6000 latencies (t = 26.0 + 0.099 N + 0.883 S, the same S at "
               "all three CER points)" if kept == "paper" else f"{kept[0]}, {kept[1]}, {kept[2]} at CER points 0, 1, 2")
        out["banners"].append(
            f"SYNTHETIC KEPT COUNTS: CER runs, then its survivors are forced to {how}. Latency versus k reflects "
            "these counts, not what this model keeps.")
    if out["synthetic_text"]:
        out["banners"].append(
            "SYNTHETIC TEXT: random unit-norm text embeddings of the right shape; the text tower was not run, "
            "so the 'text' row is not a text-encoding time.")
    if random_weights:
        out["banners"].append(
            "RANDOM WEIGHTS: no official checkpoint; "
            + ("kept counts are forced above." if kept is not None else
               "CER keeps almost every class, so the kept counts and latency versus k are not representative."))
    if out["synthetic_kept"] or out["synthetic_text"]:
        out["mode"] = "SYNTHETIC"
    elif random_weights:
        out["mode"] = "RANDOM WEIGHTS"
    else:
        out["mode"] = "REAL (official checkpoint, measured kept counts)"
    return out


# ------------------------------------------------------------------------------------------------ cost model


def _fit(x: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
    """Least squares y = X @ coef; returns coefficients, R² and the number of points (None if degenerate)."""
    if x.shape[0] < x.shape[1] + 1 or np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = None if ss_tot == 0 else 1.0 - float((resid**2).sum()) / ss_tot
    return {"coef": [float(c) for c in coef], "r2": r2, "n": int(x.shape[0])}


def _kept(cell: dict[str, Any], i: int) -> float:
    if cell.get("kept") is None:
        return float(cell["num_classes"])
    return float(cell["kept"][f"cer{i}"]["median"])


def mean_kept(cell: dict[str, Any]) -> float:
    """Mean classes kept over the three CER points (N for topk=all): the 'kept classes' of the cost model."""
    return float(np.mean([_kept(cell, i) for i in range(3)]))


def _med(cell: dict[str, Any], stage: str) -> float | None:
    v = cell.get("ms", {}).get(stage)
    return None if v is None else float(v["median"])


def cost_model(results: dict[str, Any]) -> dict[str, Any]:
    """Per backend: total = a + b * kept, decoder = a + c_pre N + c_post kept, per-stage per-class slopes, and
    the share of decoder time spent in the CER selection itself."""
    out: dict[str, Any] = {}
    for backend in results["backends"]:
        cells = [c for c in results["cells"] if c["backend"] == backend and c.get("status") == "ok"]
        if not cells:
            continue
        m: dict[str, Any] = {}
        xs = np.array([mean_kept(c) for c in cells])
        ns = np.array([float(c["num_classes"]) for c in cells])
        tot = np.array([_med(c, "total") or 0.0 for c in cells])
        f = _fit(np.stack([np.ones_like(xs), xs], 1), tot)
        if f:
            m["total_vs_kept"] = {"a_ms": f["coef"][0], "b_ms_per_class": f["coef"][1], "r2": f["r2"], "n": f["n"]}
        dec = np.array([_med(c, "decoder") or 0.0 for c in cells])
        f = _fit(np.stack([np.ones_like(xs), ns, xs], 1), dec)
        if f:
            m["decoder_vs_n_and_kept"] = {"a_ms": f["coef"][0], "pre_ms_per_class": f["coef"][1],
                                          "post_ms_per_class": f["coef"][2], "r2": f["r2"], "n": f["n"]}
        # Per CER point: decoder layer i runs on the classes kept at point i, and their cost per class differs
        # about 16x between layers (the grid doubles each layer), so one mean kept count cannot predict a cell.
        k0, k1, k2 = (np.array([_kept(c, i) for c in cells]) for i in range(3))
        f = _fit(np.stack([np.ones_like(xs), ns, k0, k1, k2], 1), dec)
        if f:
            a, pre, c1, c2, c3 = f["coef"]
            predicted = a + pre * ns + c1 * k0 + c2 * k1 + c3 * k2
            m["decoder_per_cer_point"] = {
                "a_ms": a, "pre_ms_per_class": pre, "layer_ms_per_kept_class": [c1, c2, c3], "r2": f["r2"],
                "n": f["n"], "cells": [{"cell": f"{c['vocab']}/k={c['topk']}", "measured_ms": float(d),
                                        "predicted_ms": float(p)} for c, d, p in zip(cells, dec, predicted)]}
        # Per stage: the classes each stage runs on.
        stage_x = {"cost_volume": lambda c: float(c["num_classes"]),
                   "cer0": lambda c: float(c["num_classes"]), "decoder1": lambda c: _kept(c, 0),
                   "cer1": lambda c: _kept(c, 0), "decoder2": lambda c: _kept(c, 1),
                   "cer2": lambda c: _kept(c, 1), "decoder3": lambda c: _kept(c, 2), "head": lambda c: _kept(c, 2)}
        per_stage = {}
        for stage, fx in stage_x.items():
            pts = [(fx(c), _med(c, stage)) for c in cells if _med(c, stage) is not None]
            if stage.startswith("cer"):
                pts = [(fx(c), _med(c, stage)) for c in cells if c["topk"] != "all" and _med(c, stage) is not None]
            if len(pts) < 3:
                continue
            x = np.array([p[0] for p in pts])
            y = np.array([p[1] for p in pts], dtype=float)
            f = _fit(np.stack([np.ones_like(x), x], 1), y)
            if f:
                per_stage[stage] = {"a_ms": f["coef"][0], "ms_per_class": f["coef"][1], "r2": f["r2"], "n": f["n"]}
        if per_stage:
            m["per_stage"] = per_stage
        shares = []
        for c in cells:
            if c["topk"] == "all":
                continue
            parts = [_med(c, s) for s in DECODER_STAGES]
            cer = [_med(c, s) for s in CER_STAGES]
            if any(p is None for p in cer) or not any(parts):
                continue
            denom = float(sum(p for p in parts if p is not None))
            shares.append({"cell": f"{c['vocab']}/k={c['topk']}", "cer_ms": float(sum(cer)),  # type: ignore[arg-type]
                           "decoder_ms": denom, "share": float(sum(cer)) / denom if denom else None})  # type: ignore[arg-type]
        if shares:
            vals = [s["share"] for s in shares if s["share"] is not None]
            m["cer_share"] = {"median": float(np.median(vals)), "min": float(min(vals)), "max": float(max(vals)),
                              "cells": shares}
        out[backend] = m
    return out


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Add labels, ratios to the paper and the cost model (idempotent)."""
    results["labels"] = labels(results)
    for c in results["cells"]:
        tot = _med(c, "total")
        c["ratio_to_paper"] = None if tot is None or not c.get("paper_ms") else tot / c["paper_ms"]
    results["cost_model"] = cost_model(results)
    results["paper"] = {"source": PAPER_SOURCE, "device": PAPER_DEVICE}
    return results


# ------------------------------------------------------------------------------------------------- rendering


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    if digits == 0 and abs(v) < 10:
        return f"{v:.1f}"
    return f"{v:,.{digits}f}"


def _kept_str(c: dict[str, Any]) -> str:
    if c.get("kept") is None:
        return "all"
    return "/".join(f"{c['kept'][f'cer{i}']['median']:g}" for i in range(3))


def _vocab_header(results: dict[str, Any], label: str) -> str:
    v = next(x for x in results["settings"]["vocabs"] if x["label"] == label)
    col = paper_column(v["name"], v["num_classes"])
    return f"{col} ({label})" if col else f"{label} (N={v['num_classes']})"


def _cells(results: dict[str, Any], backend: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["vocab"], c["topk"]): c for c in results["cells"] if c["backend"] == backend}


def _topks(results: dict[str, Any]) -> list[str]:
    return list(results["settings"]["topk"])


def _backend_title(results: dict[str, Any], backend: str) -> str:
    d = results["backends"][backend]
    where = d.get("device") or ",".join(p.replace("ExecutionProvider", "") for p in d.get("providers", []))
    return f"{backend} ({where}, {d.get('precision', '?')})"


def markdown(results: dict[str, Any]) -> str:
    lab = results["labels"]
    s = results["settings"]
    m = results["machine"]
    v = results["versions"]
    vocab_labels = [x["label"] for x in s["vocabs"]]
    lines = [f"# sed-bench: {s['model'] if not s.get('bundle') else s['bundle']} — {lab['mode']}", ""]
    for b in lab["banners"]:
        lines += [f"> **{b}**", ">"]
    if lab["banners"]:
        lines[-1] = ""
    cpu = f"{m['cpu']}, {m.get('physical_cores') or '?'} physical cores / {m['logical_cpus']} logical CPUs"
    if m.get("usable_cpus") and m["usable_cpus"] != m["logical_cpus"]:
        cpu += f" ({m['usable_cpus']} usable)"
    lines += [
        "## Setup", "",
        f"* Machine: {cpu}, {m.get('memory_gib')} GiB RAM, {m['os']}"
        + (f"; GPU {m['gpu']['name']} ({m['gpu']['memory_gib']} GiB, CUDA {m['gpu']['cuda']})" if m.get("gpu") else "")
        + (f"; load average at start {m['load_average_at_start']}" if m.get("load_average_at_start") else "") + ".",
        "* Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
    ]
    for name, d in results["backends"].items():
        keys = ("device", "providers", "low_memory", "intra_op_threads", "torch_threads", "bundle", "int8")
        extra = {k: d[k] for k in keys if k in d}
        lines.append(f"* Backend {_backend_title(results, name)}: weights {d.get('weights')}; "
                     + "; ".join(f"{k} {val}" for k, val in extra.items()) + f"; load {d.get('load_s')} s.")
    kept = s.get("kept")
    lines += [
        f"* Kept counts: {'measured (what CER keeps)' if kept is None else 'SYNTHETIC, forced: ' + str(kept)}; "
        f"text embeddings: {'SYNTHETIC random unit vectors' if s['text'] == 'synthetic' else 'real (see Text)'}.",
        f"* Images: {', '.join(Path(p).name for p in s['images'])} (sizes {s['image_sizes']}), decoded before "
        f"timing; {s['warmup']} warm-up call(s) then {s['iters']} pass(es) over the images per cell; "
        "statistics over the per-image samples.",
        f"* Paper: {PAPER_SOURCE}. Ratio = ours / paper (how many times slower than the paper's A6000).",
        f"* Command: `{' '.join(results.get('command') or [])}`", "",
    ]
    # Table 7 layout, one per backend.
    lines += ["## Table 7 layout: median ms/image end to end, ours vs the paper", ""]
    for name in results["backends"]:
        cells = _cells(results, name)
        lines += [f"### {_backend_title(results, name)}", ""]
        head = ["setting"]
        for lbl in vocab_labels:
            head += [_vocab_header(results, lbl), "paper", "ratio"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in _topks(results):
            row = ["All categories" if k == "all" else f"k={k}"]
            for lbl in vocab_labels:
                c = cells.get((lbl, k), {})
                if c.get("status") != "ok":
                    row += [c.get("status", "–"), _f(c.get("paper_ms"), 1), "–"]
                    continue
                ratio = c.get("ratio_to_paper")
                row += [_f(_med(c, "total")), _f(c.get("paper_ms"), 1), "–" if ratio is None else f"{ratio:.1f}x"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    # Side by side.
    backends = list(results["backends"])
    if len(backends) > 1:
        lines += ["## Backends side by side (same run): total ms/image, median (p90)", ""]
        head = ["vocabulary", "k", "kept cer0/1/2"] + [f"{b}" for b in backends] + [
            f"{backends[0]} / {b}" for b in backends[1:]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by = {b: _cells(results, b) for b in backends}
        for lbl in vocab_labels:
            for k in _topks(results):
                cs = [by[b].get((lbl, k), {}) for b in backends]
                ok = [c.get("status") == "ok" for c in cs]
                kept_s = next((_kept_str(c) for c, o in zip(cs, ok) if o), "–")
                row = [_vocab_header(results, lbl), k, kept_s]
                row += [f"{_f(_med(c, 'total'))} ({_f(c['ms']['total']['p90'])})" if o else c.get("status", "–")
                        for c, o in zip(cs, ok)]
                for c, o in zip(cs[1:], ok[1:]):
                    row.append(f"{_med(cs[0], 'total') / _med(c, 'total'):.2f}x" if o and ok[0] else "–")  # type: ignore[operator]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    # Per stage.
    lines += ["## Per stage: median ms (total also p90)", "",
              "Stages: `cost_volume` = cost volume + conv1 + skip projections (runs on all N classes); `cer{i}` = "
              "aux head i + top-k union + gathers (+ the forcing in SYNTHETIC mode); `decoder{i}` = cost-guidance "
              "projection + decoder layer i on the survivors; `head` = final head, sigmoid, scatter into N; "
              "`decoder` = all of these, timed as one call."
              + (" ONNX Runtime runs the whole decoder as one graph: its stage rows (marked *) are the node times "
                 "of ONNX Runtime's profiler on the same timed calls, so they add up to its timed `decoder` up to "
                 "executor gaps; its graph always runs CER, with k = N for `all`." if "ort" in results["backends"]
                 else ""), ""]
    for name in results["backends"]:
        cells = [c for c in results["cells"] if c["backend"] == name and c.get("status") == "ok"]
        present = [st for st in STAGE_ORDER if any(st in c["ms"] for c in cells)]
        head = ["vocabulary", "k", "kept"] + [
            st + ("*" if any(c["stage_source"].get(st) == "ort-profile" for c in cells) else "") for st in present
        ] + ["total p90"]
        lines += [f"### {_backend_title(results, name)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in _sorted_cells(results, cells):
            row = [c["vocab"], c["topk"], _kept_str(c)] + [_f(_med(c, st)) for st in present]
            row.append(_f(c["ms"]["total"]["p90"]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    # Memory.
    lines += ["## Peak memory", "",
              "Host: peak RSS during the cell (kernel high-water mark reset before it) and its increase over the RSS "
              "at the cell's start (ONNX Runtime's arena keeps memory between cells, so later cells start higher). "
              "Device: `torch.cuda.max_memory_allocated` (torch on CUDA only). \"chunks of C\": the cell ran "
              "class-chunked, C classes per step (`--class-chunk`, or the one-pass decoder was predicted to exceed "
              "`--max-memory`).", ""]
    head = ["vocabulary", "k"] + [f"{b} peak RSS MB (+increase)" for b in backends] + [
        f"{b} device MB" for b in backends if results["backends"][b].get("device", "").startswith("cuda")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {b: _cells(results, b) for b in backends}
    for lbl in vocab_labels:
        for k in _topks(results):
            row = [lbl, k]
            for b in backends:
                c = by[b].get((lbl, k), {})
                mem = c.get("memory") or {}
                row.append(f"{_f(mem.get('rss_peak_mb'))} (+{_f(mem.get('rss_increment_mb'))})"
                           + (f" chunks of {c['chunk']}" if c.get("chunk") else "")
                           if c.get("status") == "ok" else c.get("status", "–"))
            for b in backends:
                if results["backends"][b].get("device", "").startswith("cuda"):
                    row.append(_f((by[b].get((lbl, k), {}).get("memory") or {}).get("device_peak_mb")))
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    # Text.
    lines += ["## Text embeddings (once per vocabulary, not in the per-image total)", "",
              "| backend | vocabulary | ms | source |", "|---|---|---|---|"]
    for b, per in results["text"].items():
        for lbl, t in per.items():
            lines.append(f"| {b} | {lbl} | {_f(t['ms'])} | {t['source']} |")
    lines.append("")
    lines += cost_model_markdown(results)
    skipped = [c for c in results["cells"] if c.get("status") in ("skipped", "failed")]
    if skipped:
        lines += ["## Not measured", ""]
        for c in skipped:
            lines.append(f"* {c['backend']} {c['vocab']} k={c['topk']}: {c['status']} — {c.get('reason')}")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"Note: {note}.")
    lines += [f"Files: {FILES['json']} (everything), {FILES['csv']} (one row per cell), {FILES['plot']}.", ""]
    return "\n".join(lines)


def cost_model_markdown(results: dict[str, Any]) -> list[str]:
    cm = results.get("cost_model") or {}
    if not cm:
        return []
    lines = ["## Cost model (least squares over the measured cells)", "",
             "`kept` = mean classes kept over the three CER points (N for `all`).", ""]
    for b, m in cm.items():
        lines.append(f"### {_backend_title(results, b)}")
        lines.append("")
        t = m.get("total_vs_kept")
        if t:
            lines.append(f"* total ms = {t['a_ms']:.1f} + {t['b_ms_per_class']:.2f} x kept  "
                         f"(R² = {_r2(t['r2'])}, {t['n']} cells)")
        d = m.get("decoder_vs_n_and_kept")
        if d:
            lines.append(f"* decoder ms = {d['a_ms']:.1f} + {d['pre_ms_per_class']:.3f} x N + "
                         f"{d['post_ms_per_class']:.2f} x kept  (R² = {_r2(d['r2'])}, {d['n']} cells); the paper's "
                         "A6000 back-fit is 26.0 + 0.099 N + 0.883 S for the whole image")
        pp = m.get("decoder_per_cer_point")
        if pp:
            c1, c2, c3 = pp["layer_ms_per_kept_class"]
            lines.append(f"* decoder ms = {pp['a_ms']:.1f} + {pp['pre_ms_per_class']:.3f} x N + {c1:.3f} x kept1 + "
                         f"{c2:.3f} x kept2 + {c3:.3f} x kept3  (R² = {_r2(pp['r2'])}, {pp['n']} cells; keptI = "
                         "classes alive through decoder layer I). Predicted vs measured decoder ms per cell: " +
                         ", ".join(f"{x['cell']} {x['predicted_ms']:.0f}/{x['measured_ms']:.0f}" for x in pp["cells"]))
        ps = m.get("per_stage")
        if ps:
            lines.append("* per stage, ms per class it runs on (R²): " + ", ".join(
                f"{st} {v['ms_per_class']:.3f} ({_r2(v['r2'])})" for st, v in ps.items()))
        cs = m.get("cer_share")
        if cs:
            lines.append(f"* CER selection (cer0+cer1+cer2, aux heads included) is {100 * cs['median']:.1f} % of "
                         f"decoder time (median over {len(cs['cells'])} cells with k; "
                         f"min {100 * cs['min']:.1f} %, max {100 * cs['max']:.1f} %)")
        lines.append("")
    return lines


def _r2(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _sorted_cells(results: dict[str, Any], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    vocab_pos = {x["label"]: i for i, x in enumerate(results["settings"]["vocabs"])}
    k_pos = {k: i for i, k in enumerate(_topks(results))}
    return sorted(cells, key=lambda c: (vocab_pos.get(c["vocab"], 99), k_pos.get(c["topk"], 99)))


def csv_text(results: dict[str, Any]) -> str:
    lab = results["labels"]
    stages = [st for st in STAGE_ORDER if any(st in c.get("ms", {}) for c in results["cells"])]
    fields = ["backend", "model", "precision", "vocab", "num_classes", "topk", "mode", "kept_mode", "text_mode",
              "weights", "status", "decoder", "forced_kept", "kept0", "kept1", "kept2", "samples"]
    for st in stages:
        fields += [f"{st}_median_ms", f"{st}_p90_ms", f"{st}_source"]
    fields += ["rss_peak_mb", "rss_increment_mb", "device_peak_mb", "paper_ms", "ratio_to_paper", "reason"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for c in _sorted_cells(results, results["cells"]):
        d = results["backends"].get(c["backend"], {})
        row: dict[str, Any] = {
            "backend": c["backend"], "model": d.get("model", results["settings"]["model"]),
            "precision": d.get("precision"), "vocab": c["vocab"], "num_classes": c["num_classes"], "topk": c["topk"],
            "mode": lab["mode"], "kept_mode": "SYNTHETIC" if lab["synthetic_kept"] else "measured",
            "text_mode": "SYNTHETIC" if lab["synthetic_text"] else "real", "weights": d.get("weights"),
            "status": c.get("status"), "reason": c.get("reason") or "", "decoder": c.get("decoder", ""),
            "forced_kept": "" if not c.get("forced_kept") else "/".join(map(str, c["forced_kept"])),
            "samples": c.get("samples", ""), "paper_ms": c.get("paper_ms") or "",
            "ratio_to_paper": "" if c.get("ratio_to_paper") is None else f"{c['ratio_to_paper']:.3f}",
        }
        for i in range(3):
            row[f"kept{i}"] = "" if not c.get("kept") else c["kept"][f"cer{i}"]["median"]
        for st in stages:
            v = c.get("ms", {}).get(st)
            row[f"{st}_median_ms"] = "" if v is None else f"{v['median']:.3f}"
            row[f"{st}_p90_ms"] = "" if v is None else f"{v['p90']:.3f}"
            row[f"{st}_source"] = "" if v is None else c["stage_source"].get(st, "")
        mem = c.get("memory") or {}
        for key in ("rss_peak_mb", "rss_increment_mb", "device_peak_mb"):
            row[key] = "" if mem.get(key) is None else f"{mem[key]:.1f}"
        w.writerow(row)
    return buf.getvalue()


def plot(results: dict[str, Any], path: Path) -> bool:
    """latency_vs_k.png: one panel per backend, one line per vocabulary, the paper dashed; False without
    matplotlib (the optional `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    backends = list(results["backends"])
    ks = _topks(results)
    xs = list(range(len(ks)))
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.4), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, b in zip(axes[0], backends):
        cells = _cells(results, b)
        for j, v in enumerate(results["settings"]["vocabs"]):
            color = colors[j % len(colors)]
            ours = [_med(cells[(v["label"], k)], "total") if cells.get((v["label"], k), {}).get("status") == "ok"
                    else None for k in ks]
            pts = [(x, y) for x, y in zip(xs, ours) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "-o", color=color, label=_vocab_header(results, v["label"]), ms=4)
            paper = [cells.get((v["label"], k), {}).get("paper_ms") for k in ks]
            pts = [(x, y) for x, y in zip(xs, paper) if y]
            if pts:
                ax.plot(*zip(*pts), "--", color=color, alpha=0.7, lw=1.2)
        ax.set_xticks(xs, ["all" if k == "all" else f"k={k}" for k in ks])
        ax.set_yscale("log")
        ax.set_title(_backend_title(results, b), fontsize=10)
        ax.set_xlabel("top-k at each CER point")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms / image (median, log scale)")
    handles, names = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="gray", ls="--"))
    names.append(f"paper ({PAPER_DEVICE})")
    axes[0][0].legend(handles, names, fontsize=7, loc="best")
    lab = results["labels"]
    m = results["machine"]
    title = f"sed-bench {results['settings']['model']} — {lab['mode']} — {m['cpu']}"
    if lab["synthetic_kept"] or lab["synthetic_text"]:
        title += "\n" + ", ".join(x for x, on in (("SYNTHETIC kept counts", lab["synthetic_kept"]),
                                                  ("SYNTHETIC text", lab["synthetic_text"])) if on)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_whole(out: Path, files: dict[str, str]) -> list[Path]:
    """Write each name -> text into `out` (created) through a temporary name, so no report file is ever half
    written; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


def write_script_report(out: Path, results: dict[str, Any], lines: list[str]) -> None:
    """What each benchmarks/*.py script leaves: results.json and report.md (written whole), the report printed."""
    write_whole(out, {"results.json": json.dumps(results, indent=2) + "\n", "report.md": "\n".join(lines) + "\n"})
    print("\n".join(lines))


def write_reports(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write every report file into `out` (created); returns the files written."""
    finalize(results)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    notes = [n for n in results.get("notes", []) if "matplotlib" not in n]
    if plot(results, out / FILES["plot"]):
        written["plot"] = out / FILES["plot"]
    else:
        notes.append("no plot: matplotlib is missing (pip install 'sed-deploy[bench]')")
    results["notes"] = notes
    (out / FILES["json"]).write_text(json.dumps(results, indent=2) + "\n")
    written["json"] = out / FILES["json"]
    (out / FILES["csv"]).write_text(csv_text(results))
    written["csv"] = out / FILES["csv"]
    (out / FILES["markdown"]).write_text(markdown(results))
    written["markdown"] = out / FILES["markdown"]
    return written


def console_summary(results: dict[str, Any]) -> list[str]:
    """Short plain-text summary for the terminal: Table 7 rows per backend and the fits."""
    lines = [f"mode: {results['labels']['mode']}"]
    for b in results["backends"]:
        cells = _cells(results, b)
        lines.append(f"{_backend_title(results, b)}: median total ms/image (paper A6000)")
        for k in _topks(results):
            parts = []
            for v in results["settings"]["vocabs"]:
                c = cells.get((v["label"], k), {})
                val = _f(_med(c, "total")) if c.get("status") == "ok" else c.get("status", "–")
                parts.append(f"{v['label']} {val}" + (f" ({c['paper_ms']:g})" if c.get("paper_ms") else ""))
            lines.append(f"  {'all' if k == 'all' else 'k=' + k:>5}: " + ", ".join(parts))
        m = (results.get("cost_model") or {}).get(b, {})
        t = m.get("total_vs_kept")
        if t:
            lines.append(f"  fit: total ms = {t['a_ms']:.1f} + {t['b_ms_per_class']:.2f} x kept (R² {_r2(t['r2'])})")
        cs = m.get("cer_share")
        if cs:
            lines.append(f"  CER selection: {100 * cs['median']:.1f} % of decoder time (median)")
    return lines


def rerender(folder: Path) -> dict[str, Path]:
    """Re-write report.md, cells.csv and the plot of a report folder from its results.json."""
    results = json.loads((folder / FILES["json"]).read_text())
    return write_reports(results, folder)


if __name__ == "__main__":  # python -m sed_bench.report benchmarks/results/NAME
    import sys

    for arg in sys.argv[1:] or ["."]:
        for path in rerender(Path(arg)).values():
            print(path)
