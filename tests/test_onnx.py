"""The exported graphs against the torch reference: scores, kept sets, dynamic N, fp16, CER subgraph."""

from __future__ import annotations

import numpy as np
import pytest
from needs import need

torch = need("torch")
ort = need("onnxruntime")
onnx = need("onnx")
F = torch.nn.functional

from planted import decoder_feed, planted_inputs  # noqa: E402

from sed_export.cer import topk_union  # noqa: E402
from sed_export.config import load_model_config  # noqa: E402
from sed_export.model import build_model  # noqa: E402
from sed_export.onnx_cer import topk_union_graph  # noqa: E402
from sed_export.onnx_export import build_decoder_graph, build_encoder_graph, check_graph  # noqa: E402


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """No memory arena: module-scoped sessions would otherwise keep their largest run's arena (GBs at N = 150)
    for the rest of the module."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    m = build_model(load_model_config("sed-tiny"), seed=9)
    with torch.no_grad():  # lets the planted inputs below reject classes at later CER points too
        m.transformer.head1.bias.zero_()
        m.transformer.head2.bias.zero_()
    return m


@pytest.fixture(scope="module")
def decoder_fp32(model):
    g = build_decoder_graph(model, "fp32")
    check_graph(g)
    return _session(g)


@pytest.mark.parametrize("n", [1, 20, 150])
def test_decoder_graph_matches_reference(model, decoder_fp32, n):
    feats, text = planted_inputs(model, n)
    kept_sizes = []
    # k = all at N = 150 costs two full 150-class decodes on CPU; full mode is covered at N = 1 and 20.
    for k in (1, 2, 8) if n == 150 else (1, 2, 8, None):
        with torch.inference_mode():
            ref = model.decode(feats, text, topk=k)
        scores, *kept, probs = decoder_fp32.run(None, decoder_feed(feats, text, n if k is None else k))
        assert scores.shape == (n, 192, 192) and scores.dtype == np.float32
        np.testing.assert_array_equal(probs, scores[kept[2]])  # the kept-only output backends fetch instead
        np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-3, rtol=0)
        if k is None:
            assert all(x.tolist() == list(range(n)) for x in kept)
        else:
            assert [x.tolist() for x in kept] == [x.tolist() for x in ref.kept]
            kept_sizes.append([len(x) for x in kept])
            rejected = np.setdiff1d(np.arange(n), kept[2])
            assert np.all(scores[rejected] == 0)
    if n == 150:
        assert kept_sizes[0][0] < 150  # the planted case really exercises rejection


def test_k_larger_than_n_is_the_full_model(model, decoder_fp32):
    feats, text = planted_inputs(model, 5)
    full, *_ = decoder_fp32.run(None, decoder_feed(feats, text, 5))
    huge, *kept, _ = decoder_fp32.run(None, decoder_feed(feats, text, 10_000))
    np.testing.assert_array_equal(full, huge)
    assert all(len(x) == 5 for x in kept)


def test_cer_subgraph_equals_topk_union():
    from onnx import TensorProto, helper

    sub = topk_union_graph("scores", "k", "keep", prefix="cer")
    graph = helper.make_graph(
        sub.nodes,
        "cer",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["M", "H", "W"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("keep", TensorProto.INT64, ["K"])],
        sub.initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    check_graph(m)
    assert "NonZero" not in {n.op_type for n in m.graph.node}
    sess = _session(m)
    rng = np.random.default_rng(0)
    for classes, hw, k in [
        (1, (3, 3), 1),
        (7, (1, 1), 2),
        (50, (8, 8), 1),
        (50, (8, 8), 3),
        (847, (6, 6), 8),
        (10, (4, 4), 10),
        (10, (4, 4), 99),
    ]:
        scores = rng.standard_normal((classes, *hw)).astype(np.float32)
        (keep,) = sess.run(None, {"scores": scores, "k": np.array([k], np.int64)})
        assert keep.tolist() == topk_union(torch.from_numpy(scores), k).tolist()


def test_encoder_graph_matches_reference(model):
    g = build_encoder_graph(model, "fp32")
    check_graph(g)
    image = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(0))
    outs = _session(g).run(None, {"image": image.numpy()})
    with torch.inference_mode():
        ref = model.encode_image(image)
    for a, b in zip(outs, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)


def test_fp16_graphs_agree_with_fp32_on_segmentation(model, decoder_fp32):
    from sed_runtime.postprocess import segment

    enc16, dec16 = _session(build_encoder_graph(model, "fp16")), _session(build_decoder_graph(model, "fp16"))
    enc32 = _session(build_encoder_graph(model, "fp32"))
    for graph in (enc16, dec16):
        types = {i.type for i in graph.get_inputs()} | {o.type for o in graph.get_outputs()}
        assert "tensor(float16)" not in types  # fp32 at the boundaries, fp16 inside
    for graph in (build_encoder_graph(model, "fp16"), build_decoder_graph(model, "fp16")):
        norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
        casts = {o for n in graph.graph.node if n.op_type == "Cast" for o in n.output}
        assert norms and all(n.input[0] not in casts for n in norms)  # no Cast pair left around a LayerNorm
        assert all(any(a.name == "stash_type" and a.i == 1 for a in n.attribute) for n in norms)
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 768, 768, generator=g).numpy()
    text = F.normalize(torch.randn(20, 80, 64, generator=g), dim=-1).numpy()
    agreements = []
    for enc, dec in ((enc32, decoder_fp32), (enc16, dec16)):
        dense, res4, res3, res2 = enc.run(None, {"image": image})
        scores, *_ = dec.run(
            None,
            {"dense": dense, "text": text, "res4": res4, "res3": res3, "res2": res2, "k": np.array([20], np.int64)},
        )
        agreements.append(segment(scores, (300, 400)))
    assert (agreements[0] == agreements[1]).mean() >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_split_decoder_segments_equal_the_one_graph_decoder(model, tmp_path, precision):
    """The TensorRT fallback layout (four graphs, top-k union between them) computes what decoder.onnx does."""
    from sed_export.onnx_export import build_decoder_segments, export_decoder_parts, save_graph
    from sed_runtime.backends.base import expand_rows
    from sed_runtime.split_decoder import (
        LAYER_INPUTS,
        SEGMENTS,
        SPLIT_DIR,
        OrtSegments,
        run_split_decoder,
        segment_file,
    )

    parts = export_decoder_parts(model, precision)
    whole = _session(build_decoder_graph(model, precision, parts))
    segments = build_decoder_segments(model, precision, parts)
    assert list(segments) == list(SEGMENTS)
    (tmp_path / SPLIT_DIR).mkdir()
    for name, graph in segments.items():
        save_graph(graph, tmp_path / segment_file(name))  # full checker with strict shape inference
        if name != "decoder_pre":
            assert [i.name for i in graph.graph.input] == list(LAYER_INPUTS)
    runner = OrtSegments(tmp_path)
    shrunk_later = False
    # N = 64, and every class kept only at N = 24: with N = 150 (and k = N) this test took the suite to 17.7 GB RSS.
    cases = [(64, 1), (64, 2), (64, 8), (24, 24)] if precision == "fp32" else [(64, 2), (64, 8)]
    for n, k in cases:
        feats, text = planted_inputs(model, n)
        feeds = decoder_feed(feats, text, 1)
        ref_scores, *ref_kept, _ = whole.run(None, {**feeds, "k": np.array([k], np.int64)})
        probs, alive, kept = run_split_decoder(runner, feeds, feeds["text"], n, k)
        scores = expand_rows(probs, alive, n)
        assert [x.tolist() for x in kept] == [x.tolist() for x in ref_kept]
        if precision == "fp32":
            np.testing.assert_array_equal(scores, ref_scores)
        else:  # ONNX Runtime fuses fp16 ops differently across graph boundaries: fp16 rounding, not wiring
            np.testing.assert_allclose(scores, ref_scores, atol=2e-3, rtol=0)
        shrunk_later |= len(kept[2]) < len(kept[0])
    assert shrunk_later  # the later CER points (gathers inside decoder2/3) were exercised too
    with pytest.raises(ValueError, match="k must be >= 1"):
        run_split_decoder(runner, feeds, feeds["text"], n, 0)


def test_layernorm_cast_pairs_become_an_fp16_norm_with_an_fp32_stash():
    """Cast(fp32) -> Transpose -> LayerNormalization -> Transpose -> Cast(fp16), as torch exports timm's LayerNorm2d
    in the fp16 graphs, becomes one fp16 norm with an fp32 stash between the Transposes; a norm whose input is
    fp32 is left alone; the result stays within fp16 rounding of the original."""
    from onnx import TensorProto, helper, numpy_helper

    from sed_export.onnx_fp16 import fuse_layernorm_casts

    rng = np.random.default_rng(0)
    scale = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "scale")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias")
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x32"], ["xt"], perm=[0, 2, 3, 1]),
        helper.make_node("Identity", ["scale"], ["scale_id"]),
        helper.make_node("LayerNormalization", ["xt", "scale_id", "bias"], ["yt"], axis=-1, epsilon=1e-6),
        helper.make_node("Transpose", ["yt"], ["y32"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16),
        # an fp32 input: no Cast pair, nothing to rewrite
        helper.make_node("LayerNormalization", ["z", "scale", "bias"], ["w"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 4, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 4, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 8])],
        [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": (rng.standard_normal((1, 8, 4, 4)) * 300).astype(np.float16),  # fp16 squares overflow: stash
             "z": rng.standard_normal((2, 8)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert fuse_layernorm_casts(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Cast" not in ops and "Identity" not in ops and ops.count("LayerNormalization") == 2
    # the fp32 scale is still read by the fp32 norm; nothing dead is left for runtimes to warn about
    assert sorted(i.name for i in model.graph.initializer) == ["bias", "bias__fp16", "scale", "scale_id__fp16"]
    fused = next(n for n in model.graph.node if n.op_type == "LayerNormalization" and n.output[0] == "yt")
    assert {a.name: a.i for a in fused.attribute}["stash_type"] == 1
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert after[0].dtype == np.float16 and np.isfinite(after[0]).all()
    np.testing.assert_allclose(after[0].astype(np.float32), before[0].astype(np.float32), atol=2e-2, rtol=2e-3)
    np.testing.assert_array_equal(after[1], before[1])
    assert fuse_layernorm_casts(model) == 0  # nothing left to rewrite
