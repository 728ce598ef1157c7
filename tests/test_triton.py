"""`sed-export triton` (issue 16): every generated config.pbtxt parses with Triton's own ModelConfig schema and
states exactly the names, types and shapes of the ONNX file beside it; the ensemble wires real tensors.

A real tritonserver loads the `--platform python` repository in test_triton_server.py; its wheel (PyTriton's)
carries only the Python backend, so the onnxruntime and tensorrt backends' loading of these files is not tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from needs import need

need("tritonclient")
onnx = need("onnx")

from tritonclient.grpc import model_config_pb2 as mc

from sed_export.triton import ENSEMBLE, NAMES, validate_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    r = subprocess.run([str(BIN / "sed-export"), "triton", str(DEMO_BUNDLE), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def _graph_io(path: Path) -> dict[str, tuple[str, list[int]]]:
    g = onnx.load(str(path)).graph
    io = {}
    for v in [*g.input, *g.output]:
        t = v.type.tensor_type
        io[v.name] = (ONNX_TYPES[t.elem_type], [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])
    return io


def test_every_config_parses_and_matches_its_onnx_file(repo: Path) -> None:
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([*NAMES.values(), ENSEMBLE])
    for name in NAMES.values():
        cfg = validate_config((repo / name / "config.pbtxt").read_text())
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        io = _graph_io(repo / name / "1" / "model.onnx")
        declared = {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in [*cfg.input, *cfg.output]}
        assert declared == io, name


def test_the_ensemble_wires_real_tensors(repo: Path) -> None:
    ens = validate_config((repo / ENSEMBLE / "config.pbtxt").read_text())
    models = {name: validate_config((repo / name / "config.pbtxt").read_text()) for name in NAMES.values()}
    available = {t.name for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        m = models[step.model_name]
        assert set(step.input_map) == {t.name for t in m.input}  # every model input is fed
        assert set(step.input_map.values()) <= available  # from an ensemble input or an earlier step
        assert set(step.output_map) <= {t.name for t in m.output}
        available |= set(step.output_map.values())
    assert {t.name for t in ens.output} <= available
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["sed_encoder", "sed_decoder"]
    decoder = {t.name: list(t.dims) for t in models["sed_decoder"].input}
    assert decoder["text"][0] == -1 and decoder["k"] == [1]  # N varies; k is a one-element tensor


def test_bad_triton_exports_are_one_line(repo: Path, tmp_path: Path) -> None:
    for args, message in [
        ([str(DEMO_BUNDLE), "--out", str(repo)], "already exists"),
        ([str(DEMO_BUNDLE), "--out", str(tmp_path / "r"), "--platform", "tensorrt"], "no TensorRT plans"),
        ([str(DEMO_BUNDLE), "--out", str(tmp_path / "r"), "--platform", "triton"], "--platform must be"),
        ([str(tmp_path), "--out", str(tmp_path / "r")], "not a bundle"),
    ]:
        r = subprocess.run([str(BIN / "sed-export"), "triton", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.partial"))


def test_python_platform_configs_match_their_onnx_files(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    r = subprocess.run([str(BIN / "sed-export"), "triton", str(DEMO_BUNDLE), "--out", str(out), "--platform", "python"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in NAMES.values():
        cfg = validate_config((out / name / "config.pbtxt").read_text())
        assert cfg.backend == "python" and not cfg.platform and (out / name / "1" / "model.py").is_file()
        io = _graph_io(out / name / "1" / "model.onnx")
        assert {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in [*cfg.input, *cfg.output]} == io
    assert validate_config((out / ENSEMBLE / "config.pbtxt").read_text()).platform == "ensemble"
