"""Text embeddings: official prompt order, batched encoding == the official per-class loop, and the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from needs import need

torch = need("torch")
open_clip = need("open_clip")

from sed_export.text import (
    cached_text_embeddings,
    encode_vocabulary,
    text_tower_digest,
)
from sed_runtime.templates import class_prompts, load_templates
from sed_runtime.text_cache import TextEmbeddingCache, text_cache_key
from sed_runtime.vocab import Vocabulary

TEMPLATES = load_templates()[:6]
VOCAB = Vocabulary(
    "tiny",
    ("cat", "building, edifice", "bed ", "dog, puppy, hound", "sky", "road, route", "tree"),
)


def _tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg={
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    )
    return model.eval()


@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    return _tiny_clip()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("convnext_base_w_320")


def _official(clip_model, tokenizer, classnames, templates) -> np.ndarray:
    """The official SED/CAT-Seg `class_embeddings` loop, one class at a time, stacked to (N, P, E)."""
    out = []
    with torch.no_grad():
        for classname in classnames:
            if ", " in classname:
                classname_splits = classname.split(", ")
                texts = []
                for template in templates:
                    for cls_split in classname_splits:
                        texts.append(template.format(cls_split))
            else:
                texts = [template.format(classname) for template in templates]
            tokens = tokenizer(texts)
            class_embeddings = clip_model.encode_text(tokens)
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            if len(templates) != class_embeddings.shape[0]:
                class_embeddings = class_embeddings.reshape(
                    len(templates), -1, class_embeddings.shape[-1]
                ).mean(dim=1)
                class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            out.append(class_embeddings)
    return torch.stack(out, dim=1).permute(1, 0, 2).numpy()  # official (P, N, E) -> (N, P, E)


def test_class_prompts_synonym_order() -> None:
    texts, s = class_prompts("building, edifice", ("a {}.", "the {}!", "{} x"))
    assert s == 2
    assert texts == ["a building.", "a edifice.", "the building!", "the edifice!", "building x", "edifice x"]
    texts, s = class_prompts("a, b, c", ("{}", "<{}>"))
    assert s == 3 and texts == ["a", "b", "c", "<a>", "<b>", "<c>"]
    texts, s = class_prompts("plain", ("{}", "<{}>"))
    assert s == 1 and texts == ["plain", "<plain>"]


@pytest.mark.parametrize("batch_size", [1, 7, 13, 256])
def test_encode_matches_official_loop(clip_model, tokenizer, batch_size: int) -> None:
    ref = _official(clip_model, tokenizer, VOCAB.classes, TEMPLATES)
    got = encode_vocabulary(clip_model, tokenizer, VOCAB, TEMPLATES, batch_size=batch_size, progress=False)
    assert got.dtype == np.float32
    assert got.shape == (len(VOCAB), len(TEMPLATES), 64)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_encode_full_ensemble_and_restores_train_mode(clip_model, tokenizer) -> None:
    templates = load_templates()
    vocab = Vocabulary("v", ("wall", "building, edifice"))
    clip_model.train()
    try:
        got = encode_vocabulary(clip_model, tokenizer, vocab, templates, batch_size=100, progress=False)
        assert clip_model.training  # restored
    finally:
        clip_model.eval()
    ref = _official(clip_model, tokenizer, vocab.classes, templates)
    assert got.shape == (2, 80, 64)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_text_tower_digest(clip_model) -> None:
    model = _tiny_clip()
    d0 = text_tower_digest(model)
    assert d0 == text_tower_digest(clip_model) and len(d0) == 64
    with torch.no_grad():
        model.visual.trunk.stem[0].weight.add_(1.0)  # vision weights do not matter
    assert text_tower_digest(model) == d0
    with torch.no_grad():
        model.token_embedding.weight[0, 0] += 1e-3
    assert text_tower_digest(model) != d0
    assert text_tower_digest(_tiny_clip(seed=1)) != d0


def test_cache_keys_differ() -> None:
    k = text_cache_key("sed-b", "w0", TEMPLATES, VOCAB.classes)
    assert k == text_cache_key("sed-b", "w0", list(TEMPLATES), list(VOCAB.classes))
    others = {
        text_cache_key("sed-l", "w0", TEMPLATES, VOCAB.classes),
        text_cache_key("sed-b", "w1", TEMPLATES, VOCAB.classes),
        text_cache_key("sed-b", "w0", TEMPLATES[:-1], VOCAB.classes),
        text_cache_key("sed-b", "w0", TEMPLATES[::-1], VOCAB.classes),
        text_cache_key("sed-b", "w0", TEMPLATES, VOCAB.classes[:-1]),
        text_cache_key("sed-b", "w0", TEMPLATES, ("bed",) + VOCAB.classes[1:]),
    }
    assert k not in others and len(others) == 6


class _Spy:
    def __init__(self, model, monkeypatch) -> None:
        self.calls = 0
        real = model.token_embedding.forward  # every text-tower run, whole or cut at the longest prompt

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(model.token_embedding, "forward", spy)


def test_cache_hit_skips_text_tower(clip_model, tokenizer, tmp_path: Path, monkeypatch) -> None:
    cache = TextEmbeddingCache(tmp_path / "cache")
    spy = _Spy(clip_model, monkeypatch)
    first = cached_text_embeddings(
        clip_model, tokenizer, "tiny", VOCAB, TEMPLATES, cache=cache, progress=False
    )
    assert spy.calls > 0
    files = list((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # no temp files left behind
    spy.calls = 0
    second = cached_text_embeddings(
        clip_model, tokenizer, "tiny", VOCAB, TEMPLATES, cache=cache, progress=False
    )
    assert spy.calls == 0
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32

    # metadata travels in the safetensors header
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="numpy") as f:
        meta = f.metadata()
    assert meta["model"] == "tiny" and meta["vocabulary"] == "tiny" and meta["num_classes"] == str(len(VOCAB))
    assert meta["weights_sha256"] == text_tower_digest(clip_model)
    assert len(meta["templates_sha256"]) == 64

    # a different vocabulary / template set / model name misses
    for kwargs in (
        {"model_name": "other"},
        {"vocab": Vocabulary("tiny", VOCAB.classes[:3])},
        {"templates": TEMPLATES[:3]},
    ):
        args = {"model_name": "tiny", "vocab": VOCAB, "templates": TEMPLATES} | kwargs
        spy.calls = 0
        cached_text_embeddings(clip_model, tokenizer, cache=cache, progress=False, **args)
        assert spy.calls > 0, kwargs
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SED_CACHE_DIR", str(tmp_path / "envcache"))
    assert TextEmbeddingCache().root == tmp_path / "envcache"
    monkeypatch.delenv("SED_CACHE_DIR")
    assert TextEmbeddingCache().root == Path("~/.cache/sed-deploy/text").expanduser()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_is_recomputed(clip_model, tokenizer, tmp_path: Path, monkeypatch, damage: str) -> None:
    cache = TextEmbeddingCache(tmp_path)
    ref = cached_text_embeddings(clip_model, tokenizer, "tiny", VOCAB, TEMPLATES, cache=cache, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    else:
        path.write_bytes(b"")
    key = path.stem
    assert cache.get(key) is None
    assert not path.exists()  # a bad file is dropped, not a crash

    path.write_bytes(data[:50])
    spy = _Spy(clip_model, monkeypatch)
    again = cached_text_embeddings(
        clip_model, tokenizer, "tiny", VOCAB, TEMPLATES, cache=cache, progress=False
    )
    assert spy.calls > 0
    np.testing.assert_array_equal(again, ref)
    np.testing.assert_array_equal(cache.get(key), ref)  # rewritten whole


def test_put_is_atomic(tmp_path: Path, monkeypatch) -> None:
    cache = TextEmbeddingCache(tmp_path)
    key = "ab" * 32
    arr = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        cache.put(key, arr, {"model": "m"})
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    monkeypatch.undo()

    path = cache.put(key, arr, {"model": "m", "num_classes": 3})
    assert list(tmp_path.iterdir()) == [path]
    np.testing.assert_array_equal(cache.get(key), arr)
    assert cache.get("cd" * 32) is None
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


def test_unwritable_cache_only_warns(clip_model, tokenizer, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = TextEmbeddingCache(blocker / "sub")  # cannot be created: parent is a file
    with pytest.warns(UserWarning, match="cache"):
        out = cached_text_embeddings(
            clip_model, tokenizer, "tiny", VOCAB, TEMPLATES, cache=cache, progress=False
        )
    assert out.shape == (len(VOCAB), len(TEMPLATES), 64)


@pytest.mark.parametrize("texts", [["a cat."], ["a photo of a cat.", "", "a " + "very " * 40 + "long name"],
                                   ["word " * 200, "x"]])
def test_trimmed_text_tower_equals_the_full_77_tokens(clip_model, tokenizer, texts) -> None:
    from sed_export.text import encode_text_trimmed, trims_exactly
    from sed_runtime.tokenizer import longest_prompt

    tokens = tokenizer(texts)
    cut = longest_prompt(tokens)
    assert trims_exactly(clip_model) and cut <= 77
    with torch.no_grad():
        full = clip_model.encode_text(tokens)
        trimmed = encode_text_trimmed(clip_model, tokens[:, :cut])
    assert float((full - trimmed).abs().max()) <= 1e-5


def test_a_tower_that_is_not_causal_is_never_cut() -> None:
    from sed_export.text import trims_exactly

    model = _tiny_clip()
    model.attn_mask = torch.zeros(77, 77)  # bidirectional: later tokens would change the pooled one
    assert not trims_exactly(model)
    model = _tiny_clip()
    model.text_pool_type = "first"
    assert not trims_exactly(model)
