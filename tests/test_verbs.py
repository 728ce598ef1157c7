"""The backend verbs (issue 14, item 4): encode_text, encode_image, decode. One image's features decode again
with another vocabulary or k, without re-running the encoder, and give what a fresh run gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from needs import need

need("onnxruntime")

from sed_runtime.backends.base import Backend, ImageFeatures
from sed_runtime.errors import SedUserError
from sed_runtime.pipeline import SedPipeline
from sed_runtime.preprocess import load_image
from sed_runtime.scenes import SHAPES_CLASSES
from sed_runtime.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
IMAGE = ROOT / "examples" / "images" / "shapes.jpg"
SHAPES = Vocabulary("shapes", SHAPES_CLASSES)
FEW = Vocabulary("few", ("sky", "grass, lawn", "red circle, red disc", "blue square, blue box"))


class _Counting:
    """Wraps a backend's encode_image to count encoder runs."""

    def __init__(self, backend: Backend) -> None:
        self.calls = 0
        real = backend.encode_image

        def encode_image(image: np.ndarray) -> ImageFeatures:
            self.calls += 1
            return real(image)

        backend.encode_image = encode_image  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def pipe() -> SedPipeline:
    return SedPipeline.from_bundle(DEMO_BUNDLE, SHAPES, topk=8)


def test_infer_is_encode_image_then_decode(pipe: SedPipeline) -> None:
    backend = pipe.backend
    image = backend.input_spec.preprocess(load_image(IMAGE)).tensor
    whole = backend.infer(image, pipe.text, 2)
    parts = backend.decode(backend.encode_image(image), pipe.text, 2)
    np.testing.assert_array_equal(whole.scores, parts.scores)
    assert [k.tolist() for k in whole.kept] == [k.tolist() for k in parts.kept]  # type: ignore[union-attr]
    assert {"encoder", "decoder"} <= set(whole.timings_ms)


def test_one_encode_decodes_every_vocabulary_and_k_like_fresh_runs(pipe: SedPipeline) -> None:
    counter = _Counting(pipe.backend)
    results = pipe.segment(IMAGE, vocabs=[SHAPES, FEW], topks=[1, None])
    assert counter.calls == 1
    assert [(r.class_names, r.topk) for r in results] == [
        (SHAPES.classes, 1), (SHAPES.classes, None), (FEW.classes, 1), (FEW.classes, None)]
    for r in results:
        fresh = SedPipeline(pipe.backend, Vocabulary("v", r.class_names), topk=r.topk, progress=False)(IMAGE)
        np.testing.assert_array_equal(r.seg, fresh.seg)
        np.testing.assert_allclose(r.scores, fresh.scores, atol=1e-6)
    assert counter.calls == 5  # the four fresh runs each encoded again


def test_re_decode_with_a_new_vocabulary(pipe: SedPipeline) -> None:
    encoded = pipe.encode(IMAGE)
    a = pipe.decode(encoded)
    b = pipe.decode(encoded, FEW, topk=None)
    assert a.class_names == SHAPES.classes and a.topk == 8
    assert b.class_names == FEW.classes and b.scores.shape[0] == len(FEW)
    names = {c["name"] for c in b.classes_present()}
    assert names <= set(FEW.classes) and "sky" in names


def test_features_are_checked_before_decoding(pipe: SedPipeline) -> None:
    stranger = ImageFeatures(data=None, backend="trt", generation=1)
    with pytest.raises(SedUserError, match="cannot be decoded by the ort backend"):
        pipe.backend.decode(stranger, pipe.text, 8)
    stale = ImageFeatures(data=None, backend="ort", generation=1)
    with pytest.raises(SedUserError, match="overwritten by a later encode_image"):
        pipe.backend._check_features(stale, current=2)  # the TensorRT backend's rule: one image on the device


def test_torch_backend_has_the_same_verbs() -> None:
    need("torch")
    from sed_runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend("sed-shapes")
    image = backend.input_spec.preprocess(load_image(IMAGE)).tensor
    text = backend.encode_text(FEW, progress=False)
    feats = backend.encode_image(image)
    a, b = backend.decode(feats, text, 1), backend.decode(feats, text, None)
    ref = backend.infer(image, text, None)
    np.testing.assert_array_equal(b.scores, ref.scores)
    assert a.kept is not None and b.kept is None
