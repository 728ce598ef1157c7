"""The class-chunked decoder as ONNX segments (`sed_runtime.chunked_decoder`, issue 14): on ONNX Runtime it gives
the one-graph decoder's scores and kept sets for any chunk size and k, and the ORT backend and `sed-run` use it
when a vocabulary would not fit in one pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need

need("torch")
need("open_clip")
ort = need("onnxruntime")
need("onnx")

from sed_runtime.backends.base import expand_rows  # noqa: E402
from sed_runtime.chunked_decoder import (  # noqa: E402
    CHUNKED_DIR,
    chunk_spans,
    ort_chunked_segments,
    run_chunked_decoder,
    segment_file,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
N = 34  # the 24 shapes classes and 10 perturbed copies: near-ties for CER to rank


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """fp32 segments and the one-graph decoder of the trained sed-shapes, encoder features of a held-out scene."""
    from sed_export.bundle import model_with_weights
    from sed_export.config import load_model_config
    from sed_export.onnx_chunked import build_chunked_segments
    from sed_export.onnx_export import build_decoder_graph, build_encoder_graph, save_graph
    from sed_runtime.backends.base import InputSpec
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.scenes import SHAPES_CLASSES, generate_scene
    from sed_runtime.vocab import Vocabulary

    config = load_model_config("sed-shapes")
    model, _ = model_with_weights(config, None)
    root = tmp_path_factory.mktemp("chunked")
    (root / CHUNKED_DIR).mkdir()
    for name, graph in build_chunked_segments(model, "fp32").items():
        save_graph(graph, root / segment_file(name))
    save_graph(build_decoder_graph(model, "fp32"), root / "decoder.onnx")
    save_graph(build_encoder_graph(model, "fp32"), root / "encoder.onnx")
    image = InputSpec.from_settings(config.sed).preprocess(generate_scene(1000, 3).image).tensor
    encoder = ort.InferenceSession(str(root / "encoder.onnx"), providers=["CPUExecutionProvider"])
    features = dict(zip(["dense", "res4", "res3", "res2"], encoder.run(None, {"image": image})))
    text = TorchBackend("sed-shapes").encode_text(Vocabulary("shapes", SHAPES_CLASSES), progress=False)
    text = np.concatenate([text, text[::-1][:10] * 0.9 + 0.01]).astype(np.float32)
    decoder = ort.InferenceSession(str(root / "decoder.onnx"), providers=["CPUExecutionProvider"])
    reference = {k: decoder.run(None, {**features, "text": text, "k": np.array([k], np.int64)}) for k in (1, 2, 8, N)}
    return ort_chunked_segments(root), features, text, reference, root


@pytest.mark.parametrize("chunk", [1, 7, N - 1, N, N + 5])
@pytest.mark.parametrize("k", [1, 2, 8, N], ids=["k=1", "k=2", "k=8", "k=all"])
def test_chunked_segments_equal_the_one_graph_decoder(graphs, chunk, k):
    segments, features, text, reference, _ = graphs
    scores, *kept, _ = reference[k]
    probs, alive, got_kept = run_chunked_decoder(segments, features, text, k, chunk)
    assert float(np.abs(expand_rows(probs, alive, N) - scores).max()) <= 1e-5
    assert [g.tolist() for g in got_kept] == [w.tolist() for w in kept]
    assert alive.tolist() == kept[2].tolist() and probs.shape[0] == len(alive)  # kept-only rows
    if k == 1:
        assert len(kept[0]) < N  # CER rejected classes, so the gathers between chunks ran


@pytest.mark.parametrize("fixed", [False, True], ids=["any-size", "fixed-sizes"])
def test_chunk_spans_cover_the_classes_in_few_shapes(fixed):
    sizes: set[int] = set()
    for total in range(1, 200):
        spans = chunk_spans(total, 24, fixed)
        assert [s for s, _ in spans] == list(np.cumsum([0] + [n for _, n in spans[:-1]]))
        assert sum(n for _, n in spans) == total and all(1 <= n <= 24 for _, n in spans)
        sizes |= {n for _, n in spans}
    if fixed:  # 24 and the powers of two below it, whatever the class count
        assert sizes == {24, 16, 8, 4, 2, 1}
    else:  # one remainder per count
        assert sizes == set(range(1, 25))
    assert chunk_spans(0, 8, fixed) == []


@pytest.mark.parametrize("k", [1, 8, N], ids=["k=1", "k=8", "k=all"])
def test_openvino_chunked_segments_equal_the_one_graph_decoder(graphs, k):
    """The same segments on OpenVINO, compiled with a dynamic class axis or for a few static chunk sizes (chunks
    of 7 at N = 34 with CER: 7 and powers of two below it), give the one-graph decoder's scores and kept sets."""
    ov = need("openvino")
    from sed_runtime.backends.openvino_backend import OpenVinoSegments

    _, features, text, reference, root = graphs
    scores, *kept, _ = reference[k]
    for static in (False, True):
        segments = OpenVinoSegments(ov.Core(), root, {"INFERENCE_PRECISION_HINT": "f32"}, static=static)
        probs, alive, got_kept = run_chunked_decoder(segments, features, text, k, 7)
        assert float(np.abs(expand_rows(probs, alive, N) - scores).max()) <= 1e-5
        assert [g.tolist() for g in got_kept] == [w.tolist() for w in kept]
        rows = {r for _, r in segments.compiled}  # None: a program with the class axis dynamic, or none (skips)
        assert rows - {None} <= {7, 4, 2, 1} if static else rows == {None}, rows


def _graph_backend(name: str):
    if name == "ort":
        from sed_runtime.backends.ort_backend import OrtBackend

        return OrtBackend(DEMO_BUNDLE)
    need("openvino")
    from sed_runtime.backends.openvino_backend import OpenVinoBackend

    return OpenVinoBackend(DEMO_BUNDLE)


@pytest.mark.parametrize("backend_name", ["ort", "openvino"])
def test_graph_backends_decode_in_chunks_with_the_same_segmentation(backend_name):
    """The demo bundle (fp16) through the pipeline: chunked and one-graph give the same kept classes and, up to
    fp16 rounding (the chunked layer sums its concat convolution in another order), the same label map."""
    from sed_runtime.pipeline import SedPipeline
    from sed_runtime.scenes import generate_scene
    from sed_runtime.vocab import load_vocabulary

    vocab = load_vocabulary("shapes")
    one = SedPipeline(_graph_backend(backend_name), vocab, topk=8, progress=False)
    backend = _graph_backend(backend_name)
    backend.class_chunk = 5
    chunked = SedPipeline(backend, vocab, topk=8, progress=False)
    agree = total = 0
    for i in range(2):
        image = generate_scene(1000, i).image
        a, b = one(image), chunked(image)
        agree, total = agree + int((a.seg == b.seg).sum()), total + a.seg.size
        assert [x.tolist() for x in a.kept] == [x.tolist() for x in b.kept]
        assert float(np.abs(a.full_scores() - b.full_scores()).max()) <= 2e-3
    assert agree / total >= 0.999, agree / total
    assert backend.describe()["decoder"] == "class-chunked, 5 classes per step"


@pytest.mark.parametrize("backend_name", ["ort", "openvino"])
def test_sed_run_chunks_the_decoder_under_a_memory_budget(tmp_path, backend_name):
    """A budget that one pass over ade150 would exceed (about 1.5 GiB predicted on ORT, 0.7 on OpenVINO): sed-run
    says so and decodes in chunks instead."""
    if backend_name == "openvino":
        need("openvino")
    budget = "1.0" if backend_name == "ort" else "0.5"
    r = subprocess.run([str(BIN / "sed-run"), "infer", str(DEMO_BUNDLE), str(ROOT / "examples/images/shapes.jpg"),
                        "--vocab", "ade150", "--topk", "all", "--backend", backend_name, "--max-memory", budget,
                        "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "over the" in r.stderr and "the decoder runs class-chunked," in r.stderr
    summary = json.loads((tmp_path / "shapes.json").read_text())
    assert summary["decoder"].startswith("class-chunked")


_PEAK = """
import json, sys
import numpy as np
from sed_runtime.backends.ort_backend import OrtBackend
from sed_runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb
from sed_runtime.scenes import generate_scene
backend = OrtBackend({bundle!r}, threads=2, low_memory=True)
backend.class_chunk = {chunk} or None
features = backend.encode_image(backend.input_spec.preprocess(generate_scene(1000, 0).image).tensor)
text = np.random.default_rng(0).standard_normal(({n}, 80, 32)).astype(np.float32)
text /= np.linalg.norm(text, axis=-1, keepdims=True)
if backend.class_chunk:
    backend.decode(features, text[:2], None)  # load the segment sessions before the baseline
base = rss_mb()
assert reset_peak_rss()
backend.decode(features, text, None)
print(json.dumps({{"peak_mb": peak_rss_mb() - base}}))
"""


def _ort_decoder_peak_mb(n: int, chunk: int) -> float:
    code = _PEAK.format(bundle=str(DEMO_BUNDLE), n=n, chunk=chunk)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"])


def test_chunked_ort_working_set_is_bounded():
    """At 100 classes, every class kept, the one-graph ORT decoder's peak is several times the chunked one's
    (both without the memory arena)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    one_graph, chunked = _ort_decoder_peak_mb(100, 0), _ort_decoder_peak_mb(100, 4)
    print(f"ORT decoder peak over its baseline at N = 100: one graph {one_graph:.0f} MB, chunks of 4 {chunked:.0f} MB")
    assert one_graph >= 3 * chunked, (one_graph, chunked)
