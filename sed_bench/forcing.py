"""Synthetic kept counts (`sed-bench --kept`): make CER keep exactly `count` classes at each CER point.

Random weights keep almost every class, so latency versus k means nothing without the official checkpoint.
In SYNTHETIC mode CER still runs as usual (so its own cost is measured), and then the survivors are replaced
by exactly `count` classes: CER's own survivors first, ranked by their best aux-head logit over all pixels,
then (if CER kept fewer) the best-scoring rejected ones. With `count` >= the classes alive, nothing changes.

* torch: a `cer_select` callback for `SedDecoder.forward` (set on `TorchBackend.cer_select`).
* ONNX Runtime, class-chunked: the same rule in numpy (`numpy_selector`, set on `OrtBackend.cer_select`).
* ONNX Runtime: a bench-only copy of a decoder graph with one more input, `kept_counts` (int64, 3), whose
  CER subgraphs end in the same selection. Built in memory from any decoder graph made by
  `sed_export.onnx_export.build_decoder_graph`; never written into a bundle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sed_runtime.errors import SedUserError

if TYPE_CHECKING:
    import onnx
    import torch

KEPT_INPUT = "kept_counts"


def torch_selector(counts: tuple[int, int, int]) -> Any:
    """`cer_select(i, aux, keep)` that keeps exactly min(counts[i], T) classes (sorted row indices)."""
    import torch

    def select(i: int, aux: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        t = aux.shape[0]
        c = min(int(counts[i]), t)
        best = aux.reshape(t, -1).amax(dim=1).float()
        in_union = torch.zeros(t, dtype=torch.float32, device=aux.device)
        in_union[keep] = 1.0
        span = best.max() - best.min() + 1.0
        key = best + in_union * span  # every CER survivor ranks above every rejected class
        return torch.topk(key, c).indices.sort().values

    return select


def numpy_selector(counts: tuple[int, int, int]) -> Any:
    """The same rule as `torch_selector` on numpy arrays, for the class-chunked decoder's CER points."""

    def select(i: int, aux: np.ndarray, keep: np.ndarray) -> np.ndarray:
        t = aux.shape[0]
        c = min(int(counts[i]), t)
        best = aux.reshape(t, -1).max(axis=1).astype(np.float32)
        in_union = np.zeros(t, np.float32)
        in_union[keep] = 1.0
        key = best + in_union * (best.max() - best.min() + 1.0)  # every CER survivor ranks above every rejected one
        return np.sort(np.argsort(-key, kind="stable")[:c]).astype(np.int64)

    return select


def forced_decoder_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with input `kept_counts` (int64, (3,)) forcing the survivors of CER points 0, 1, 2."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    if any(i.name == KEPT_INPUT for i in g.input):
        return m
    produced = {o for n in g.node for o in n.output}
    new_nodes: list[Any] = []
    for i in range(3):
        p = f"cer{i}"
        compact = [n for n in g.node if n.name == f"{p}/Compact"]
        needed = [f"{p}/flat", f"{p}/mask", f"{p}/m"]
        if len(compact) != 1 or any(t not in produced for t in needed):
            raise SedUserError(
                f"this decoder graph has no CER subgraph '{p}' as sed-deploy builds it; rebuild the bundle with "
                "this version of sed-export (or benchmark without --kept)"
            )
        keep = compact[0].output[0]
        compact[0].output[0] = f"{p}/union_keep"

        def t(name: str, p: str = p) -> str:
            return f"{p}/force/{name}"

        g.initializer.append(numpy_helper.from_array(np.array([i], np.int64), t("i")))
        g.initializer.append(numpy_helper.from_array(np.array([i + 1], np.int64), t("i1")))
        g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), t("axis1")))
        g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), t("one")))
        nodes = [
            helper.make_node("ReduceMax", [f"{p}/flat", t("axis1")], [t("best")], name=t("BestPerClass"), keepdims=0),
            helper.make_node("ReduceMax", [t("best")], [t("hi")], name=t("Max"), keepdims=0),
            helper.make_node("ReduceMin", [t("best")], [t("lo")], name=t("Min"), keepdims=0),
            helper.make_node("Sub", [t("hi"), t("lo")], [t("range")], name=t("Range")),
            helper.make_node("Add", [t("range"), t("one")], [t("span")], name=t("Span")),
            helper.make_node("Mul", [f"{p}/mask", t("span")], [t("lift")], name=t("Lift")),
            helper.make_node("Add", [t("best"), t("lift")], [t("key")], name=t("Key")),
            helper.make_node("Slice", [KEPT_INPUT, t("i"), t("i1")], [t("want")], name=t("Want")),
            helper.make_node("Min", [t("want"), f"{p}/m"], [t("count")], name=t("Clamp")),
            helper.make_node("TopK", [t("key"), t("count")], [t("top_val"), t("top_idx")], name=t("Best"), axis=0),
            helper.make_node("Cast", [t("top_idx")], [t("idx_f")], name=t("CastIdx"), to=TensorProto.FLOAT),
            helper.make_node("TopK", [t("idx_f"), t("count")], [t("asc_val"), t("asc_pos")], name=t("Ascending"),
                             axis=0, largest=0),
            helper.make_node("Gather", [t("top_idx"), t("asc_pos")], [keep], name=t("Sorted"), axis=0),
        ]
        new_nodes.append((compact[0], nodes))
    for anchor, nodes in new_nodes:  # insert right after each CER's Compact node (keeps a topological order)
        at = list(g.node).index(anchor) + 1
        for j, node in enumerate(nodes):
            g.node.insert(at + j, node)
    g.input.append(helper.make_tensor_value_info(KEPT_INPUT, TensorProto.INT64, [3]))
    return m


def kept_feed(counts: tuple[int, int, int]) -> dict[str, np.ndarray]:
    return {KEPT_INPUT: np.asarray(counts, dtype=np.int64)}
