"""`segment` is the official interpolate + argmax without N x H x W; fractions and the overlay picture."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from needs import need
from PIL import Image

from sed_runtime.overlay import MAX_LEGEND_ENTRIES, palette, render_overlay
from sed_runtime.postprocess import class_fractions, segment

MAX_MISMATCH = 1e-4  # only exact float ties may differ from torch (none expected: the arithmetic is torch's)


def _official_seg(scores: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    torch = need("torch")
    import torch.nn.functional as F

    up = F.interpolate(torch.from_numpy(scores)[None], size=hw, mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy().astype(np.int32)


def _probabilities(n: int, h: int = 192, w: int = 192, seed: int = 0, rejected: float = 0.3) -> np.ndarray:
    """Sigmoid-like scores; about `rejected` of the classes all zero, as CER leaves them (never class 0 alone)."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, h, w), dtype=np.float32)
    if n > 1:
        s[rng.random(n) < rejected] = 0
    return s


def _smooth(n: int, seed: int = 0, h: int = 192, w: int = 192, cells: int = 12) -> np.ndarray:
    """Region-like scores (what a real model gives): each block of source pixels has one clear winner."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n, (cells, cells)).repeat(h // cells, 0).repeat(w // cells, 1)
    s = rng.random((n, h, w), dtype=np.float32) * 0.2
    np.put_along_axis(s, labels[None], 0.8 + rng.random((1, h, w), dtype=np.float32) * 0.2, axis=0)
    return s


def _assert_matches(seg: np.ndarray, ref: np.ndarray) -> None:
    assert seg.dtype == np.int32 and seg.shape == ref.shape
    assert np.count_nonzero(seg != ref) <= MAX_MISMATCH * seg.size


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("hw", [(100, 150), (192, 192), (333, 517), (61, 800)])
def test_segment_equals_interpolate_argmax(n, hw):
    scores = _probabilities(n, seed=n)
    _assert_matches(segment(scores, hw), _official_seg(scores, hw))


@pytest.mark.parametrize("hw", [(150, 100), (192, 192), (400, 640)])
def test_segment_on_region_like_scores(hw):
    scores = _smooth(20, seed=hw[0])
    scores[[3, 7, 11]] = 0  # rejected classes
    _assert_matches(segment(scores, hw), _official_seg(scores, hw))


def test_pixels_where_every_class_is_zero_get_class_0():
    scores = _probabilities(6, seed=3)
    scores[:, 40:90, 20:70] = 0  # a region every class scores 0 (e.g. all rejected there)
    scores[0] = 0  # and class 0 rejected: argmax over all-zero is still index 0
    hw = (300, 400)
    seg = segment(scores, hw)
    _assert_matches(seg, _official_seg(scores, hw))
    assert np.all(seg[int(300 * 50 / 192):int(300 * 85 / 192), int(400 * 25 / 192):int(400 * 65 / 192)] == 0)
    assert np.array_equal(segment(np.zeros((4, 8, 8), np.float32), (20, 30)), np.zeros((20, 30), np.int32))


def test_negative_scores_and_zero_classes():
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((9, 40, 50)).astype(np.float32) - 1.0  # mostly negative: a zero class can win
    scores[[2, 5]] = 0
    for hw in [(40, 50), (123, 257), (77, 33)]:
        _assert_matches(segment(scores, hw), _official_seg(scores, hw))


def test_ties_on_quantised_scores():
    rng = np.random.default_rng(5)
    scores = (rng.integers(0, 4, (12, 48, 64)) / 4).astype(np.float32)  # many exact ties
    scores[[1, 4]] = 0
    for hw in [(48, 64), (211, 130), (500, 300)]:
        _assert_matches(segment(scores, hw), _official_seg(scores, hw))


def test_segment_never_builds_n_by_h_by_w():
    n, hw = 300, (2400, 3200)
    scores = np.zeros((n, 192, 192), np.float32)
    scores[::2] = _smooth(n // 2, seed=6)  # half the classes rejected (all zero), as CER leaves them
    dense_bytes = n * hw[0] * hw[1] * 4  # what interpolate-then-argmax would allocate: 9.2 GB
    tracemalloc.start()
    try:
        seg = segment(scores, hw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seg.shape == hw
    assert peak < 400 * 2**20 < dense_bytes / 20
    small = (240, 320)  # same scores, small enough to check against torch
    _assert_matches(segment(scores, small), _official_seg(scores, small))


def test_segment_rejects_bad_shapes():
    with pytest.raises(ValueError):
        segment(np.zeros((5, 5), np.float32), (10, 10))
    with pytest.raises(ValueError):
        segment(np.zeros((2, 5, 5), np.float32), (0, 10))


def test_class_fractions():
    seg = np.array([[2, 2, 2], [0, 2, 5]], np.int32)
    got = class_fractions(seg, 6)
    assert [i for i, _ in got] == [2, 0, 5]
    assert got[0][1] == pytest.approx(4 / 6) and sum(f for _, f in got) == pytest.approx(1.0)
    assert [i for i, _ in class_fractions(np.array([[3, 1]]), 4)] == [1, 3]  # ties: lower index first
    with pytest.raises(ValueError):
        class_fractions(seg, 5)


def test_palette_is_deterministic_and_distinct():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert np.array_equal(p, palette(300)) and np.array_equal(p[:20], palette(20))
    assert len({tuple(c) for c in p[:150]}) == 150


def test_render_overlay(tmp_path):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    seg = np.zeros((120, 90), np.int32)
    seg[60:] = 3
    seg[:, 70:] = 1
    names = ["sky", "grass", "person", "dog"]
    out = render_overlay(img, seg, names, alpha=0.5)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.width > 90 and out.height >= 120
    arr = np.asarray(out)
    expected = np.clip(img * 0.5 + palette(4)[seg] * 0.5 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(arr[:120, :90].astype(int) - expected).max() <= 1  # left part: the blended image, same size
    legend = arr[:, 90:]
    for c in (0, 1, 3):  # a swatch for every class present...
        assert np.all(legend == palette(4)[c], axis=-1).sum() >= 9
    assert not np.all(legend == palette(4)[2], axis=-1).any()  # ...and none for the absent one
    out.save(tmp_path / "overlay.png")

    tiny = render_overlay(img[:3, :5], seg[:3, :5], names)  # legend taller than the image: canvas grows
    assert tiny.width > 5 and tiny.height > 3


def test_render_overlay_caps_the_legend():
    img = np.full((120, 100, 3), 128, np.uint8)
    names = [f"class number {i}" for i in range(90)]
    seg90 = (np.arange(120 * 100, dtype=np.int32).reshape(120, 100) % 90)  # 90 classes present
    forty = render_overlay(img, seg90 % MAX_LEGEND_ENTRIES, names)  # title + 40 entries
    capped = render_overlay(img, seg90, names)  # title + 40 entries + "+ 50 more"
    line_h = capped.height - forty.height
    assert 0 < line_h < 40 and capped.height < (MAX_LEGEND_ENTRIES + 5) * line_h  # one more line, not 50
    assert render_overlay(img, seg90 % 3, names).height == 120  # a short legend fits beside the image
    assert render_overlay(img, seg90, ["a"]).width > 100  # indices past the names still get a label


def test_legend_names_never_become_boxes(monkeypatch):
    """The built-in font draws basic Latin only. Other names go to a fallback font that has their glyphs;
    characters no font here can draw are written as U+XXXX, visibly, instead of boxes."""
    import sed_runtime.overlay as overlay

    monkeypatch.delenv("SED_FONT", raising=False)
    monkeypatch.setattr(overlay, "FALLBACK_FONTS", ())
    bare = overlay._LegendFonts(20)
    assert bare.pick("sky  12.0%") == (bare.default, "sky  12.0%")
    assert bare.pick("猫 cat")[1] == "U+732B cat"
    assert bare.pick("café")[1] == "cafU+00E9"


def test_legend_falls_back_to_a_font_with_the_glyphs(monkeypatch):
    import os

    import sed_runtime.overlay as overlay

    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not os.path.isfile(dejavu):
        pytest.skip("DejaVuSans is not installed here (Debian/Ubuntu: fonts-dejavu-core)")
    monkeypatch.setenv("SED_FONT", dejavu)
    fonts = overlay._LegendFonts(20)
    font, text = fonts.pick("кошка, café")
    assert text == "кошка, café" and font.path == dejavu
    img = np.zeros((64, 64, 3), np.uint8)
    seg = np.zeros((64, 64), np.int64)
    seg[32:] = 1
    legend = overlay.render_overlay(img, seg, ["кошка", "猫"])
    assert legend.size[0] > 64
