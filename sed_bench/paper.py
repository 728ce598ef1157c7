"""The SED paper's Table 7 (ms per image on one RTX A6000) and the kept counts it implies.

Numbers and the back-fit come from `shared/reference/PERF_ANCHORS.md` (sections 1.1 and 2.6): the paper times
eager PyTorch, single image, 768x768, SED-B. The back-fit `t = 26.0 + 0.099 N + 0.883 S` (ms) splits a cell's
latency into a class-independent part, a pre-rejection part that runs on all N classes and a post-rejection
part on S "effective survivors" (a cost-weighted average over the three CER points). `paper_kept` inverts it
to give `sed-bench --kept paper` one count per (vocabulary, k), used at all three CER points.
"""

from __future__ import annotations

PAPER_SOURCE = "SED paper (CVPR 2024) Table 7: SED-B, eager PyTorch, one NVIDIA RTX A6000, single image"
PAPER_DEVICE = "RTX A6000"

# Built-in vocabulary -> the paper's column label and class count.
PAPER_COLUMNS: dict[str, tuple[str, int]] = {
    "ade847": ("A-847", 847),
    "pc459": ("PC-459", 459),
    "ade150": ("A-150", 150),
    "pc59": ("PC-59", 59),
    "voc20": ("PAS-20", 20),
}

# ms/image; key None = all categories (no early rejection).
TABLE7: dict[str, dict[int | None, float]] = {
    "ade847": {1: 120.8, 2: 136.4, 4: 151.5, 8: 181.6, None: 861.0},
    "pc459": {1: 74.8, 2: 84.2, 4: 93.4, 8: 120.1, None: 468.1},
    "ade150": {1: 51.3, 2: 55.8, 4: 67.5, 8: 82.4, None: 177.7},
    "pc59": {1: 40.5, 2: 44.2, 4: 49.7, 8: 59.8, None: 84.7},
    "voc20": {1: 37.2, 2: 38.9, 4: 42.2, 8: 47.3, None: 44.9},
}

# t = FIXED_MS + PRE_MS_PER_CLASS * N + POST_MS_PER_CLASS * S (PERF_ANCHORS.md section 2.6).
FIXED_MS = 26.0
PRE_MS_PER_CLASS = 0.099
POST_MS_PER_CLASS = 0.883


def paper_column(vocab_name: str, num_classes: int) -> str | None:
    """The paper's label for a vocabulary, if it is one of the five benchmark class lists."""
    col = PAPER_COLUMNS.get(vocab_name)
    return col[0] if col is not None and col[1] == num_classes else None


def paper_ms(vocab_name: str, num_classes: int, topk: int | None) -> float | None:
    """The paper's A6000 ms/image for this cell, None where the paper has no number."""
    if paper_column(vocab_name, num_classes) is None:
        return None
    return TABLE7[vocab_name].get(topk)


def paper_kept(vocab_name: str, num_classes: int, topk: int) -> int | None:
    """Survivors implied by the paper's latency for (vocabulary, k), clipped to [1, N]; None if no number."""
    t = paper_ms(vocab_name, num_classes, topk)
    if t is None:
        return None
    s = (t - FIXED_MS - PRE_MS_PER_CLASS * num_classes) / POST_MS_PER_CLASS
    return int(min(num_classes, max(1, round(s))))
