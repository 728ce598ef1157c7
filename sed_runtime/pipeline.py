"""Image in, segmentation out: preprocessing -> backend -> postprocessing, whatever the backend is."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from .postprocess import class_fractions, segment
from .preprocess import load_image
from .vocab import Vocabulary


@dataclass
class Segmentation:
    """The result for one image. `seg` is at the original image size; `scores` at the decoder's."""

    image_hw: tuple[int, int]
    seg: np.ndarray  # (H, W) int32 class indices
    scores: np.ndarray  # (N, h, w) float32, 0 for rejected classes
    kept: list[np.ndarray] | None  # sorted int32 class indices after each CER point; None for topk=all
    class_names: tuple[str, ...]
    topk: int | None
    timings_ms: dict[str, float] = field(default_factory=dict)

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
        self.text = self.backend.text_embeddings(vocab, progress=progress)
        self.text_ms = (time.perf_counter() - t0) * 1e3

    def __call__(self, image: np.ndarray | str | Path) -> Segmentation:
        t_start = time.perf_counter()
        img = load_image(image) if isinstance(image, (str, Path)) else image
        spec = self.backend.input_spec
        t0 = time.perf_counter()
        pre = spec.preprocess(img)
        timings = {"preprocess": (time.perf_counter() - t0) * 1e3}
        result = self.backend.infer(pre.tensor, self.text, self.topk)
        timings.update(result.timings_ms)
        t0 = time.perf_counter()
        seg = segment(result.scores, pre.orig_hw)
        timings["postprocess"] = (time.perf_counter() - t0) * 1e3
        timings["text_embeddings_once"] = self.text_ms
        timings["total"] = (time.perf_counter() - t_start) * 1e3
        return Segmentation(
            image_hw=pre.orig_hw,
            seg=seg,
            scores=result.scores,
            kept=result.kept,
            class_names=self.vocab.classes,
            topk=self.topk,
            timings_ms=timings,
        )
