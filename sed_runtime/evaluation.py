"""Score a pipeline against ground truth: datasets streamed one image at a time into a confusion matrix.

A dataset is either generated (`shapes:200`: held-out scenes from a seed training never used) or a folder with
`images/` and `labels/` (label PNGs with the images' stems, ADE20K-style class indices). Folders are checked
before any work: every image needs a label of its size, and label values must be classes or the ignore index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError, SedUserError
from .metrics import ConfusionMatrix, SegMetrics, reduce_zero_label
from .scenes import IGNORE_INDEX, generate_scene

__all__ = ["EVAL_SEED", "Dataset", "EvalCell", "EvalRun", "folder_dataset", "generated_dataset", "run_eval"]

EVAL_SEED = 1000  # held-out scenes; `sed-export train` uses data seed 0 by default
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # of dataset folders


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) integer class indices, ignore_index for unlabelled pixels


@dataclass(frozen=True)
class Dataset:
    """A named, sized stream of samples; `samples()` can be called again for another pass."""

    name: str
    size: int
    samples: Callable[[], Iterator[Sample]]
    ignore_index: int = IGNORE_INDEX


def generated_dataset(count: int, seed: int = EVAL_SEED) -> Dataset:
    def samples() -> Iterator[Sample]:
        for i in range(count):
            scene = generate_scene(seed, i)
            yield Sample(f"shapes-{seed}-{i:05d}", scene.image, scene.label)

    return Dataset(f"shapes:{count} (seed {seed})", count, samples)


def _read_label(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"label {path} has image mode {im.mode}; labels must be single-channel PNGs of "
                                   "class indices (8- or 16-bit)")
            return np.asarray(im).astype(np.int64)
    except SedUserError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read label {path} ({' '.join(str(e).split())}); re-save it as a PNG") from None


def folder_dataset(
    images: Path, labels: Path, num_classes: int, *, ignore_index: int = IGNORE_INDEX, reduce_zero: bool = False
) -> Dataset:
    """Pairs `images/<stem>.<ext>` with `labels/<stem>.png`; every problem is found here, before any inference."""
    from PIL import Image

    from .preprocess import load_image

    for folder, what in ((images, "image"), (labels, "label")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder {folder} not found; give a folder with images/ and labels/")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{images} holds no images; put the images in images/ and their label PNGs in labels/")
    pairs = []
    for f in files:
        lab = labels / f"{f.stem}.png"
        if not lab.is_file():
            raise DatasetError(f"image {f} has no label ({lab} is missing); add it or remove the image")
        with Image.open(f) as im:
            size = im.size
        label = _read_label(lab)
        if (label.shape[1], label.shape[0]) != size:
            raise DatasetError(f"label {lab} is {label.shape[1]}x{label.shape[0]} but its image is "
                               f"{size[0]}x{size[1]}; labels must have their image's size")
        if reduce_zero:
            label = reduce_zero_label(label, ignore_index)
        bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
        if bad.any():
            raise DatasetError(f"label {lab} holds class {int(label[bad][0])}, outside the vocabulary's "
                               f"0..{num_classes - 1} (ignore index {ignore_index}); pick the matching --vocab, "
                               "--ignore-index or --reduce-zero-label")
        pairs.append((f, lab))

    def samples() -> Iterator[Sample]:
        for f, lab in pairs:
            label = _read_label(lab)
            yield Sample(f.stem, load_image(f), reduce_zero_label(label, ignore_index) if reduce_zero else label)

    return Dataset(str(images.parent), len(pairs), samples, ignore_index)


def _pct(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(100.0 * float(x), 3)


@dataclass
class EvalCell:
    """One (backend, k) pair's running score: its confusion matrix, times, kept counts and agreement."""

    backend: str
    topk: int | None
    cm: ConfusionMatrix
    times_ms: list[float] = field(default_factory=list)
    kept: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    pixels: int = 0

    @property
    def k_label(self) -> str:
        return "all" if self.topk is None else str(self.topk)

    def summary(self, class_names: tuple[str, ...]) -> dict[str, Any]:
        """Percentages (3 decimals), median ms/image, mean kept counts per CER point."""
        m: SegMetrics = self.cm.metrics()
        kept = np.mean(np.stack(self.kept), axis=0).round(2).tolist() if self.kept else None
        return {
            "backend": self.backend,
            "topk": self.k_label,
            "miou": _pct(m.miou),
            "pixel_accuracy": _pct(m.pixel_accuracy),
            "mean_accuracy": _pct(m.mean_accuracy),
            "seg_agreement_vs_reference": _pct(self.agree / self.pixels) if self.pixels else None,
            "ms_per_image_median": round(float(np.median(self.times_ms)), 2) if self.times_ms else None,
            "kept_counts_mean": kept,
            "per_class_iou": {c: _pct(v) for c, v in zip(class_names, m.iou)},
            "labelled_pixels": m.pixels,
        }


@dataclass
class EvalRun:
    dataset: str
    images: int
    class_names: tuple[str, ...]
    cells: list[EvalCell]
    backends: dict[str, dict[str, Any]]  # label -> describe()
    seconds: float


def run_eval(pipelines: dict[str, Any], topks: list[int | None], dataset: Dataset, num_classes: int,
             progress: bool = True) -> EvalRun:
    """Score every (pipeline, k) pair on `dataset`, interleaved per image so machine noise hits all alike.

    pipelines: label -> SedPipeline; the first is the reference for seg agreement at the same k (share of all
    pixels where both predict the same class). Images are streamed: nothing per image is kept once scored.
    """
    from tqdm import tqdm

    cells = [EvalCell(label, k, ConfusionMatrix(num_classes, dataset.ignore_index))
             for k in topks for label in pipelines]
    first = next(iter(pipelines))
    t0 = time.perf_counter()
    images = 0
    names: tuple[str, ...] = ()
    for sample in tqdm(dataset.samples(), total=dataset.size, desc="eval", unit="img", disable=not progress):
        ref_seg: dict[int | None, np.ndarray] = {}
        for cell in cells:
            pipe = pipelines[cell.backend]
            pipe.topk = cell.topk
            t = time.perf_counter()
            result = pipe(sample.image)
            cell.times_ms.append((time.perf_counter() - t) * 1e3)
            cell.cm.update(result.seg, sample.label)
            if result.kept is not None:
                cell.kept.append(np.array([len(k) for k in result.kept], np.float64))
            if cell.backend == first:
                ref_seg[cell.topk] = result.seg
            else:
                cell.agree += int((result.seg == ref_seg[cell.topk]).sum())
                cell.pixels += result.seg.size
            names = result.class_names
        images += 1
    return EvalRun(dataset.name, images, names, cells, {k: p.backend.describe() for k, p in pipelines.items()},
                   time.perf_counter() - t0)
