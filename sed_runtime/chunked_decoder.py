"""The class-chunked decoder for graph backends: segments that run a bounded number of classes at a time.

Why: the one-graph decoder holds every decoder layer's N x C x H x W maps at once (sed-b, N = 847, every
class kept: about 20 GB in torch). Only the linear class attention mixes classes, through two sums over the
class axis per pixel and head, and CER's top-k needs every class's aux map; everything else treats classes
as a batch axis. So each decoder layer runs as a `stats` pass over class chunks (accumulating the two sums in
fp32, and keeping each chunk's ConvNeXt block output, in place of its input, so the block runs once) and an
`apply` pass that finishes the layer chunk by chunk with the global sums, the same arithmetic as the torch
reference's `SedDecoder.forward_chunked`. Arrays held for every alive class are allocated once and filled chunk
by chunk.

This module is the contract between the exporter (`sed_export.onnx_chunked` writes graphs with exactly these
names, inputs and outputs) and the backends, and `run_chunked_decoder`, the one place that wires the segments,
the CER points and the chunks together. A backend supplies the `SegmentExecutor` of `split_decoder` (run a
segment, rank CER, fetch to host) over its own sessions; arrays between segments are numpy arrays on the host.
An executor whose `fixed_chunk_sizes` is true is only given chunks of a few fixed sizes (`chunk_spans`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import BackendResult
from .errors import SedUserError
from .split_decoder import OrtSegments, SegmentExecutor

CHUNKED_DIR = "decoder_chunked"
SKIPS = "chunk_skips"  # (res4, res3, res2) -> skip0..2: each layer's per-image share of its first DoubleConv conv
PRE = "chunk_pre"  # (dense, text) -> (corr, x, aux) for T classes
STATS = ("chunk_stats1", "chunk_stats2", "chunk_stats3")  # (x, total) -> (kv, ksum, y): share of the sums, block out
APPLY = ("chunk_apply1", "chunk_apply2", "chunk_apply3")  # (y, cg, skip, kv, ksum, total) -> next x, cg, aux | probs
SEGMENTS = (SKIPS, PRE, *STATS, *APPLY)
SKIPS_INPUTS, SKIPS_OUTPUTS = ("res4", "res3", "res2"), ("skip0", "skip1", "skip2")
PRE_INPUTS, PRE_OUTPUTS = ("dense", "text"), ("corr", "x", "aux")
STATS_INPUTS, STATS_OUTPUTS = ("x", "total"), ("kv", "ksum", "y")
APPLY_INPUTS = ("y", "cg", "skip", "kv", "ksum", "total")
APPLY_OUTPUTS, LAST_OUTPUTS = ("x_out", "g_out", "aux_out"), ("probs",)


def segment_file(segment: str) -> str:
    """Where a chunked segment's ONNX lives inside a bundle."""
    return f"{CHUNKED_DIR}/{segment}.onnx"


def segment_outputs(segment: str) -> tuple[str, ...]:
    if segment == SKIPS:
        return SKIPS_OUTPUTS
    if segment == PRE:
        return PRE_OUTPUTS
    if segment in STATS:
        return STATS_OUTPUTS
    return LAST_OUTPUTS if segment == APPLY[-1] else APPLY_OUTPUTS


def chunk_spans(total: int, chunk: int, fixed_sizes: bool = False) -> list[tuple[int, int]]:
    """(start, rows) of each class chunk of `total` classes, at most `chunk` rows each.

    `fixed_sizes`: the rows are `chunk` or a power of two below it (the remainder split as in its binary form),
    so a backend that compiles one program per shape (OpenVINO reshaped to static shapes, TensorRT plans with
    static profiles) meets at most log2(chunk) + 2 shapes per segment however many classes CER keeps, instead of
    a new remainder for every image. Otherwise full chunks and one remainder.
    """
    spans, start = [], 0
    while start < total:
        rows = min(chunk, total - start)
        if fixed_sizes and rows < chunk:
            rows = 1 << (rows.bit_length() - 1)  # the largest power of two that fits
        spans.append((start, rows))
        start += rows
    return spans


def run_chunked_decoder(
    ex: SegmentExecutor, features: Mapping[str, Any], text: np.ndarray, k: int, chunk: int,
    cer_select: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Encoder features + text (N, P, E) -> (probabilities of the last survivors (K, h, w) float32, their sorted
    original class indices, the kept indices per CER point), running at most `chunk` classes per segment call.

    `k` >= N keeps every class. Equal to the one-graph decoder up to float summation order. `cer_select`
    (benchmarks only, `sed-bench --kept`): `cer_select(i, aux, keep)` returns the sorted rows to keep instead.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    num_classes = text.shape[0]
    fixed = bool(getattr(ex, "fixed_chunk_sizes", False))
    skips = ex.run(SKIPS, {name: features[name] for name in SKIPS_INPUTS})
    held = _Rows(num_classes)
    for s, n in chunk_spans(num_classes, chunk, fixed):
        held.put(s, ex.run(PRE, {"dense": features["dense"], "text": text[s : s + n]}))
    # Each layer's input rows, cost guidance and aux map for the alive classes; popped as soon as they are used.
    cur = {"x": held.take("x"), "cg": held.take("corr"), "aux": held.take("aux")}
    alive = np.arange(num_classes, dtype=np.int64)
    kept: list[np.ndarray] = []
    for i in range(3):
        aux = cur.pop("aux")
        _, keep = ex.topk_union(aux, k)
        if cer_select is not None:
            keep = cer_select(i, aux, keep)
        if len(keep) < len(alive):
            cur = {name: rows[keep] for name, rows in cur.items()}
            alive = alive[keep]
        kept.append(alive)
        t = len(alive)
        total = np.array([t], np.float32)
        kv = ksum = None
        y = cur.pop("x")  # the ConvNeXt block's output has its input's shape: it overwrites it, chunk by chunk
        spans = chunk_spans(t, chunk, fixed)
        for s, n in spans:
            part = ex.run(STATS[i], {"x": y[s : s + n], "total": total})
            kv = np.array(part["kv"]) if kv is None else kv + part["kv"]
            ksum = np.array(part["ksum"]) if ksum is None else ksum + part["ksum"]
            y[s : s + n] = part["y"]  # this chunk's input is not needed again
        cg = cur.pop("cg")
        out = _Rows(t)
        for s, n in spans:
            out.put(s, ex.run(APPLY[i], {"y": y[s : s + n], "cg": cg[s : s + n], "skip": skips[f"skip{i}"],
                                         "kv": kv, "ksum": ksum, "total": total}))
        del y, cg
        if i == 2:
            return ex.to_host(out.take("probs")).astype(np.float32, copy=False), alive, kept
        cur = {"x": out.take("x_out"), "cg": out.take("g_out"), "aux": out.take("aux_out")}
    raise AssertionError("unreachable")


class _Rows:
    """Per-name (T, ...) arrays filled chunk by chunk: allocated at the first chunk's shape, written in place (no
    list of chunks and a concatenated copy of it alive at once)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, start: int, outputs: Mapping[str, Any]) -> None:
        for name, value in outputs.items():
            value = np.asarray(value)
            if name not in self.arrays:
                self.arrays[name] = np.empty((self.rows, *value.shape[1:]), value.dtype)
            self.arrays[name][start : start + len(value)] = value

    def take(self, name: str) -> np.ndarray:
        return self.arrays.pop(name)


def ort_chunked_segments(folder: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                         threads: int | None = None) -> OrtSegments:
    """ONNX Runtime sessions of a bundle's chunked segments (no arenas) and the numpy ranking rule for CER."""
    return OrtSegments(folder, providers, segments=SEGMENTS, file=segment_file, outputs=segment_outputs,
                       threads=threads)


def require_chunked_graphs(manifest: Mapping[str, Any], root: Path) -> None:
    """Refuse in one line a bundle built before the chunked segments existed."""
    if PRE not in manifest["graphs"]:
        raise SedUserError(f"{root} has no class-chunked decoder graphs (built before they existed); "
                           "rebuild it with `sed-export build`, or give more memory (--max-memory)")


def decode_chunked(ex: SegmentExecutor, features: Mapping[str, Any], text: np.ndarray, topk: int | None, chunk: int,
                   cer_select: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None) -> BackendResult:
    """A graph backend's `decode` in class chunks: kept-only scores, kept sets when `topk` is set, and the
    decoder's wall time."""
    n = int(text.shape[0])
    k = n if topk is None else min(topk, n)
    t0 = time.perf_counter()
    probs, alive, kept = run_chunked_decoder(ex, features, np.ascontiguousarray(text, dtype=np.float32), k, chunk,
                                             cer_select=cer_select)
    return BackendResult(scores=probs, rows=alive.astype(np.int32),
                         kept=None if topk is None else [x.astype(np.int32) for x in kept],
                         timings_ms={"decoder": (time.perf_counter() - t0) * 1e3})
