"""Semantic-segmentation metrics the way mmseg/detectron2 compute them: one confusion matrix over a dataset.

Images are streamed into `ConfusionMatrix.update`; nothing but the (C, C) int64 matrix is kept, so a dataset of
any size fits. mIoU averages IoU over the classes that occur in the ground truth or the predictions (a class
predicted but absent from the labels scores 0; a class absent from both is left out), as both toolkits do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConfusionMatrix", "SegMetrics", "reduce_zero_label"]


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 (the "other" class of ADE20K-style labels) -> ignore, every other index - 1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = ignore_index
    out[label == ignore_index] = ignore_index
    return out


@dataclass(frozen=True)
class SegMetrics:
    """Dataset-level results. `iou` holds NaN for classes absent from both labels and predictions."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: np.ndarray  # (C,) float64
    accuracy: np.ndarray  # (C,) per-class recall, NaN where the class has no labelled pixel
    pixels: int


class ConfusionMatrix:
    """rows = ground truth, columns = prediction; pixels whose label is `ignore_index` are not counted."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """pred, label: same-shaped integer maps. Labels other than 0..C-1 and the ignore index raise ValueError."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        lab = label.astype(np.int64).ravel()
        prd = pred.astype(np.int64).ravel()
        valid = lab != self.ignore_index
        lab, prd = lab[valid], prd[valid]
        if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
            bad = int(lab[(lab < 0) | (lab >= self.num_classes)][0])
            raise ValueError(f"label value {bad} is outside 0..{self.num_classes - 1} and is not the ignore index")
        if prd.size and (prd.min() < 0 or prd.max() >= self.num_classes):
            raise ValueError(f"prediction outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(lab * self.num_classes + prd, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def metrics(self) -> SegMetrics:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1)
        pred = m.sum(axis=0)
        union = gt + pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = m.sum()
        present = union > 0
        return SegMetrics(
            miou=float(np.nanmean(iou)) if present.any() else float("nan"),
            pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
            mean_accuracy=float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
            iou=iou,
            accuracy=acc,
            pixels=int(total),
        )
