"""Category early rejection as a standard-op ONNX subgraph, and the row gathers that shrink the class axis.

No NonZero (TensorRT-RTX's parser rejects it): the kept classes are found as
  TopK(min(k, M)) per pixel -> ScatterElements of ones -> ReduceMax over pixels = mask (M,)
  score = mask * 2M - arange(M); TopK(score, M) puts kept classes first, in ascending index order
  keep = Slice(order, 0, ReduceSum(mask))
which equals `sed_export.cer.topk_union` (sorted indices of every class in some pixel's top-k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper


@dataclass
class SubGraph:
    """Nodes and initializers to splice into a larger graph."""

    nodes: list[NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def extend(self, other: SubGraph) -> None:
        self.nodes.extend(other.nodes)
        self.initializers.extend(other.initializers)


def topk_union_graph(scores: str, k: str, keep: str, prefix: str) -> SubGraph:
    """keep (int64, sorted) = classes in the top-k of at least one pixel of `scores` (M, H, W) float32.

    `k` is an int64 tensor of shape (1,); k >= M keeps every class.
    """
    g = SubGraph()
    p = prefix

    def t(name: str) -> str:
        return f"{p}/{name}"

    g.node("Shape", [scores], [t("shape")], t("Shape"))
    g.node(
        "Slice",
        [t("shape"), g.const(t("zero"), np.array([0], np.int64)), g.const(t("one"), np.array([1], np.int64))],
        [t("m")],
        t("SliceM"),
    )
    g.node("Min", [k, t("m")], [t("kk")], t("ClampK"))
    g.node("Reshape", [scores, g.const(t("flat_shape"), np.array([0, -1], np.int64))], [t("flat")], t("Flatten"))
    g.node("TopK", [t("flat"), t("kk")], [t("top_val"), t("top_idx")], t("TopKPerPixel"), axis=0)
    g.node("Shape", [t("top_idx")], [t("top_shape")], t("TopShape"))
    g.node(
        "ConstantOfShape",
        [t("top_shape")],
        [t("ones")],
        t("Ones"),
        value=numpy_helper.from_array(np.array([1.0], np.float32)),
    )
    g.node("Shape", [t("flat")], [t("flat_dims")], t("FlatShape"))
    g.node(
        "ConstantOfShape",
        [t("flat_dims")],
        [t("zeros")],
        t("Zeros"),
        value=numpy_helper.from_array(np.array([0.0], np.float32)),
    )
    g.node("ScatterElements", [t("zeros"), t("top_idx"), t("ones")], [t("hit")], t("MarkHits"), axis=0)
    g.node(
        "ReduceMax", [t("hit"), g.const(t("axis1"), np.array([1], np.int64))], [t("mask")], t("AnyPixel"), keepdims=0
    )
    g.node("Cast", [t("m")], [t("m_f")], t("CastM"), to=TensorProto.FLOAT)
    g.node("Squeeze", [t("m_f")], [t("m_s")], t("ScalarM"))
    g.node(
        "Range",
        [g.const(t("f0"), np.array(0.0, np.float32)), t("m_s"), g.const(t("f1"), np.array(1.0, np.float32))],
        [t("arange")],
        t("Arange"),
    )
    g.node("Add", [t("m_f"), t("m_f")], [t("two_m")], t("TwoM"))
    g.node("Mul", [t("mask"), t("two_m")], [t("lifted")], t("Lift"))
    g.node("Sub", [t("lifted"), t("arange")], [t("rank_score")], t("RankScore"))
    g.node("TopK", [t("rank_score"), t("m")], [t("order_val"), t("order")], t("KeptFirst"), axis=0)
    g.node("ReduceSum", [t("mask")], [t("count_f")], t("Count"), keepdims=1)
    g.node("Cast", [t("count_f")], [t("count")], t("CastCount"), to=TensorProto.INT64)
    g.node("Slice", [t("order"), t("zero"), t("count"), t("zero")], [keep], t("Compact"))
    return g


def gather_rows(source: str, index: str, out: str, name: str) -> NodeProto:
    """Keep the rows (classes) of `source` named by `index`."""
    return helper.make_node("Gather", [source, index], [out], name=name, axis=0)
