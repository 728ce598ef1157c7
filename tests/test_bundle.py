"""`sed-export build` -> bundle -> `sed-run infer` on ONNX Runtime, torch-free, checked against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from needs import need

need("torch")
need("onnxruntime")

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "astronaut.jpg"
CLASSES = "sky; grass, lawn; person; dog; building"


def run(tool: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"SED_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    r = run("sed-export", "build", "--classes", CLASSES, "--out", str(out), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    return out


def test_bundle_contents_and_manifest(bundle):
    from sed_runtime.bundle import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("encoder.onnx", "decoder.onnx", "text_encoder.onnx", "tokenizer.json"):
        assert (bundle / name).is_file()
        assert manifest["files"][name]["sha256"] == sha256_file(bundle / name)
    assert manifest["precision"] == "fp32" and manifest["opset"] >= 17
    assert manifest["model"]["name"] == "sed-tiny" and manifest["weights"]["source"] == "random"
    assert {"torch", "onnx", "sed-deploy"} <= set(manifest["producer"])
    dec = manifest["graphs"]["decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["dense", "text", "res4", "res3", "res2", "k"]
    assert dec["inputs"][1]["shape"][0] == "N" and [o["name"] for o in dec["outputs"]][:2] == ["scores", "kept0"]
    assert manifest["graphs"]["encoder"]["inputs"][0]["shape"] == [1, 3, 768, 768]
    assert manifest["vocabulary"]["classes"] == ["sky", "grass, lawn", "person", "dog", "building"]
    assert not list(bundle.parent.glob(".*"))  # no temporary folders left behind


def test_existing_bundle_needs_force(bundle, env):
    before = (bundle / "manifest.json").read_text()
    r = run("sed-export", "build", "--classes", "cat", "--out", str(bundle), "--no-progress", env=env)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (bundle / "manifest.json").read_text() == before


def test_ort_bundle_matches_torch_reference(bundle, env, tmp_path):
    a, b = tmp_path / "ort", tmp_path / "torch"
    r = run(
        "sed-run",
        "infer",
        str(bundle / "encoder.onnx"),
        str(IMAGE),
        "--backend",
        "ort",
        "--topk",
        "2",
        "--out",
        str(a),
        "--save-npz",
        "--no-progress",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = run(
        "sed-run",
        "infer",
        str(IMAGE),
        "--classes",
        CLASSES,
        "--topk",
        "2",
        "--out",
        str(b),
        "--save-npz",
        "--no-progress",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    x, y = np.load(a / "astronaut.npz"), np.load(b / "astronaut.npz")
    np.testing.assert_allclose(x["scores"], y["scores"], atol=1e-3)
    assert (x["seg"] == y["seg"]).mean() >= 0.999
    for i in range(3):
        np.testing.assert_array_equal(x[f"kept{i}"], y[f"kept{i}"])
    assert json.loads((a / "astronaut.json").read_text())["backend"] == "ort"


def test_check_command_passes(bundle, env):
    r = run("sed-export", "check", str(bundle), "--image", str(IMAGE), "--topk", "2", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout and "kept set CER2" in r.stdout


def test_runtime_works_without_torch(bundle, env, tmp_path):
    """New vocabulary (text encoder in the bundle) and inference, with `import torch` made impossible."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from sed_runtime.cli import app
        sys.argv = ["sed-run", "infer", {str(bundle)!r}, {str(IMAGE)!r}, "--vocab", "voc20",
                    "--out", {str(out)!r}, "--save-npz", "--no-progress"]
        try:
            app()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert "open_clip" not in sys.modules
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )
    assert r.returncode == 0, r.stderr
    data = np.load(out / "astronaut.npz")
    assert data["scores"].shape == (20, 192, 192)


def test_python_api_in_three_lines(bundle, env, monkeypatch):
    monkeypatch.setenv("SED_CACHE_DIR", env["SED_CACHE_DIR"])
    from sed_runtime.pipeline import SedPipeline

    pipe = SedPipeline.from_bundle(bundle, topk=2)
    result = pipe(IMAGE)
    assert result.seg.shape == (512, 512) and len(result.kept) == 3
    assert result.class_names[1] == "grass, lawn"


def _copy(bundle: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(bundle, dst)
    return dst


def test_broken_bundles_are_refused(bundle, env, tmp_path):
    from sed_runtime.bundle import sha256_file

    cases = {}
    b = _copy(bundle, tmp_path / "truncated")
    data = (b / "decoder.onnx").read_bytes()
    (b / "decoder.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated graph"] = (b, "does not match its manifest hash")
    b = _copy(bundle, tmp_path / "badjson")
    (b / "manifest.json").write_text("{ not json")
    cases["corrupt manifest"] = (b, "not valid JSON")
    b = _copy(bundle, tmp_path / "foreign")
    (b / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    cases["foreign manifest"] = (b, "not a sed-deploy-bundle")
    b = _copy(bundle, tmp_path / "foreign_onnx")  # a non-ONNX file whose hash was (re)recorded
    (b / "encoder.onnx").write_bytes(b"this is not onnx")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["encoder.onnx"] = {"sha256": sha256_file(b / "encoder.onnx"), "bytes": 16}
    (b / "manifest.json").write_text(json.dumps(m))
    from sed_runtime.backends import openvino_installed  # what auto runs a bundle with on the CPU

    cases["foreign onnx"] = (b, "OpenVINO cannot load" if openvino_installed() else "cannot be loaded by ONNX Runtime")
    for name, (path, message) in cases.items():
        r = run("sed-run", "infer", str(path), str(IMAGE), "--out", str(tmp_path / "o"), "--no-progress", env=env)
        assert r.returncode == 2, (name, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (name, r.stderr)
    assert not (tmp_path / "o").exists()


def test_embedding_size_mismatch_is_refused(bundle, env, monkeypatch):
    from sed_runtime.backends.ort_backend import OrtBackend
    from sed_runtime.errors import SedUserError
    from sed_runtime.text_cache import TextEmbeddingCache
    from sed_runtime.vocab import load_vocabulary

    monkeypatch.setenv("SED_CACHE_DIR", env["SED_CACHE_DIR"])
    monkeypatch.setattr(TextEmbeddingCache, "get", lambda self, key: np.ones((2, 80, 640), np.float32))
    with pytest.raises(SedUserError, match="needs N x 80 x 64"):
        OrtBackend(bundle).encode_text(load_vocabulary(classes="cat; dog"))


SHAPES_IMAGE = ROOT / "examples" / "images" / "shapes.jpg"


@pytest.fixture(scope="module")
def shapes_bundles(tmp_path_factory, env):
    """fp32 and fp16 bundles of the shipped trained model (sed-shapes) with its vocabulary."""
    root = tmp_path_factory.mktemp("shapes")
    for precision in ("fp32", "fp16"):
        r = run("sed-export", "build", "--model", "sed-shapes", "--vocab", "shapes", "--precision", precision,
                "--out", str(root / precision), "--no-progress", env=env)
        assert r.returncode == 0, r.stderr
    return root


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("topk", ["all", "8"])
def test_trained_bundle_passes_check(shapes_bundles, env, precision, topk):
    """On trained weights the check's rules hold without exceptions: fp16 >= 99% seg agreement, fp32 exact."""
    bundle = shapes_bundles / precision
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["weights"]["source"] == "shipped" and manifest["model"]["name"] == "sed-shapes"
    r = run("sed-export", "check", str(bundle), "--image", str(SHAPES_IMAGE), "--topk", topk, env=env)
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout + r.stderr
    assert f"precision            {precision}" in r.stdout


def test_bad_build_arguments(env, tmp_path):
    for args, message in [
        (["--classes", "cat", "--precision", "fp8"], "--precision"),
        (["--classes", "cat", "--engine", "tensorrt"], "TensorRT"),
        (["--precision", "fp32"], "--vocab"),
    ]:
        r = run("sed-export", "build", *args, "--out", str(tmp_path / "x"), env=env)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_low_memory_decoder_gives_identical_results(bundle, env, monkeypatch):
    """--low-memory only changes ONNX Runtime's allocator, never the numbers."""
    monkeypatch.setenv("SED_CACHE_DIR", env["SED_CACHE_DIR"])
    from sed_runtime.backends.ort_backend import OrtBackend
    from sed_runtime.pipeline import SedPipeline

    a = SedPipeline(OrtBackend(bundle), _bundle_vocab(bundle), topk=2, progress=False)(IMAGE)
    lean = OrtBackend(bundle, low_memory=True)
    assert lean.describe()["low_memory"] is True
    b = SedPipeline(lean, _bundle_vocab(bundle), topk=2, progress=False)(IMAGE)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.seg, b.seg)


def test_one_graph_decoder_hands_over_kept_only_rows(bundle, env, monkeypatch):
    """ONNX Runtime asks the one-graph decoder for `probs` (the last survivors' rows) instead of the N x h x w
    block; expanded, they are the block."""
    monkeypatch.setenv("SED_CACHE_DIR", env["SED_CACHE_DIR"])
    import onnxruntime as ort

    from sed_runtime.backends.ort_backend import OrtBackend
    from sed_runtime.preprocess import load_image

    backend = OrtBackend(bundle)
    features = backend.encode_image(backend.input_spec.preprocess(load_image(IMAGE)).tensor)
    text = backend.encode_text(_bundle_vocab(bundle), progress=False)
    result = backend.decode(features, text, 2)
    assert result.rows is not None and result.rows.tolist() == result.kept[2].tolist()
    assert result.scores.shape == (len(result.rows), 192, 192)
    session = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (block,) = session.run(["scores"], {**features.data, "text": text, "k": np.array([2], np.int64)})
    np.testing.assert_array_equal(result.full_scores(len(text)), block)


def _bundle_vocab(bundle):
    from sed_runtime.vocab import Vocabulary

    voc = json.loads((bundle / "manifest.json").read_text())["vocabulary"]
    return Vocabulary(voc["name"], tuple(voc["classes"]))


def _without_probs(bundle: Path, dst: Path) -> Path:
    """A copy of `bundle` as built before the decoder had its kept-only `probs` output (manifest kept consistent)."""
    import onnx

    from sed_runtime.bundle import sha256_file

    b = _copy(bundle, dst)
    model = onnx.load(str(b / "decoder.onnx"))
    kept = [o for o in model.graph.output if o.name != "probs"]
    assert len(kept) == len(model.graph.output) - 1
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(b / "decoder.onnx"))
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = {"sha256": sha256_file(b / "decoder.onnx"),
                                         "bytes": (b / "decoder.onnx").stat().st_size}
    graph = manifest["graphs"]["decoder"]
    graph["outputs"] = [o for o in graph["outputs"] if o["name"] != "probs"]
    (b / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return b


@pytest.mark.parametrize("backend_name", ["ort", "openvino"])
def test_bundles_from_before_kept_only_rows_give_the_same_result(bundle, env, monkeypatch, tmp_path, backend_name):
    """A decoder graph without `probs` still runs: the backend hands over the N x h x w block (no rows), and the
    pipeline's result is the same as with kept-only rows."""
    monkeypatch.setenv("SED_CACHE_DIR", env["SED_CACHE_DIR"])
    if backend_name == "openvino":
        need("openvino")
    from sed_runtime.backends import make_backend
    from sed_runtime.pipeline import SedPipeline
    from sed_runtime.preprocess import load_image

    old = _without_probs(bundle, tmp_path / "old")
    results = []
    for folder in (bundle, old):
        backend = make_backend(backend_name, bundle=folder)
        features = backend.encode_image(backend.input_spec.preprocess(load_image(IMAGE)).tensor)
        decoded = backend.decode(features, backend.encode_text(_bundle_vocab(folder), progress=False), 2)
        assert (decoded.rows is None) == (folder == old)
        results.append(SedPipeline(backend, _bundle_vocab(folder), topk=2, progress=False)(IMAGE))
    np.testing.assert_allclose(results[0].scores, results[1].scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(results[0].seg, results[1].seg)
