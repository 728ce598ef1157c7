"""Generated scenes (determinism, label/image consistency) and the mIoU arithmetic, torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sed_runtime.metrics import ConfusionMatrix, reduce_zero_label
from sed_runtime.scenes import COLOURS, IGNORE_INDEX, SHAPES_CLASSES, STUFF, THINGS, generate_scene
from sed_runtime.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]


def test_same_seed_same_bytes_other_seed_other_scene():
    a, b = generate_scene(7, 3), generate_scene(7, 3)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    c = generate_scene(8, 3)
    assert c.image.shape != a.image.shape or c.image.tobytes() != a.image.tobytes()
    assert generate_scene(7, 4).image.tobytes() != a.image.tobytes()


def test_another_process_generates_the_same_bytes():
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib; from sed_runtime.scenes import generate_scene as g; s = g(11, 5); "
            "print(hashlib.sha256(s.image.tobytes() + s.label.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    s = generate_scene(11, 5)
    assert out == hashlib.sha256(s.image.tobytes() + s.label.tobytes()).hexdigest()


def test_shapes_vocabulary_is_builtin_and_matches_the_generator():
    vocab = load_vocabulary("shapes")
    assert vocab.classes == SHAPES_CLASSES and len(vocab) >= 24
    assert json.loads((ROOT / "sed_runtime" / "data" / "vocabularies" / "shapes.json").read_text()) == list(
        SHAPES_CLASSES)
    assert sum(", " in c for c in SHAPES_CLASSES) >= 3  # synonyms, averaged by the text encoder


@pytest.mark.parametrize("index", range(12))
def test_label_is_consistent_with_the_image(index):
    s = generate_scene(0, index)
    h, w = s.label.shape
    assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8 and s.label.dtype == np.uint8
    values = set(np.unique(s.label).tolist())
    assert values <= set(range(len(SHAPES_CLASSES))) | {IGNORE_INDEX}
    assert values & set(range(len(STUFF))) or values & set(range(len(STUFF), len(SHAPES_CLASSES)))
    # Thing pixels carry their colour (up to shading, noise and brightness jitter): the named channel wins.
    for cls in values - set(range(len(STUFF))) - {IGNORE_INDEX}:
        colour = THINGS[cls - len(STUFF)].split()[0]
        mean = s.image[s.label == cls].astype(float).mean(axis=0)
        ref = np.array(COLOURS[colour], float)
        assert np.abs(mean - ref).max() < 60, (cls, mean, ref)
    # Ignore pixels only sit next to shapes: every one of them touches a thing pixel or another ignore pixel.
    ign = s.label == IGNORE_INDEX
    if ign.any():
        thing_or_ign = (s.label >= len(STUFF))
        grown = thing_or_ign.copy()
        grown[1:] |= thing_or_ign[:-1]
        grown[:-1] |= thing_or_ign[1:]
        grown[:, 1:] |= thing_or_ign[:, :-1]
        grown[:, :-1] |= thing_or_ign[:, 1:]
        assert (grown[ign]).all()
        assert ign.mean() < 0.1


def test_scenes_cover_sizes_truncation_and_every_class():
    seen, shapes, cut = set(), set(), 0
    for i in range(60):
        s = generate_scene(0, i)
        shapes.add(s.label.shape)
        seen |= set(np.unique(s.label).tolist())
        border = np.concatenate([s.label[0], s.label[-1], s.label[:, 0], s.label[:, -1]])
        cut += bool((border >= len(STUFF)).any())
    assert len(shapes) >= 5 and any(h > w for h, w in shapes) and any(h < w for h, w in shapes)
    assert set(range(len(SHAPES_CLASSES))) <= seen
    assert cut >= 10  # shapes truncated by the image border


def test_confusion_matrix_and_miou_by_hand():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    expected = np.zeros((4, 4), np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (1, 3)]:  # (255 -> ignored)
        expected[g, p] += 1
    np.testing.assert_array_equal(cm.matrix, expected)
    m = cm.metrics()
    # IoU: class0 tp1 / (gt2 + pred2 - 1) = 1/3; class1 tp2 / (3 + 3 - 2) = 1/2; class2 1 / (2 + 1 - 1) = 1/2;
    # class3 predicted once, never labelled: 0 / 1 = 0 (counts, as in mmseg and detectron2).
    np.testing.assert_allclose(m.iou, [1 / 3, 1 / 2, 1 / 2, 0.0])
    assert m.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 0) / 4)
    assert m.pixel_accuracy == pytest.approx(4 / 7) and m.pixels == 7
    np.testing.assert_allclose(m.accuracy[:3], [1 / 2, 2 / 3, 1 / 2])
    assert np.isnan(m.accuracy[3])


def test_class_absent_everywhere_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    m = cm.metrics()
    assert np.isnan(m.iou[2]) and m.miou == 1.0


def test_reduce_zero_label_and_out_of_range_labels():
    lab = np.array([0, 1, 5, 255])
    np.testing.assert_array_equal(reduce_zero_label(lab), [255, 0, 4, 255])
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 7"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
