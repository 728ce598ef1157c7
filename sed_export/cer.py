"""Category early rejection (CER): which classes survive a decoder stage.

At each CER point the official code ranks the classes of every pixel by an aux head's logits, takes each
pixel's top-k and keeps the union over all pixels. We use `torch.topk` for the ranking (the official
`argsort(descending)[:k]` picks the same set up to ties) and return sorted integer indices instead of a
boolean mask, so the same rule exports without argsort, bincount or boolean indexing.
"""

from __future__ import annotations

import torch


def topk_union(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices of the classes that are in the top-k of at least one pixel.

    logits: (T, H, W) (or (T, P)) aux-head logits, classes first. k >= T keeps every class.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_classes = logits.shape[0]
    if k >= num_classes:
        return torch.arange(num_classes, device=logits.device)
    top = torch.topk(logits.reshape(num_classes, -1), k, dim=0).indices  # (k, P)
    hit = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    hit[top.reshape(-1)] = True
    return torch.nonzero(hit, as_tuple=False).reshape(-1)
