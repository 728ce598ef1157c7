"""Class scores at decoder resolution -> one class index per original-image pixel, without torch.

The official code (`sem_seg_postprocess`) and the evaluator take `argmax(F.interpolate(scores, (H, W),
"bilinear", align_corners=False))`. Done literally that is an N x H x W float32 array (847 classes on a 12 MP
photo: 40 GB). `segment` returns the same answer while touching only what can change it: see its docstring.
"""

from __future__ import annotations

import numpy as np

from .preprocess import lerp, linear_taps

__all__ = ["class_fractions", "segment"]

_ROW_PIXELS = 1 << 20  # output pixels per row chunk (bounds the (rows, W) temporaries)
_SLOW_ELEMS = 1 << 20  # pixel x candidate-class values per slow-path chunk
_SLACK = 1e-6  # relative margin for the candidate bound: covers float rounding of the interpolation
_NEAR_TIE = 2e-6  # relative gap under which plain float32 and torch's FMA rounding may disagree on the winner


def segment(scores: np.ndarray, out_hw: tuple[int, int], rows: np.ndarray | None = None) -> np.ndarray:
    """(N, h, w) float32 scores -> (H, W) int32 = argmax over classes of torch's bilinear upsampling to out_hw.

    `rows`: the scores are kept-only, row i holding class rows[i] (sorted). The argmax over them, mapped back,
    equals the argmax over the full N x h x w block: rejected classes are 0 there and sigmoid scores are > 0, and
    sorted rows keep the lower-index-first tie order.

    Never builds N x H x W. Three exact facts make that possible:
    (a) a class whose map is all zero (CER rejected it) interpolates to 0 everywhere, so it can only win where
        the best other class is <= 0 (with probabilities: where every class is 0, and there argmax is 0);
    (b) bilinear output is a convex combination of 4 source samples; if one class c is the argmax at all 4,
        it stays the argmax (float rounding is monotone), so those pixels just copy c;
    (c) the remaining pixels are interpolated, in chunks, over each source cell's candidate classes only: a class
        whose max over the cell's 4 samples is below what the corner winners reach everywhere in the cell cannot
        win there.
    Only exact float ties (two classes interpolating to the same float32) can differ from torch's answer.
    """
    if rows is not None:
        return np.asarray(rows, np.int32)[segment(scores, out_hw)]
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 3 or s.shape[0] < 1 or s.shape[1] < 1 or s.shape[2] < 1:
        raise ValueError(f"expected (N, h, w) scores with N, h, w >= 1, got shape {s.shape}")
    n, h, w = s.shape
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be >= 1, got {out_hw}")

    nonzero = np.any(s.reshape(n, -1) != 0, axis=1)
    active = np.flatnonzero(nonzero).astype(np.int32)
    seg = np.zeros((out_h, out_w), dtype=np.int32)
    if active.size == 0:  # every class is 0 everywhere: argmax is class 0
        return seg
    zero_first = int(np.flatnonzero(~nonzero)[0]) if active.size < n else None

    # (h, w, Na): the active classes' scores per source pixel, contiguous, for the per-cell gathers below.
    t = np.ascontiguousarray((s if active.size == n else s[active]).transpose(1, 2, 0))
    src_arg = t.argmax(axis=2)  # first max, as torch/numpy argmax
    src_max = np.take_along_axis(t, src_arg[..., None], axis=2)[..., 0]
    win_src = active[src_arg]  # (h, w) int32 class index of each source pixel's winner

    r0, r1, wr0, wr1 = linear_taps(h, out_h)
    c0, c1, wc0, wc1 = linear_taps(w, out_w)
    # i1 is a function of i0 (i0 + 1 clamped, or i0 itself for same size): map every source row/col to its pair.
    r1_of = np.arange(h)
    r1_of[r0] = r1
    c1_of = np.arange(w)
    c1_of[c0] = c1
    # (b): a source cell (r, c) is "agreed" when its 4 corners share the winner.
    a01, a10 = src_arg[:, c1_of], src_arg[r1_of, :]
    agree = (src_arg == a01) & (src_arg == a10) & (src_arg == a10[:, c1_of])

    # (a) only needs checking where the winner's interpolated value can be <= 0: never if every source
    # pixel's best active score is clearly positive (a convex combination keeps it above 0).
    zero_fix = zero_first is not None and not bool(src_max.min() > 1e-30)

    rows_per_chunk = max(1, _ROW_PIXELS // out_w)
    for ya in range(0, out_h, rows_per_chunk):
        yb = min(out_h, ya + rows_per_chunk)
        rr = r0[ya:yb]
        chunk = win_src[rr][:, c0]  # (rows, W): the agreed answer, overwritten below where cells disagree
        if zero_fix:
            top, bottom = src_max[rr], src_max[r1[ya:yb]]
            best = lerp(lerp(top[:, c0], top[:, c1], wc0, wc1), lerp(bottom[:, c0], bottom[:, c1], wc0, wc1),
                        wr0[ya:yb, None], wr1[ya:yb, None])
            _apply_zero_classes(chunk, best, zero_first)
        ys, xs = np.nonzero(~agree[rr][:, c0])
        if ys.size:
            step = max(1, _SLOW_ELEMS // active.size)
            for i in range(0, ys.size, step):
                y, x = ys[i:i + step] + ya, xs[i:i + step]
                chunk[y - ya, x] = _slow_pixels(t, src_arg, active, y, x, (r0, r1_of, wr0, wr1),
                                                (c0, c1_of, wc0, wc1), zero_first)
        seg[ya:yb] = chunk
    return seg


def _apply_zero_classes(winner: np.ndarray, best: np.ndarray, zero_first: int | None) -> None:
    """Where the best active class interpolates to <= 0, the all-zero classes (value exactly 0) tie or win."""
    if zero_first is None:
        return
    winner[best < 0] = zero_first
    tie = best == 0
    winner[tie] = np.minimum(winner[tie], zero_first)


def _slow_pixels(
    t: np.ndarray,
    src_arg: np.ndarray,
    active: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    zero_first: int | None,
) -> np.ndarray:
    """Interpolate the pixels (y, x) over their source cell's candidate classes; return their class indices.

    Candidates of a cell: classes whose max over the cell's 4 samples reaches the lowest, over the cell's pixels
    in this chunk, of the best corner-winner value there (a value the true winner's is at least). Everything
    else is strictly below the winner at every pixel of the cell, so dropping it is exact.
    """
    r0, r1_of, wr0, wr1 = rows
    c0, c1_of, wc0, wc1 = cols
    w = t.shape[1]
    cells, inv = np.unique(r0[y] * w + c0[x], return_inverse=True)
    inv = inv.reshape(-1)
    ur, uc = cells // w, cells % w
    ur1, uc1 = r1_of[ur], c1_of[uc]
    v00, v01, v10, v11 = t[ur, uc], t[ur, uc1], t[ur1, uc], t[ur1, uc1]  # (U, Na) each
    lo = np.minimum(np.minimum(v00, v01), np.minimum(v10, v11))
    hi = np.maximum(np.maximum(v00, v01), np.maximum(v10, v11))
    mag = np.maximum(np.abs(lo).max(axis=1), np.abs(hi).max(axis=1))  # scale of every value in the cell
    slack = _SLACK * mag + np.float32(1e-30)
    wx0, wx1 = wc0[x][:, None], wc1[x][:, None]
    wy0, wy1 = wr0[y][:, None], wr1[y][:, None]

    # Lower bound on each pixel's best value: the 4 corner winners interpolated there (plain float32).
    corner_wins = np.stack([src_arg[ur, uc], src_arg[ur, uc1], src_arg[ur1, uc], src_arg[ur1, uc1]], axis=1)
    cw = [np.take_along_axis(v, corner_wins, axis=1)[inv] for v in (v00, v01, v10, v11)]  # (P, 4) each
    floor_p = ((cw[0] * wx0 + cw[1] * wx1) * wy0 + (cw[2] * wx0 + cw[3] * wx1) * wy1).max(axis=1)
    floor_cell = np.full(cells.size, np.inf, dtype=np.float32)
    np.minimum.at(floor_cell, inv, floor_p)
    cand = hi >= (floor_cell - slack)[:, None]
    kmax = int(cand.sum(axis=1).max())
    if kmax < active.size:  # candidates first, in class order; the rest cannot win, so cutting them is exact
        order = np.argsort(~cand, axis=1, kind="stable")[:, :kmax]
        v00, v01, v10, v11 = (np.take_along_axis(v, order, axis=1) for v in (v00, v01, v10, v11))
    else:
        order = None
    a, b, c, d = v00[inv], v01[inv], v10[inv], v11[inv]  # (P, K) corner values of each pixel's candidates
    # Plain float32 first; only near-ties (within a few ulp, where torch's FMA rounding could decide) are
    # redone with the exact torch arithmetic (`lerp`, width first, then height).
    vals = (a * wx0 + b * wx1) * wy0 + (c * wx0 + d * wx1) * wy1
    k = vals.argmax(axis=1)
    best = vals[np.arange(k.size), k]
    tol = (_NEAR_TIE * mag[inv]).astype(np.float32)
    near = ((vals >= (best - tol)[:, None]).sum(axis=1) > 1) | (np.abs(best) <= tol)
    if near.any():
        sub = np.flatnonzero(near)
        exact = lerp(lerp(a[sub], b[sub], wx0[sub], wx1[sub]), lerp(c[sub], d[sub], wx0[sub], wx1[sub]),
                     wy0[sub], wy1[sub])
        k[sub] = exact.argmax(axis=1)
        best[sub] = exact[np.arange(sub.size), k[sub]]
    local = k if order is None else order[inv, k]
    winner = active[local]
    _apply_zero_classes(winner, best, zero_first)
    return winner


def class_fractions(seg: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
    """(class index, fraction of pixels) for every class present, largest first (ties: lower index first)."""
    flat = np.asarray(seg).ravel()
    if flat.size == 0:
        return []
    if flat.min() < 0 or flat.max() >= num_classes:
        raise ValueError(f"segmentation holds class indices outside [0, {num_classes})")
    counts = np.bincount(flat, minlength=num_classes)
    present = np.flatnonzero(counts)
    present = present[np.argsort(-counts[present], kind="stable")]
    return [(int(i), float(counts[i]) / flat.size) for i in present]
