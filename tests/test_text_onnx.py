"""Torch-free text path: tokenizer.json == open_clip's SimpleTokenizer, text_encoder.onnx == encode_text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from needs import need

open_clip = need("open_clip")
ort = need("onnxruntime")
need("tokenizers")

from sed_export.config import load_model_config
from sed_export.model import build_model
from sed_export.onnx_text import export_text_encoder
from sed_export.text import encode_vocabulary
from sed_export.tokenizer_export import clip_tokenizer_json
from sed_runtime.errors import SedUserError
from sed_runtime.templates import load_templates
from sed_runtime.text_onnx import encode_vocabulary_onnx
from sed_runtime.tokenizer import ClipTokenizer
from sed_runtime.vocab import load_vocabulary

ODD_TEXTS = [
    "a photo of a cat.",
    "There is a   Traffic-Light in the scene!",
    "it's a 1990s caf\u00e9 &amp; bar",
    "a " + "very " * 100 + "long prompt",
    "",
    "   ",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "don't we'll I'd THEY'RE",
    "x" * 300,
    "a bad photo of the c0ffee-maker 42.",
    "emoji \U0001f600 and tabs\tand\nnewlines",
    "<start_of_text> literal specials <end_of_text>",
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.from_str(clip_tokenizer_json(77))


@pytest.fixture(scope="module")
def reference():
    return open_clip.tokenizer.SimpleTokenizer(context_length=77)


def test_odd_texts_match_open_clip(tokenizer, reference) -> None:
    got = tokenizer(ODD_TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(ODD_TEXTS), 77)
    np.testing.assert_array_equal(got, reference(ODD_TEXTS).numpy())


@pytest.mark.parametrize("name", ["ade847", "pc459", "coco", "voc20"])
def test_every_shipped_prompt_matches_open_clip(tokenizer, reference, name: str) -> None:
    vocab = load_vocabulary(name)
    templates = load_templates("imagenet")[::7]  # a spread of templates keeps this fast
    texts = [t.format(c) for c in vocab.classes for t in templates]
    np.testing.assert_array_equal(tokenizer(texts), reference(texts).numpy())


def test_truncation_keeps_end_token(tokenizer, reference) -> None:
    ids = tokenizer("word " * 200)[0]
    assert ids[0] == 49406 and ids[-1] == 49407
    np.testing.assert_array_equal(ids, reference(["word " * 200])[0].numpy())


def test_broken_tokenizer_file_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(SedUserError, match="re-export"):
        ClipTokenizer.from_file(bad)
    with pytest.raises(SedUserError, match="cannot read"):
        ClipTokenizer.from_file(tmp_path / "missing.json")
    spec = json.loads(clip_tokenizer_json(77))
    spec["padding"] = None
    with pytest.raises(SedUserError, match="padding"):
        ClipTokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_model(load_model_config("sed-tiny"), seed=3)
    path = tmp_path_factory.mktemp("text") / "text_encoder.onnx"
    export_text_encoder(model.clip_model, path)
    return model, path


@pytest.mark.parametrize("t", [1, 5, 33])
def test_text_encoder_onnx_matches_encode_text(tiny, tokenizer, reference, t: int) -> None:
    import torch

    model, path = tiny
    texts = [f"a photo of thing number {i}, a rather long name" for i in range(t)]
    with torch.no_grad():
        ref = model.clip_model.encode_text(reference(texts)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"tokens": tokenizer(texts)})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_vocabulary_embeddings_match_torch_path(tiny, tokenizer, reference) -> None:
    model, path = tiny
    classes = ["wall", "car, auto, automobile", "person", "sky, heavens"]
    templates = load_templates("imagenet")[:9]
    ref = encode_vocabulary(model.clip_model, reference, classes, templates, batch_size=7, progress=False)
    got = encode_vocabulary_onnx(path, tokenizer, classes, templates, batch_size=5, progress=False)
    assert got.shape == ref.shape == (4, 9, model.clip_model.text_projection.shape[1])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_text_encoder_sequence_axis_is_dynamic_and_cut_prompts_match_77_tokens(tiny, tokenizer, reference) -> None:
    """The cut at the longest prompt (issue 14: text at vocabulary scale) changes nothing but the work."""
    import torch

    from sed_runtime.tokenizer import longest_prompt

    model, path = tiny
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not isinstance(sess.get_inputs()[0].shape[1], int)
    for texts in (["a cat."], ["a photo of a cat.", "a big " + "red " * 12 + "car", ""], ODD_TEXTS):
        tokens = tokenizer(texts)
        cut = longest_prompt(tokens)
        assert cut == int((tokens != 0).sum(1).max())  # up to the last end token, nothing more
        with torch.no_grad():
            ref = model.clip_model.encode_text(reference(texts)).numpy()
        (got,) = sess.run(None, {"tokens": np.ascontiguousarray(tokens[:, :cut])})
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
