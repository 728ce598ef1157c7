"""The encode_text verb for bundles: the bundle's own embeddings, then the on-disk cache, then the bundled
tokenizer.json + text_encoder.onnx on ONNX Runtime. Shared by the ONNX Runtime and TensorRT backends."""

from __future__ import annotations

from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import SedUserError
from .ort_session import ort_session
from .vocab import Vocabulary

__all__ = ["BundleText"]


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
        from .text_cache import TextEmbeddingCache, text_cache_key

        weights = self.bundle.manifest["weights"]
        key = text_cache_key(self.bundle.model_name, weights["text_tower_digest"], self.bundle.templates, vocab.classes)
        cache = TextEmbeddingCache()
        hit = cache.get(key)
        if hit is not None:
            return self._checked(hit, vocab)
        from .text_onnx import encode_vocabulary_onnx
        from .tokenizer import ClipTokenizer

        if self._session is None:
            self._session = ort_session(self.bundle.path("text_encoder"), self.providers, self.threads)
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
