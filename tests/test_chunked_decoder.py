"""The class-chunked decoder (`SedDecoder.forward_chunked`): the same scores and kept sets as the one-pass
decoder for any chunk size and k, and a working set that stays bounded as the class count grows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
from needs import need

torch = need("torch")
need("open_clip")

from planted import planted_inputs  # noqa: E402

from sed_export.config import load_model_config  # noqa: E402
from sed_export.model import build_model  # noqa: E402
from sed_runtime.memory import DecoderMemory, choose_class_chunk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture(scope="module")
def tiny():
    model = build_model(load_model_config("sed-tiny"), seed=5)
    feats, text = planted_inputs(model, N, seed=8)
    with torch.inference_mode():
        reference = {k: model.decode(feats, text, topk=k) for k in (None, 1, 4)}
    return model, feats, text, reference


@pytest.mark.parametrize("chunk", [1, 7, N - 1, N, N + 5])
@pytest.mark.parametrize("topk", [None, 1, 4], ids=["k=all", "k=1", "k=4"])
def test_chunked_equals_one_pass(tiny, chunk, topk):
    model, feats, text, reference = tiny
    want = reference[topk]
    with torch.inference_mode():
        got = model.transformer.forward_chunked(feats.dense, text, (feats.res4, feats.res3, feats.res2),
                                                topk=topk, chunk=chunk)
    assert float((got.scores - want.scores).abs().max()) <= 1e-5
    if topk is None:
        assert got.kept is None and want.kept is None
    else:
        assert [k.tolist() for k in got.kept] == [k.tolist() for k in want.kept]
    if topk == 1:
        assert len(want.kept[0]) < N  # CER really rejected classes, so the gathers between chunks were exercised


def test_chunk_must_be_positive(tiny):
    model, feats, text, _ = tiny
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        model.transformer.forward_chunked(feats.dense, text, (feats.res4, feats.res3, feats.res2), chunk=0)


def test_chunk_choice_follows_the_budget():
    sed = asdict(load_model_config("sed-b").sed)
    mem = DecoderMemory.from_settings(sed, 80, "torch")
    one_pass = mem.peak_bytes(847)
    assert choose_class_chunk(mem, 847, one_pass * 1.01) is None  # it fits: no chunking
    chunk = choose_class_chunk(mem, 847, 3 * 2**30)
    assert chunk is not None and 1 <= chunk < 847
    assert mem.chunked_peak_bytes(847, chunk) <= 3 * 2**30 < mem.chunked_peak_bytes(847, chunk + 1)
    assert choose_class_chunk(mem, 847, 2**20) is None  # not even one class at a time: the caller refuses
    assert choose_class_chunk(None, 847, 2**30) is None


_PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from planted import planted_inputs
    from sed_export.config import load_model_config
    from sed_export.model import build_model
    from sed_runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb
    torch.set_num_threads(2)
    model = build_model(load_model_config("sed-tiny"), seed=5)
    feats, text = planted_inputs(model, {n}, seed=8)
    chunk = {chunk}
    with torch.inference_mode():
        base = rss_mb()
        assert reset_peak_rss()
        g = (feats.res4, feats.res3, feats.res2)
        if chunk:
            out = model.transformer.forward_chunked(feats.dense, text, g, chunk=chunk)
        else:
            out = model.transformer(feats.dense, text, g)
        print(json.dumps({{"peak_mb": peak_rss_mb() - base}}))
""")


def _decoder_peak_mb(n: int, chunk: int) -> float:
    code = _PEAK.format(tests=str(ROOT / "tests"), n=n, chunk=chunk)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"])


def test_chunked_working_set_is_bounded():
    """At 60 classes (every class kept) the one-pass decoder's peak is several times the chunked one's."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    one_pass, chunked = _decoder_peak_mb(60, 0), _decoder_peak_mb(60, 4)
    assert one_pass >= 3 * chunked, (one_pass, chunked)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_kept_only_scores_round_trip_to_the_documented_npz(tiny, chunked):
    """Backends hand over the survivors' rows only; seg and the npz's N x h x w scores are unchanged."""
    import numpy as np

    from sed_runtime.backends.base import expand_rows
    from sed_runtime.outputs import npz_payload
    from sed_runtime.pipeline import Segmentation
    from sed_runtime.postprocess import segment

    model, feats, text, reference = tiny
    want = reference[1]
    with torch.inference_mode():
        g = (feats.res4, feats.res3, feats.res2)
        out = (model.transformer.forward_chunked(feats.dense, text, g, topk=1, chunk=5, kept_only=True) if chunked
               else model.decode(feats, text, topk=1, kept_only=True))
    rows = out.rows.numpy().astype(np.int32)
    assert rows.tolist() == want.kept[-1].tolist() and out.scores.shape[0] == len(rows) < N
    full = expand_rows(out.scores.numpy(), rows, N)
    np.testing.assert_allclose(full, want.scores.numpy(), atol=1e-5)
    hw = (300, 200)
    # Exactly the seg of the same scores expanded to N rows (against the one-pass reference's seg, random weights'
    # near-ties may flip a pixel: the chunked sums differ from the one-pass ones by ~1e-6).
    seg = segment(out.scores.numpy(), hw, rows)
    np.testing.assert_array_equal(seg, segment(full, hw))
    if not chunked:
        np.testing.assert_array_equal(seg, segment(want.scores.numpy(), hw))
    result = Segmentation(hw, seg, out.scores.numpy(), [k.numpy() for k in out.kept], tuple(f"c{i}" for i in range(N)),
                          1, rows=rows)
    payload = npz_payload(result)
    assert payload["scores"].shape == (N, *want.scores.shape[1:])
    np.testing.assert_allclose(payload["scores"], want.scores.numpy(), atol=1e-5)
