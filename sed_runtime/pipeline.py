"""Image in, segmentation out: preprocessing -> backend -> postprocessing, whatever the backend is."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend, ImageFeatures, expand_rows
from .postprocess import class_fractions, segment
from .preprocess import load_image
from .vocab import Vocabulary


@dataclass
class Segmentation:
    """The result for one image. `seg` is at the original image size; `scores` at the decoder's."""

    image_hw: tuple[int, int]
    seg: np.ndarray  # (H, W) int32 class indices
    scores: np.ndarray  # (N, h, w) float32, 0 for rejected classes; kept-only (K, h, w) when `rows` is set
    kept: list[np.ndarray] | None  # sorted int32 class indices after each CER point; None for topk=all
    class_names: tuple[str, ...]
    topk: int | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    rows: np.ndarray | None = None  # kept-only scores: the class of each row

    def full_scores(self) -> np.ndarray:
        """(N, h, w) scores, 0 for rejected classes (what --save-npz writes)."""
        return expand_rows(self.scores, self.rows, len(self.class_names))

    def classes_present(self) -> list[dict[str, Any]]:
        return [
            {"index": int(i), "name": self.class_names[i], "fraction": round(float(f), 6)}
            for i, f in class_fractions(self.seg, len(self.class_names))
        ]

    def summary(self) -> dict[str, Any]:
        h, w = self.image_hw
        return {
            "image_size": {"height": h, "width": w},
            "num_classes": len(self.class_names),
            "topk": "all" if self.topk is None else self.topk,
            "topk_note": (f"k >= {len(self.class_names)} classes keeps every class, the same as --topk all"
                          if self.topk is not None and self.topk >= len(self.class_names) else None),
            "kept_counts": None if self.kept is None else [int(len(k)) for k in self.kept],
            "classes_present": self.classes_present(),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


@dataclass
class EncodedImage:
    """An image after preprocessing and the image encoder: what `SedPipeline.decode` needs for any vocabulary."""

    orig_hw: tuple[int, int]
    features: ImageFeatures
    timings_ms: dict[str, float] = field(default_factory=dict)


class SedPipeline:
    """Segment images with one backend and one vocabulary; text embeddings are computed (or loaded) once."""

    def __init__(self, backend: Backend, vocab: Vocabulary, topk: int | None = 8, progress: bool = True) -> None:
        if topk is not None and topk < 1:
            raise ValueError("topk must be >= 1 or None")
        self.backend = backend
        self.topk = topk
        self.set_vocabulary(vocab, progress=progress)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        vocab: Vocabulary | str | None = None,
        topk: int | None = 8,
        *,
        providers: str = "cpu",
        progress: bool = False,
    ) -> SedPipeline:
        """ONNX Runtime pipeline for a bundle; `vocab` defaults to the one the bundle was built with."""
        from .backends.ort_backend import OrtBackend
        from .vocab import load_vocabulary

        backend = OrtBackend(path, providers=providers)
        if vocab is None:
            voc = backend.bundle.manifest["vocabulary"]
            vocab = Vocabulary(voc["name"], tuple(voc["classes"]))
        elif isinstance(vocab, str):
            vocab = load_vocabulary(vocab)
        return cls(backend, vocab, topk=topk, progress=progress)

    def set_vocabulary(self, vocab: Vocabulary, progress: bool = True) -> None:
        t0 = time.perf_counter()
        self.vocab = vocab
        self.text = self._text_for(vocab, progress)
        self.text_ms = (time.perf_counter() - t0) * 1e3

    def _text_for(self, vocab: Vocabulary, progress: bool = False) -> np.ndarray:
        """encode_text once per vocabulary for the pipeline's life (the backend's disk cache serves later runs)."""
        cache: dict[str, np.ndarray] = self.__dict__.setdefault("_texts", {})
        key = vocab.digest()
        if key not in cache:
            cache[key] = self.backend.encode_text(vocab, progress=progress)
        return cache[key]

    def encode(self, image: np.ndarray | str | Path) -> EncodedImage:
        """Preprocess and run the image encoder once; `decode` can then use any vocabulary and k."""
        t_start = time.perf_counter()
        img = load_image(image) if isinstance(image, (str, Path)) else image
        t0 = time.perf_counter()
        pre = self.backend.input_spec.preprocess(img)
        timings = {"load": (t0 - t_start) * 1e3, "preprocess": (time.perf_counter() - t0) * 1e3}
        features = self.backend.encode_image(pre.tensor)
        timings.update(features.timings_ms)
        return EncodedImage(pre.orig_hw, features, timings)

    def decode(self, encoded: EncodedImage, vocab: Vocabulary | None = None, topk: int | None | str = "pipeline"
               ) -> Segmentation:
        """Segment an encoded image with `vocab` (default: the pipeline's) at `topk` (default: the pipeline's)."""
        vocab = self.vocab if vocab is None else vocab
        k = self.topk if topk == "pipeline" else topk
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError("topk must be >= 1 or None")
        text = self.text if vocab is self.vocab else self._text_for(vocab)
        t_start = time.perf_counter()
        result = self.backend.decode(encoded.features, text, k)
        t0 = time.perf_counter()
        seg = segment(result.scores, encoded.orig_hw, result.rows)
        timings = {k_: v for k_, v in encoded.timings_ms.items() if k_ != "load"}
        timings.update(result.timings_ms)
        timings["postprocess"] = (time.perf_counter() - t0) * 1e3
        timings["text_embeddings_once"] = self.text_ms
        timings["total"] = sum(encoded.timings_ms.values()) + (time.perf_counter() - t_start) * 1e3
        return Segmentation(image_hw=encoded.orig_hw, seg=seg, scores=result.scores, kept=result.kept,
                            class_names=vocab.classes, topk=k, timings_ms=timings, rows=result.rows)

    def segment(self, image: np.ndarray | str | Path, vocabs: list[Vocabulary] | None = None,
                topks: list[int | None] | None = None) -> list[Segmentation]:
        """One image under several vocabularies and/or k, encoded once: one Segmentation per (vocab, k), vocab-major."""
        encoded = self.encode(image)
        return [self.decode(encoded, v, k) for v in (vocabs or [self.vocab]) for k in (topks or [self.topk])]

    def __call__(self, image: np.ndarray | str | Path) -> Segmentation:
        return self.decode(self.encode(image))
