"""Top-k-union kernel, its ranking rule, the plugin-node ONNX variant and the plugin build.

What runs where: the ranking rule, the ONNX rewrite and the nvcc compile run on any machine with the tools;
the CMake plugin build needs TensorRT headers; the kernel itself (through the torch op) needs a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from sed_export.cer import topk_union  # noqa: E402
from sed_export.onnx_cer import topk_union_graph  # noqa: E402
from sed_export.topk_union_rule import order_keys, topk_union_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
ARCHS = ("80", "86", "90")


# ---------------------------------------------------------------------------------------------- helpers


def _torch_reference(x: np.ndarray, k: int) -> np.ndarray:
    return topk_union(torch.from_numpy(np.ascontiguousarray(x)), k).numpy()


def _sorted_desc(x: np.ndarray) -> np.ndarray:
    """Per-pixel values sorted descending, NaN first (torch.topk's order of values)."""
    f = x.reshape(x.shape[0], -1).astype(np.float64)
    f = np.where(np.isnan(f), np.inf, f)  # NaN above every number; +inf and NaN never both occur below
    return -np.sort(-f, axis=0)


def _boundary_tie(x: np.ndarray, k: int) -> bool:
    """True when some pixel has equal values at ranks k and k+1: torch.topk may then pick either class."""
    c = x.shape[0]
    if k >= c:
        return False
    flat = x.reshape(c, -1).astype(np.float64)
    if np.isnan(flat).any() and np.isinf(flat).any():
        raise AssertionError("test inputs must not mix NaN and +inf (the helper folds them)")
    s = _sorted_desc(x)
    return bool(np.any(s[k - 1] == s[k]))


def _is_valid_union(kept: np.ndarray, x: np.ndarray, k: int) -> bool:
    """kept contains every class strictly above some pixel's k-th value, and only classes at or above one."""
    c = x.shape[0]
    if k >= c:
        return kept.tolist() == list(range(c))
    f = x.reshape(c, -1).astype(np.float64)
    f = np.where(np.isnan(f), np.inf, f)
    kth = _sorted_desc(x)[k - 1]
    must = np.flatnonzero((f > kth).any(axis=1))
    may = np.flatnonzero((f >= kth).any(axis=1))
    return set(must) <= set(kept.tolist()) <= set(may) and np.all(np.diff(kept) > 0)


@pytest.fixture(scope="module")
def cer_session() -> ort.InferenceSession:
    """The decoder's standard-op CER subgraph alone: ONNX TopK breaks ties by lower index, like our rule."""
    sub = topk_union_graph("scores", "k", "keep", prefix="cer")
    graph = helper.make_graph(
        sub.nodes,
        "cer",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["M", "P"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("keep", TensorProto.INT64, ["K"])],
        sub.initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_union(sess: ort.InferenceSession, x: np.ndarray, k: int) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1).astype(np.float32)
    (keep,) = sess.run(None, {"scores": flat, "k": np.array([k], np.int64)})
    return keep


def _random_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(0)
    cases: list[tuple[str, np.ndarray, int]] = []
    for c, p, k in [(1, 1, 1), (1, 9, 1), (1, 9, 5), (5, 1, 1), (5, 1, 2), (7, 3, 6), (7, 3, 7), (7, 3, 70),
                    (50, 64, 1), (50, 64, 3), (50, 64, 8), (171, 100, 8), (847, 36, 8), (847, 16, 32),
                    (847, 16, 33), (300, 20, 100), (64, 40, 63)]:
        cases.append((f"randn-c{c}-p{p}-k{k}", rng.standard_normal((c, p)).astype(np.float32), k))
    cases.append(("hw-shaped", rng.standard_normal((40, 6, 7)).astype(np.float32), 4))
    return cases


def _adversarial_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(1)
    cases: list[tuple[str, np.ndarray, int]] = []
    for c, p, k in [(1, 1, 1), (10, 1, 3), (100, 4, 3), (847, 8, 8), (2000, 2, 5), (64, 3, 40)]:
        cases.append((f"all-equal-c{c}-k{k}", np.zeros((c, p), np.float32), k))
    few = rng.integers(0, 3, size=(60, 50)).astype(np.float32)  # many ties everywhere
    cases += [("three-levels-k1", few, 1), ("three-levels-k4", few, 4), ("three-levels-k40", few, 40)]
    zeros = np.zeros((6, 4), np.float32)
    zeros[::2] = -0.0
    cases.append(("signed-zeros", zeros, 2))
    nan = rng.standard_normal((20, 12)).astype(np.float32)
    nan[[3, 7, 11], :] = np.nan
    cases += [("nan-rows-k2", nan, 2), ("nan-rows-k3", nan, 3), ("nan-rows-k5", nan, 5)]
    inf = rng.standard_normal((20, 12)).astype(np.float32)
    inf[[2, 9], ::2] = np.inf
    inf[[4, 5], 1::2] = -np.inf
    cases += [("infs-k1", inf, 1), ("infs-k2", inf, 2), ("infs-k19", inf, 19)]
    big = rng.standard_normal((847, 24)).astype(np.float32)
    big[100:110] = big[0]  # ten exact copies of class 0's row
    cases += [("copied-rows-k1", big, 1), ("copied-rows-k8", big, 8)]
    for k in (1, 2, 8):
        cases.append((f"fp16-randn-k{k}", rng.standard_normal((847, 64)).astype(np.float16), k))
    cases.append(("fp16-coarse", (rng.integers(-4, 4, size=(200, 30)) / 4).astype(np.float16), 3))
    cases.append(("fp16-k-ge-c", rng.standard_normal((5, 7)).astype(np.float16), 5))
    return cases


# ---------------------------------------------------------------------------------------- (a) nvcc


def test_kernel_compiles_for_sm80_sm86_sm90_without_warnings(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    procs = {}
    for arch in ARCHS:  # in parallel: each arch compiles the same templates
        cmd = [nvcc, "-std=c++17", "-c", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(KERNELS / "topk_union.cu"),
               "-o", str(tmp_path / f"topk_union_sm{arch}.o")]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = {}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or out.strip():
            failures[arch] = out
    assert not failures, failures
    assert all((tmp_path / f"topk_union_sm{a}.o").stat().st_size > 0 for a in ARCHS)


def test_kernel_sources_include_no_tensorrt_header():
    for path in (KERNELS / "topk_union.cu", KERNELS / "topk_union.h"):
        text = path.read_text()
        assert "NvInfer" not in text and "NvOnnx" not in text, path


# ------------------------------------------------------------------------------------- (b) the rule


@pytest.mark.parametrize("name,x,k", _random_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rule_equals_torch_reference_without_ties(name, x, k):
    assert not _boundary_tie(x, k), name  # continuous random data: ties have probability 0
    got = topk_union_reference(x, k)
    assert got.dtype == np.int64
    assert got.tolist() == _torch_reference(x, k).tolist()


@pytest.mark.parametrize("name,x,k", _adversarial_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rule_on_adversarial_inputs(name, x, k, cer_session):
    got = topk_union_reference(x, k)
    ref = _torch_reference(x, k)
    if _boundary_tie(x, k):
        # torch.topk picks some of the tied classes (on the CPU not the lowest indices: a partial sort), so
        # only the certain part of the kept set is defined; both must be valid unions.
        assert _is_valid_union(ref, x, k) and _is_valid_union(got, x, k), name
    else:
        assert got.tolist() == ref.tolist(), name
    # The ONNX twin (ONNX TopK: lower index first on ties) follows the rule exactly, ties included.
    assert got.tolist() == _ort_union(cer_session, x, k).tolist(), name


def test_rule_breaks_ties_by_lower_class_index():
    assert topk_union_reference(np.zeros((100, 1), np.float32), 3).tolist() == [0, 1, 2]
    x = np.array([[1.0], [3.0], [3.0], [3.0], [0.0]], np.float32)
    assert topk_union_reference(x, 2).tolist() == [1, 2]
    signed = np.array([[-0.0], [0.0]], np.float32)
    assert topk_union_reference(signed, 1).tolist() == [0]
    assert topk_union_reference(signed[::-1].copy(), 1).tolist() == [0]


def test_rule_ranks_nan_above_inf():
    x = np.array([[1.0], [np.inf], [np.nan], [5.0], [np.nan]], np.float32)
    assert topk_union_reference(x, 1).tolist() == [2]
    assert topk_union_reference(x, 2).tolist() == [2, 4]
    assert topk_union_reference(x, 3).tolist() == [1, 2, 4]
    assert topk_union_reference(x, 2).tolist() == _torch_reference(x, 2).tolist()


def test_rule_edge_k():
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    assert topk_union_reference(x, 6).tolist() == list(range(6))
    assert topk_union_reference(x, 10**6).tolist() == list(range(6))
    assert topk_union_reference(x, 0).tolist() == []
    assert topk_union_reference(np.zeros((4, 0), np.float32), 2).tolist() == []
    assert topk_union_reference(np.zeros((4, 0), np.float32), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        topk_union_reference(np.zeros(4, np.float32), 1)


def test_order_keys_are_the_rule_as_one_integer_compare():
    rng = np.random.default_rng(5)
    vals = np.array([np.nan, np.inf, 3.0, 0.0, -0.0, -1e-30, -np.inf, 3.0, np.nan], np.float32)
    x = rng.permutation(np.concatenate([vals, rng.standard_normal(30).astype(np.float32)]))[:, None]
    keys = order_keys(x)[:, 0]
    assert len(set(keys.tolist())) == len(keys)  # a total order
    by_key = sorted(range(len(keys)), key=lambda i: -int(keys[i]))
    v = x[:, 0].astype(np.float64)
    by_rule = sorted(range(len(v)), key=lambda i: (0 if np.isnan(v[i]) else 1, 0.0 if np.isnan(v[i]) else -v[i], i))
    assert by_key == by_rule
