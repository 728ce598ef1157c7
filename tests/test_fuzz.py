"""Fuzzing the parsers that read what users give us (issue 17): whatever the bytes, each either succeeds or
raises our one-line `SedUserError`, never another exception. Hypothesis generates the inputs; CI runs a
bounded, derandomised budget (the same examples every run). For a longer hunt:

    SED_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py

Crashers found are kept below as `@example` rows, so they are re-run first forever.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from needs import need

hypothesis = need("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sed_runtime.errors import SedUserError  # noqa: E402

_EXAMPLES = int(os.environ.get("SED_FUZZ_EXAMPLES", "150"))
_BUDGET = settings(max_examples=_EXAMPLES, deadline=None, derandomize=_EXAMPLES <= 150, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _json_values() -> st.SearchStrategy[object]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8),
                                                                                             inner, max_size=5),
                        max_leaves=20)


@_BUDGET
@given(text=st.text(max_size=200))
@example(text=";;")
@example(text=", , ;")
@example(text="\x00")
@example(text="cat; CAT")
def test_inline_classes(text):
    from sed_runtime.vocab import load_vocabulary

    try:
        vocab = load_vocabulary(classes=text)
    except SedUserError as e:
        assert "\n" not in str(e)
        return
    assert vocab.classes and all(c.strip() for c in vocab.classes)


@_BUDGET
@given(data=st.binary(max_size=300) | _json_values().map(lambda v: json.dumps(v).encode()),
       suffix=st.sampled_from([".json", ".txt"]))
@example(data=b"\xff\xfe", suffix=".txt")
@example(data=b"[]", suffix=".json")
@example(data=b'[""]', suffix=".json")
@example(data=b"[1e999]", suffix=".json")
def test_vocabulary_files(tmp_path, data, suffix):
    from sed_runtime.vocab import load_vocabulary

    path = tmp_path / f"vocab{suffix}"
    path.write_bytes(data)
    try:
        vocab = load_vocabulary(str(path))
    except SedUserError as e:
        assert "\n" not in str(e)
        return
    assert vocab.classes


@_BUDGET
@given(manifest=_json_values() | st.fixed_dictionaries({"format": st.just("sed-deploy-bundle/1")},
                                                       optional={k: _json_values() for k in (
                                                           "model", "precision", "graphs", "files", "input",
                                                           "templates", "weights")}))
@example(manifest={"format": "sed-deploy-bundle/1", "model": {}, "precision": "fp32", "graphs": {},
                   "files": {"../x": {"bytes": 1, "sha256": "0"}}, "input": {}, "templates": [], "weights": {}})
@example(manifest={"format": "sed-deploy-bundle/1", "model": {}, "precision": "fp32", "graphs": {},
                   "files": [], "input": {}, "templates": [], "weights": {}})
def test_bundle_manifests(tmp_path_factory, manifest):
    from sed_runtime.bundle import Bundle

    root = tmp_path_factory.mktemp("bundle")
    (root / "manifest.json").write_text(json.dumps(manifest))
    try:
        Bundle.open(root)
    except SedUserError as e:
        assert "\n" not in str(e)


def _image_bytes() -> st.SearchStrategy[bytes]:
    """Real encodings of small random images (then cut or bit-flipped), plus plain random bytes."""
    from PIL import Image

    @st.composite
    def encoded(draw: st.DrawFn) -> bytes:
        mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]))
        fmt = draw(st.sampled_from(["PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"]))
        h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        seed = draw(st.integers(0, 2**16))
        arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode if mode not in ("I;16", "I", "F") else "L")
        if mode in ("I;16", "I", "F"):
            im = im.convert(mode)
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):  # this format cannot hold this mode
            im.convert("RGB").save(buf, format=fmt)
        data = bytearray(buf.getvalue())
        cut = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data = data[:cut]
        for i in draw(st.lists(st.integers(0, max(0, len(data) - 1)), max_size=4)):
            if data:
                data[i] ^= 0xFF
        return bytes(data)

    return encoded() | st.binary(max_size=200)


@_BUDGET
@given(data=_image_bytes(), suffix=st.sampled_from([".png", ".jpg", ".tif", ".gif", ".webp", ".bmp"]))
@example(data=b"", suffix=".png")
@example(data=b"GIF89a", suffix=".gif")
def test_image_decoding(tmp_path, data, suffix):
    import warnings

    from sed_runtime.preprocess import load_image

    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = load_image(path)
        except SedUserError as e:
            assert "\n" not in str(e)
            img = None
    assert not caught, [str(w.message) for w in caught]  # users would see them as raw lines
    if img is None:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 1
