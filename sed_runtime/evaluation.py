"""Score a pipeline against ground truth: datasets streamed one image at a time into a confusion matrix.

A dataset is either generated (`shapes:200`: held-out scenes from a seed training never used) or a folder with
`images/` and `labels/` (label PNGs with the images' stems, ADE20K-style class indices). Folders are checked
before any work: every image needs a label of its size, and label values must be classes or the ignore index.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError, SedUserError
from .metrics import ConfusionMatrix, SegMetrics, reduce_zero_label
from .scenes import IGNORE_INDEX, generate_scene

__all__ = ["EVAL_SEED", "Dataset", "EvalResult", "evaluate", "folder_dataset", "generated_dataset"]

EVAL_SEED = 1000  # held-out scenes; `sed-export train` uses data seed 0 by default
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
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


@dataclass
class EvalResult:
    metrics: SegMetrics
    images: int
    ms_per_image: float  # median of pipeline time per image (preprocess + model + postprocess)
    kept_counts: list[float] | None  # mean classes kept at each CER point; None for k = all
    timings_ms: dict[str, float] = field(default_factory=dict)  # median per stage


def evaluate(pipeline: object, dataset: Dataset, num_classes: int, progress: bool = False) -> EvalResult:
    """Run `pipeline` (a SedPipeline) over `dataset`, accumulating one confusion matrix; nothing else is kept."""
    from tqdm import tqdm

    cm = ConfusionMatrix(num_classes, dataset.ignore_index)
    times: list[float] = []
    stages: dict[str, list[float]] = {}
    kept_sum: np.ndarray | None = None
    for sample in tqdm(dataset.samples(), total=dataset.size, desc="eval", unit="img", disable=not progress):
        t0 = time.perf_counter()
        result = pipeline(sample.image)  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1e3)
        for k, v in result.timings_ms.items():
            stages.setdefault(k, []).append(v)
        cm.update(result.seg, sample.label)
        if result.kept is not None:
            counts = np.array([len(k) for k in result.kept], np.float64)
            kept_sum = counts if kept_sum is None else kept_sum + counts
    n = max(1, len(times))
    return EvalResult(
        metrics=cm.metrics(),
        images=len(times),
        ms_per_image=float(np.median(times)) if times else float("nan"),
        kept_counts=None if kept_sum is None else [float(x) for x in kept_sum / n],
        timings_ms={k: float(np.median(v)) for k, v in stages.items()},
    )
