"""`sed-export check` compares kept sets in every precision and names ties (pure numpy, no bundle needed)."""

from __future__ import annotations

import numpy as np
import pytest
from needs import need

need("onnxruntime")  # sed_export.parity imports the ONNX Runtime backend

from sed_export.parity import ParityReport, compare_kept, tie_margins  # noqa: E402


def test_tie_margins_measure_the_distance_to_the_kth_logit():
    aux = np.zeros((4, 1, 2), np.float32)
    aux[:, 0, 0] = [3.0, 2.0, 2.0, -1.0]  # pixel 0: rows 1 and 2 tie for the second place
    aux[:, 0, 1] = [0.0, 5.0, 1.0, 0.5]
    m = tie_margins(aux, np.arange(4), k=2)
    # k-th (2nd) largest: pixel 0 -> 2.0, pixel 1 -> 1.0
    np.testing.assert_allclose(m, [1.0, 0.0, 0.0, 0.5])


def _aux_with_a_tie() -> np.ndarray:
    aux = np.empty((5, 2, 2), np.float32)
    for row, value in enumerate([5.0, -2.0, -3.0, -6.0, -9.0]):
        aux[row] = value  # k = 2 keeps classes 0 and 1 everywhere ...
    aux[1, 0, 0], aux[2, 0, 0] = 1.0, 1.0 + 1e-3  # ... but 2 beats 1 at pixel (0, 0) by 1e-3: the union is 0, 1, 2
    return aux


def test_a_kept_set_difference_at_a_tie_is_reported_as_one():
    aux = _aux_with_a_tie()
    ref = [np.array([0, 1, 2])]
    other = [np.array([0, 1])]  # the fp16 bundle ranked the near-tie at pixel (0, 0) the other way
    [c] = compare_kept(ref, other, {0: aux}, 5, k=2, tolerance=0.05)
    assert c.missing == (2,) and c.extra == () and c.ties_only
    assert "ties" in c.line() and "DIFFERENT" not in c.line()
    report = ParityReport("fp16", 0.01, 0.995, [c], 0.0)
    assert report.passed
    assert not ParityReport("fp32", 1e-5, 1.0, [c], 0.0).passed  # fp32 must match exactly


def test_a_difference_far_from_any_tie_fails_fp16():
    aux = _aux_with_a_tie()
    [c] = compare_kept([np.array([0, 1, 2])], [np.array([0, 1, 2, 4])], {0: aux}, 5, k=2, tolerance=0.05)
    assert c.extra == (4,) and not c.ties_only and "DIFFERENT beyond ties" in c.line()
    assert not ParityReport("fp16", 0.01, 0.995, [c], 0.0).passed


def test_later_points_follow_the_first_difference():
    aux = _aux_with_a_tie()
    ref = [np.array([0, 1, 2]), np.array([0])]
    other = [np.array([0, 1]), np.array([1])]
    first, second = compare_kept(ref, other, {0: aux, 1: aux[[0, 1, 2]]}, 5, k=2, tolerance=0.05)
    assert first.ties_only and second.after_earlier_difference and "following the earlier" in second.line()
    assert ParityReport("fp16", 0.01, 0.995, [first, second], 0.0).passed


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_seg_agreement_still_decides(precision):
    assert not ParityReport(precision, 0.01, 0.5, None, 0.0).passed
