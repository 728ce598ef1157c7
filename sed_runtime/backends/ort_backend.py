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
from ..errors import BundleError, SedUserError
from ..memory import DecoderMemory
from ..vocab import Vocabulary
from .base import Backend, BackendResult, InputSpec


def _providers(choice: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "auto":
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        return [p for p in preferred if p in available] + ["CPUExecutionProvider"]
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(choice)
    if wanted is None or wanted not in available:
        raise SedUserError(
            f"ONNX Runtime provider {choice!r} is not available here (have: {', '.join(available)}); "
            "use --providers cpu or install onnxruntime-gpu"
        )
    return [wanted, "CPUExecutionProvider"]


def _session(path: Path, providers: list[str], threads: int | None, arena: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # Without the CPU arena, freed intermediates go back to the system: about half the decoder's peak RSS for
    # large N with every class kept, for some speed (see README, --low-memory).
    opts.enable_cpu_mem_arena = arena
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for broken graphs
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path} cannot be loaded by ONNX Runtime ({first}); rebuild the bundle") from None


class BundleText:
    """A bundle's text path, shared by the ONNX Runtime and TensorRT backends: the bundled embeddings, then the
    cache, then tokenizer.json + text_encoder.onnx on ONNX Runtime (loaded only when a new vocabulary needs it)."""

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.bundle = bundle
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self._session: Any = None

    def embeddings(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        bundled = self.bundle.bundled_embeddings()
        if bundled is not None and bundled[0] == vocab.classes:
            return self._checked(bundled[2], vocab)
        from ..text_cache import TextEmbeddingCache, text_cache_key

        weights = self.bundle.manifest["weights"]
        key = text_cache_key(self.bundle.model_name, weights["text_tower_digest"], self.bundle.templates, vocab.classes)
        cache = TextEmbeddingCache()
        hit = cache.get(key)
        if hit is not None:
            return self._checked(hit, vocab)
        from ..text_onnx import encode_vocabulary_onnx
        from ..tokenizer import ClipTokenizer

        if self._session is None:
            self._session = _session(self.bundle.path("text_encoder"), self.providers, self.threads)
        tokenizer = ClipTokenizer.from_file(self.bundle.root / self.bundle.manifest["tokenizer"])
        emb = encode_vocabulary_onnx(self._session, tokenizer, vocab, self.bundle.templates, progress=progress)
        try:
            cache.put(key, emb, {"model": self.bundle.model_name, "vocabulary": vocab.name})
        except OSError:
            pass  # an unwritable cache only costs time next run
        return self._checked(emb, vocab)

    def _checked(self, emb: np.ndarray, vocab: Vocabulary) -> np.ndarray:
        want = (len(vocab), len(self.bundle.templates), self.bundle.embed_dim)
        if emb.ndim != 3 or emb.shape[1:] != want[1:]:
            raise SedUserError(
                f"text embeddings for {vocab.name} have shape {emb.shape}, but this {self.bundle.model_name} "
                f"bundle needs N x {want[1]} x {want[2]}; embed the vocabulary with this bundle's model"
            )
        return np.ascontiguousarray(emb, dtype=np.float32)


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
        self.providers = _providers(providers)
        self.threads = threads
        self.encoder = _session(self.bundle.path("encoder"), self.providers, threads)
        self.decoder = _session(self.bundle.path("decoder"), self.providers, threads, arena=not low_memory)
        self.low_memory = low_memory
        self.text_path = BundleText(self.bundle, self.providers, threads)
        self._ort_version = ort.__version__
        # Benchmark hook (sed-bench --kept), empty by default: extra inputs of a bench-only decoder graph variant.
        self.extra_decoder_inputs: dict[str, np.ndarray] = {}

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input_spec

    def decoder_memory(self) -> DecoderMemory | None:
        if self.providers != ["CPUExecutionProvider"]:
            return None  # a GPU provider's memory is the device's, not modelled
        return DecoderMemory.from_settings(self.bundle.manifest["model"]["sed"], len(self.bundle.templates),
                                           "ort-low-memory" if self.low_memory else "ort")

    def text_embeddings(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        return self.text_path.embeddings(vocab, progress=progress)

    def infer(self, image: np.ndarray, text: np.ndarray, topk: int | None) -> BackendResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        dense, res4, res3, res2 = self.encoder.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        timings["encoder"] = (time.perf_counter() - t0) * 1e3
        n = text.shape[0]
        k = n if topk is None else min(topk, n)
        t0 = time.perf_counter()
        scores, *kept = self.decoder.run(None, {
            "dense": dense, "text": np.ascontiguousarray(text, dtype=np.float32), "res4": res4, "res3": res3,
            "res2": res2, "k": np.array([k], dtype=np.int64), **self.extra_decoder_inputs,
        })
        timings["decoder"] = (time.perf_counter() - t0) * 1e3
        return BackendResult(
            scores=scores, kept=None if topk is None else [np.asarray(x, dtype=np.int32) for x in kept],
            timings_ms=timings,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.bundle.model_name,
            "bundle": str(self.bundle.root),
            "precision": self.bundle.manifest["precision"],
            "providers": self.providers,
            "low_memory": self.low_memory,
            **self.bundle.weights_summary,
            "onnxruntime": self._ort_version,
        }
