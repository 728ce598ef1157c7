"""The decoder as four graphs split at the CER points, with the top-k union run between them.

Why: the one-graph decoder keeps CER inside the graph, as standard ops (ONNX Runtime, TensorRT-RTX) or as our
plugin node (TensorRT 10/11). Where the plugin cannot be used inside an engine (TensorRT-RTX's ONNX parser
aborts on it), the decoder is built as four engines instead and the top-k union runs between them: our CUDA
kernel through its C entry point, or the same ranking rule on the host.

This module is the contract both sides share: the segment names and their inputs/outputs (the exporter
writes graphs with exactly these names) and `run_split_decoder`, the one place that wires segments and CER
together. Backends supply a `SegmentExecutor` that runs a segment and a top-k union on their own tensors
(numpy arrays for ONNX Runtime, device buffers for TensorRT); the wiring is the same for all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .topk_union_rule import topk_union_reference

PRE = "decoder_pre"
LAYERS = ("decoder1", "decoder2", "decoder3")
SEGMENTS = (PRE, *LAYERS)
PRE_INPUTS = ("dense", "text", "res4", "res3", "res2")
PRE_OUTPUTS = ("corr", "x", "aux", "skip0", "skip1", "skip2")
# Each layer gathers the kept rows of x and cg itself (Gather by `keep`), so nothing runs between engines but
# the top-k union; `skip` is per image and never gathered.
LAYER_INPUTS = ("x", "cg", "skip", "keep")
LAYER_OUTPUTS = ("x_out", "g_out", "aux_out")
LAST_OUTPUTS = ("probs",)


def segment_outputs(segment: str) -> tuple[str, ...]:
    if segment == PRE:
        return PRE_OUTPUTS
    return LAST_OUTPUTS if segment == LAYERS[-1] else LAYER_OUTPUTS


def segment_inputs(segment: str) -> tuple[str, ...]:
    return PRE_INPUTS if segment == PRE else LAYER_INPUTS


SPLIT_DIR = "decoder_split"  # the bundle subfolder of the segments' ONNX files and plans


def segment_file(segment: str) -> str:
    """Where a segment's ONNX lives inside a bundle."""
    return f"{SPLIT_DIR}/{segment}.onnx"


class SegmentExecutor(Protocol):
    """What a backend provides to run the split decoder on its own tensor type T."""

    def run(self, segment: str, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run one segment; outputs stay valid until the same segment runs again."""

    def topk_union(self, aux: Any, k: int) -> tuple[Any, np.ndarray]:
        """(keep as the backend's tensor for the next segment, the same indices as an int64 host array)."""

    def to_host(self, tensor: Any) -> np.ndarray:
        """A host copy of a segment output (only the final probabilities are fetched)."""


def run_split_decoder(
    ex: SegmentExecutor, features: Mapping[str, Any], text: Any, num_classes: int, k: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Encoder features + text -> (the last survivors' probabilities (K, h, w) float32, their sorted original
    indices, the kept indices per CER point): kept-only rows, which `backends.base.expand_rows` turns into the
    documented N x h x w block (0 for rejected classes).

    `k` >= N keeps every class (full mode). The kept lists are original class indices, as in the one-graph
    decoder's kept0..kept2 outputs.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    feeds = {name: features[name] for name in PRE_INPUTS if name != "text"}
    pre = ex.run(PRE, {**feeds, "text": text})
    x, cg, aux = pre["x"], pre["corr"], pre["aux"]
    alive = np.arange(num_classes, dtype=np.int64)
    kept: list[np.ndarray] = []
    out: Mapping[str, Any] = {}
    for i, segment in enumerate(LAYERS):
        keep_tensor, keep = ex.topk_union(aux, k)
        alive = alive[keep]
        kept.append(alive)
        out = ex.run(segment, {"x": x, "cg": cg, "skip": pre[f"skip{i}"], "keep": keep_tensor})
        if segment != LAYERS[-1]:
            x, cg, aux = out["x_out"], out["g_out"], out["aux_out"]
    return ex.to_host(out["probs"]).astype(np.float32, copy=False), alive, kept


class HostCer:
    """The CER step of an executor whose segment outputs are host numpy arrays: the numpy ranking rule, and
    nothing to copy back."""

    def topk_union(self, aux: Any, k: int) -> tuple[Any, np.ndarray]:
        keep = topk_union_reference(np.asarray(aux), k)
        return keep, keep

    def to_host(self, tensor: Any) -> np.ndarray:
        return np.asarray(tensor)


class OrtSegments(HostCer):
    """The reference `SegmentExecutor`: ONNX Runtime on the CPU and the numpy ranking rule between segments.

    It checks the split graphs against the one-graph decoder on any machine; the TensorRT backend runs the
    same wiring on the GPU. `segments`, `file` and `outputs` name another set of segments in the same bundle
    (the class-chunked decoder's, `chunked_decoder.ort_chunked_segments`).
    """

    def __init__(self, folder: Path, providers: Sequence[str] = ("CPUExecutionProvider",), *,
                 segments: Sequence[str] = SEGMENTS, file: Callable[[str], str] = segment_file,
                 outputs: Callable[[str], tuple[str, ...]] = segment_outputs, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # The segments run one after another; with arenas each would keep its own peak (the sum, not the max).
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
        self.outputs = outputs
        self.sessions = {s: ort.InferenceSession(str(folder / file(s)), opts, providers=list(providers))
                         for s in segments}

    def run(self, segment: str, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        names = self.outputs(segment)
        return dict(zip(names, self.sessions[segment].run(list(names), dict(feeds))))
