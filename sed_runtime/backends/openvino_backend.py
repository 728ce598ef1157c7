"""OpenVINO backend: runs a bundle's own encoder and decoder ONNX files on the CPU plugin; no PyTorch.

The decoder's class axis N is dynamic in the graph. OpenVINO compiles a dynamic-shape model lazily for each new
N (measured on sed-tiny: about 9 s for the first call with a new N, 2.5 s after), so the decoder is instead
reshaped to the vocabulary's N and compiled once per N (a few recent ones are kept): the cost is paid once per
vocabulary, when the first image of it is decoded, and `describe()` reports it. k stays an input, and CER's
data-dependent shapes are OpenVINO's to handle inside one compiled model.

Precision: `fp32` pins the CPU plugin's inference precision to f32 (on CPUs with bf16 or AMX units OpenVINO
would otherwise pick bf16 on its own); `bf16` asks for bf16 where the CPU supports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..bundle_text import BundleText
from ..errors import SedUserError
from ..memory import DecoderMemory, trim_heap
from ..split_decoder import HostCer
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
KEEP_COMPILED = 3  # decoders compiled for this many class counts stay loaded


class _Held:
    text = ""


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[_Held]:
    """Hold what native code writes to file descriptor 2 (OpenVINO's ONNX reader logs through absl on a graph it
    cannot parse, before raising) so a refusal stays one line; the caller replays it when loading succeeded."""
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.text = sink.read().decode(errors="replace")


CLASS_AXIS_INPUTS = ("text", "x", "y", "cg")  # the chunked segments' inputs whose first axis is the class chunk


class OpenVinoSegments(HostCer):
    """The class-chunked decoder's `SegmentExecutor` on OpenVINO.

    By default each segment is compiled once with its class axis dynamic (sed-tiny, N = 40 and 100, chunks of
    11-17, measured side by side: faster than static programs and about 15% less memory). `static=True`
    compiles a program per chunk size instead, and `fixed_chunk_sizes` then keeps those sizes to the chunk and
    powers of two below it, so compilation stops after the first images; `compile_ms` sums the compilations.
    """

    def __init__(self, core: Any, folder: Path, config: dict[str, Any], static: bool = False) -> None:
        from ..chunked_decoder import SEGMENTS, segment_file

        self.core, self.config = core, config
        self.fixed_chunk_sizes = static
        self.models = {s: core.read_model(str(folder / segment_file(s))) for s in SEGMENTS}
        self.compiled: dict[tuple[str, int | None], Any] = {}
        self.compile_ms = 0.0
        self._last: Any = None

    def _compiled(self, segment: str, rows: int | None) -> Any:
        key = (segment, rows)
        if key not in self.compiled:
            t0 = time.perf_counter()
            model = self.models[segment]
            if rows is not None:
                model = model.clone()
                shapes = {}
                for port in model.inputs:
                    if port.get_any_name() in CLASS_AXIS_INPUTS:
                        shape = port.get_partial_shape()
                        shape[0] = rows
                        shapes[port] = shape
                model.reshape(shapes)
            self.compiled[key] = self.core.compile_model(model, "CPU", self.config)
            self.compile_ms += (time.perf_counter() - t0) * 1e3
        return self.compiled[key]

    def run(self, segment: str, feeds: Any) -> dict[str, Any]:
        from ..chunked_decoder import segment_outputs

        rows = next((len(v) for name, v in feeds.items() if name in CLASS_AXIS_INPUTS), None)
        if not self.fixed_chunk_sizes:
            rows = None  # one program per segment, with the class axis dynamic
        program = self._compiled(segment, rows)
        if self._last is not None and self._last is not program:
            # Each compiled program keeps its own intermediate buffers; the segments run one after another, so
            # the one that is done gives them back (sed-tiny, N = 40 and 100: a 10-30% lower peak).
            self._last.release_memory()
            trim_heap()  # and what it gave back leaves the process instead of fragmenting the heap
        self._last = program
        out = program({name: np.ascontiguousarray(v) for name, v in feeds.items()})
        return {name: out[name] for name in segment_outputs(segment)}


class OpenVinoBackend(Backend):
    """Encoder + decoder graphs of a bundle on OpenVINO's CPU plugin; text embeddings as the ORT backend has them."""

    name = "openvino"

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None, precision: str = "fp32") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise SedUserError("the openvino backend needs OpenVINO: pip install 'sed-deploy[openvino]'") from None
        if precision not in PRECISION_HINTS:
            raise SedUserError(f"--precision for the openvino backend must be fp32 or bf16, got {precision!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self._ov = ov
        self.core = ov.Core()
        self.precision = precision
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            with _native_stderr_held() as held:
                self.encoder = self.core.compile_model(str(self.bundle.path("encoder")), "CPU", self.config)
                decoder_model = self.core.read_model(str(self.bundle.path("decoder")))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SedUserError(f"OpenVINO cannot load this bundle's graphs ({first}); rebuild the bundle") from None
        if held.text:  # it loaded: what its native libraries printed is worth seeing
            sys.stderr.write(held.text)
        self._decoder_models = {"bundle": decoder_model}  # "bundle", or a benchmark's graph path: its read model
        self._decoder_graph = "bundle"
        self.extra_decoder_inputs: dict[str, np.ndarray] = {}  # benchmark hook (sed-bench --kept), as OrtBackend's
        self._decoders: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.compile_ms: dict[str, float] = {}
        self.text_path = BundleText(self.bundle)
        # Class-chunked decoding (the bundle's decoder_chunked/ graphs): None runs the one-graph decoder; an int
        # bounds the decoder's working set to that many classes per step (same results).
        self.class_chunk: int | None = None
        self.cer_select: Any = None  # benchmark hook (sed-bench --kept) for the chunked decoder's CER points
        self._chunked: OpenVinoSegments | None = None

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input_spec

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        try:
            return self.text_path.embeddings(vocab, progress=progress)
        except ImportError:
            raise SedUserError(
                f"embedding the new vocabulary {vocab.name} needs onnxruntime for the bundled text encoder: "
                "pip install 'sed-deploy[onnx]', or embed it once with `sed-export embed-text`"
            ) from None

    def use_decoder_graph(self, path: Path | None) -> None:
        """Benchmark hook (sed-bench --kept): decode with another ONNX decoder graph of the same interface plus
        `extra_decoder_inputs`; None goes back to the bundle's own."""
        key = "bundle" if path is None else str(path)
        if key not in self._decoder_models:
            self._decoder_models[key] = self.core.read_model(key)
        self._decoder_graph = key

    def _decoder_for(self, num_classes: int) -> tuple[Any, str]:
        """The decoder compiled for exactly `num_classes` and its compile-time key (compiled on first use, the
        oldest dropped)."""
        key = (self._decoder_graph, num_classes)
        label = str(num_classes) if key[0] == "bundle" else f"{num_classes} ({Path(key[0]).stem})"
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key], label
        t0 = time.perf_counter()
        model = self._decoder_models[key[0]].clone()
        text = model.input("text")
        shape = text.get_partial_shape()
        shape[0] = num_classes
        model.reshape({text: shape})
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.compile_ms[label] = (time.perf_counter() - t0) * 1e3
        self._decoders[key] = compiled
        while len(self._decoders) > KEEP_COMPILED:
            self._decoders.popitem(last=False)
        return compiled, label

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        t0 = time.perf_counter()
        out = self.encoder({"image": np.ascontiguousarray(image, dtype=np.float32)})
        feats = {name: np.asarray(out[name]) for name in ("dense", "res4", "res3", "res2")}
        return ImageFeatures(feats, self.name, timings_ms={"encoder": (time.perf_counter() - t0) * 1e3})

    def decoder_memory(self) -> DecoderMemory | None:
        return DecoderMemory.from_settings(self.bundle.manifest["model"]["sed"], len(self.bundle.templates),
                                           "openvino")

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        self._check_features(features)
        n = int(text.shape[0])
        k = n if topk is None else min(topk, n)
        if self.class_chunk is not None:
            return self._decode_chunked(features, text, topk, self.class_chunk)
        timings: dict[str, float] = {}
        compiled_now = (self._decoder_graph, n) not in self._decoders
        decoder, label = self._decoder_for(n)
        if compiled_now:
            timings["decoder_compile"] = self.compile_ms[label]
        t0 = time.perf_counter()
        out = decoder({**features.data, "text": np.ascontiguousarray(text, dtype=np.float32),
                       "k": np.array([k], dtype=np.int64), **self.extra_decoder_inputs})
        timings["decoder"] = (time.perf_counter() - t0) * 1e3
        kept = None if topk is None else [np.asarray(out[f"kept{i}"], dtype=np.int32) for i in range(3)]
        if any("probs" in o.get_names() for o in decoder.outputs):  # kept-only rows (graphs since `probs`)
            return BackendResult(scores=np.asarray(out["probs"], dtype=np.float32),
                                 rows=np.asarray(out["kept2"], dtype=np.int32), kept=kept, timings_ms=timings)
        return BackendResult(scores=np.asarray(out["scores"], dtype=np.float32), kept=kept, timings_ms=timings)

    def _decode_chunked(self, features: ImageFeatures, text: np.ndarray, topk: int | None, chunk: int
                        ) -> BackendResult:
        from ..chunked_decoder import decode_chunked, require_chunked_graphs

        require_chunked_graphs(self.bundle.manifest, self.bundle.root)
        if self._chunked is None:
            self._chunked = OpenVinoSegments(self.core, self.bundle.root, self.config)
        compiled_before = self._chunked.compile_ms
        result = decode_chunked(self._chunked, features.data, text, topk, chunk, self.cer_select)
        compiled_now = self._chunked.compile_ms - compiled_before  # new programs: kept apart from the run
        if compiled_now:
            result.timings_ms["decoder"] -= compiled_now
            result.timings_ms["decoder_compile"] = compiled_now
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            **self.bundle.summary,
            "precision": self.bundle.manifest["precision"],
            "inference_precision": self.precision,
            "openvino": self._ov.__version__,
            "device": "cpu",
            "decoder_compile_ms": {n: round(ms, 1) for n, ms in self.compile_ms.items()},
            "decoder": "one graph over all classes" if self.class_chunk is None else
            f"class-chunked, {self.class_chunk} classes per step",
            **({"chunked_compile_ms": round(self._chunked.compile_ms, 1), "chunked_programs":
                len(self._chunked.compiled)} if self._chunked is not None else {}),
        }
