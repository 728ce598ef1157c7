"""Parity of a bundle with the PyTorch reference it was exported from (`sed-export check`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sed_runtime.backends import make_backend
from sed_runtime.backends.ort_backend import OrtBackend
from sed_runtime.bundle import Bundle
from sed_runtime.cli_common import parse_topk
from sed_runtime.postprocess import segment
from sed_runtime.preprocess import load_image
from sed_runtime.vocab import Vocabulary, load_vocabulary

SCORE_TOLERANCE = {"fp32": 1e-3}  # max abs difference of probabilities
SEG_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.98}  # fraction of pixels with the same class


@dataclass
class ParityReport:
    precision: str
    max_abs_diff: float
    seg_agreement: float
    kept_equal: list[bool] | None
    text_max_abs_diff: float
    near_ties: float = 0.0  # fraction of score-map pixels whose reference top-2 gap <= 2 x max abs diff

    @property
    def passed(self) -> bool:
        ok = self.seg_agreement >= SEG_AGREEMENT[self.precision]
        if self.precision in SCORE_TOLERANCE:
            ok = ok and self.max_abs_diff <= SCORE_TOLERANCE[self.precision]
            ok = ok and (self.kept_equal is None or all(self.kept_equal))
        return ok

    def lines(self) -> list[str]:
        tol = SCORE_TOLERANCE.get(self.precision)
        out = [
            f"precision            {self.precision}",
            f"text embeddings      max abs diff {self.text_max_abs_diff:.3g}",
            f"scores               max abs diff {self.max_abs_diff:.3g}" + (f" (tolerance {tol:g})" if tol else ""),
            f"seg agreement        {self.seg_agreement * 100:.3f}% (needs >= {SEG_AGREEMENT[self.precision] * 100:g}%)",
            f"near ties            {self.near_ties * 100:.3f}% of score-map pixels have a top-2 gap the score "
            "difference can flip (random weights: most disagreement lives there)",
        ]
        if self.kept_equal is not None:
            out += [f"kept set CER{i}        {'equal' if eq else 'DIFFERENT'}" for i, eq in enumerate(self.kept_equal)]
        out.append("PASSED" if self.passed else "FAILED")
        return out


def compare_bundle(
    bundle_path: Path,
    image: Path,
    *,
    vocab: str | None = None,
    classes: str | None = None,
    topk: str = "8",
    checkpoint: Path | None = None,
    allow_pickle: bool = False,
) -> ParityReport:
    """Same preprocessed image and same (reference) text embeddings into both; compare scores, seg, kept sets."""
    bundle = Bundle.open(bundle_path)
    k = parse_topk(topk)
    if vocab is None and classes is None:
        voc = bundle.manifest["vocabulary"]
        vocabulary = Vocabulary(voc["name"], tuple(voc["classes"]))
    else:
        vocabulary = load_vocabulary(vocab, classes=classes)
    ort_backend = OrtBackend(bundle)
    ref = make_backend("torch", bundle=bundle.root, checkpoint=checkpoint, allow_pickle=allow_pickle)
    img = load_image(image)
    pre = ref.input_spec.preprocess(img)
    text = ref.encode_text(vocabulary, progress=False)
    text_ort = ort_backend.encode_text(vocabulary, progress=False)
    a = ref.infer(pre.tensor, text, k)
    b = ort_backend.infer(pre.tensor, text, k)
    seg_a, seg_b = segment(a.scores, pre.orig_hw), segment(b.scores, pre.orig_hw)
    kept_equal = None
    if a.kept is not None and b.kept is not None:
        kept_equal = [np.array_equal(x, y) for x, y in zip(a.kept, b.kept)]
    return ParityReport(
        precision=str(bundle.manifest["precision"]),
        max_abs_diff=float(np.abs(a.scores - b.scores).max()),
        seg_agreement=float((seg_a == seg_b).mean()),
        kept_equal=kept_equal,
        text_max_abs_diff=float(np.abs(text - text_ort).max()),
        near_ties=near_tie_fraction(a.scores, float(np.abs(a.scores - b.scores).max())),
    )


def near_tie_fraction(scores: np.ndarray, max_abs_diff: float) -> float:
    """Pixels (of the N x h x w map) where a perturbation of `max_abs_diff` per score could change the argmax."""
    if scores.shape[0] < 2:
        return 0.0
    top2 = np.partition(scores, scores.shape[0] - 2, axis=0)[-2:]
    return float(((top2[1] - top2[0]) <= 2 * max_abs_diff).mean())
