"""ONNX Runtime backend: runs a bundle's encoder and decoder graphs; no PyTorch anywhere.

CPU by default; with onnxruntime-gpu and a visible GPU, `providers="auto"` picks the TensorRT and CUDA
execution providers first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..bundle_text import BundleText
from ..errors import SedUserError
from ..memory import DecoderMemory
from ..ort_session import ort_providers, ort_session
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec


class OrtBackend(Backend):
    """Encoder + decoder graphs of a bundle in ONNX Runtime; text embeddings from the bundle or its text encoder."""

    name = "ort"

    def __init__(
        self, bundle: Bundle | str | Path, *, providers: str = "cpu", threads: int | None = None,
        low_memory: bool = False,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SedUserError("the ort backend needs onnxruntime: pip install 'sed-deploy[onnx]'") from None
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.providers = ort_providers(providers)
        self.threads = threads
        self.encoder = ort_session(self.bundle.path("encoder"), self.providers, threads)
        self.decoder = ort_session(self.bundle.path("decoder"), self.providers, threads, arena=not low_memory)
        self.low_memory = low_memory
        self.text_path = BundleText(self.bundle, self.providers, threads)
        self._ort_version = ort.__version__
        # Benchmark hook (sed-bench --kept), empty by default: extra inputs of a bench-only decoder graph variant.
        self.extra_decoder_inputs: dict[str, np.ndarray] = {}
        # Class-chunked decoding (`sed_runtime.chunked_decoder`, the bundle's decoder_chunked/ graphs): None runs the
        # one-graph decoder; an int bounds the decoder's working set to that many classes per step (same results).
        self.class_chunk: int | None = None
        self.cer_select: Any = None  # benchmark hook (sed-bench --kept) for the chunked decoder's CER points
        self._chunked: Any = None

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input_spec

    def decoder_memory(self) -> DecoderMemory | None:
        if self.providers != ["CPUExecutionProvider"]:
            return None  # a GPU provider's memory is the device's, not modelled
        return DecoderMemory.from_settings(self.bundle.manifest["model"]["sed"], len(self.bundle.templates),
                                           "ort-low-memory" if self.low_memory else "ort")

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        return self.text_path.embeddings(vocab, progress=progress)

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        t0 = time.perf_counter()
        dense, res4, res3, res2 = self.encoder.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        timings = {"encoder": (time.perf_counter() - t0) * 1e3}
        return ImageFeatures({"dense": dense, "res4": res4, "res3": res3, "res2": res2}, self.name, timings_ms=timings)

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        self._check_features(features)
        n = text.shape[0]
        k = n if topk is None else min(topk, n)
        if self.class_chunk is not None and not self.extra_decoder_inputs:
            return self._decode_chunked(features, text, topk, self.class_chunk)
        # kept-only: the survivors' rows and indices; graphs from before the `probs` output give the N-row block
        kept_only = "probs" in {o.name for o in self.decoder.get_outputs()}
        t0 = time.perf_counter()
        first, *kept = self.decoder.run(["probs" if kept_only else "scores", "kept0", "kept1", "kept2"], {
            **features.data, "text": np.ascontiguousarray(text, dtype=np.float32),
            "k": np.array([k], dtype=np.int64), **self.extra_decoder_inputs,
        })
        return BackendResult(
            scores=first, rows=np.asarray(kept[2], dtype=np.int32) if kept_only else None,
            kept=None if topk is None else [np.asarray(x, dtype=np.int32) for x in kept],
            timings_ms={"decoder": (time.perf_counter() - t0) * 1e3},
        )

    def _decode_chunked(self, features: ImageFeatures, text: np.ndarray, topk: int | None, chunk: int
                        ) -> BackendResult:
        from ..chunked_decoder import decode_chunked, ort_chunked_segments, require_chunked_graphs

        require_chunked_graphs(self.bundle.manifest, self.bundle.root)
        if self._chunked is None:
            self._chunked = ort_chunked_segments(self.bundle.root, self.providers, self.threads)
        return decode_chunked(self._chunked, features.data, text, topk, chunk, self.cer_select)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            **self.bundle.summary,
            "precision": self.bundle.manifest["precision"],
            "providers": self.providers,
            "low_memory": self.low_memory,
            "decoder": "one graph over all classes" if self.class_chunk is None else
            f"class-chunked, {self.class_chunk} classes per step",
            "onnxruntime": self._ort_version,
        }
