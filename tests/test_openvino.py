"""The OpenVINO backend (issue 13, item 3): a bundle's own ONNX files on OpenVINO's CPU plugin, behind the same
verbs; parity with the torch reference as for ONNX Runtime, one decoder compile per class count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need

need("openvino")
need("onnxruntime")

from sed_runtime.backends import make_backend
from sed_runtime.backends.openvino_backend import KEEP_COMPILED, OpenVinoBackend
from sed_runtime.errors import SedUserError
from sed_runtime.preprocess import load_image
from sed_runtime.scenes import SHAPES_CLASSES, generate_scene
from sed_runtime.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
IMAGE = ROOT / "examples" / "images" / "shapes.jpg"
SHAPES = Vocabulary("shapes", SHAPES_CLASSES)


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    """An fp32 bundle of the shipped trained sed-shapes (parity is judged in fp32, as for ONNX Runtime)."""
    need("torch")
    from sed_export.bundle import build_bundle

    out = tmp_path_factory.mktemp("ov") / "shapes-fp32"
    return build_bundle("sed-shapes", SHAPES, out, precision="fp32", progress=False, log=lambda *_: None)


def test_fp32_bundle_matches_the_torch_reference(fp32_bundle: Path) -> None:
    from sed_runtime.backends.torch_backend import TorchBackend

    ov, ref = OpenVinoBackend(fp32_bundle), TorchBackend("sed-shapes")
    text = ov.encode_text(SHAPES, progress=False)
    for index in range(3):
        scene = generate_scene(1000, index)
        image = ov.input_spec.preprocess(scene.image).tensor
        for k in (1, 8, None):
            a, b = ov.infer(image, text, k), ref.infer(image, text, k)
            n = len(text)  # the torch backend hands over the survivors' rows only: compare N x h x w forms
            assert float(np.abs(a.full_scores(n) - b.full_scores(n)).max()) <= 1e-3
            if k is not None:
                assert [x.tolist() for x in a.kept] == [x.tolist() for x in b.kept]  # type: ignore[union-attr]
            else:
                assert a.kept is None


def test_decoder_compiles_once_per_class_count() -> None:
    ov = OpenVinoBackend(DEMO_BUNDLE)
    image = ov.input_spec.preprocess(load_image(IMAGE)).tensor
    text = ov.encode_text(SHAPES, progress=False)
    feats = ov.encode_image(image)
    first = ov.decode(feats, text, 8)
    again = ov.decode(feats, text, 2)
    assert "decoder_compile" in first.timings_ms and "decoder_compile" not in again.timings_ms
    for n in range(2, 3 + KEEP_COMPILED):
        ov.decode(feats, text[:n], 1)
    assert len(ov._decoders) == KEEP_COMPILED  # older class counts were dropped
    assert set(ov.describe()["decoder_compile_ms"]) >= {"24", "2"}


def test_bf16_hint_runs_and_agrees() -> None:
    a, b = OpenVinoBackend(DEMO_BUNDLE), make_backend("openvino:bf16", bundle=DEMO_BUNDLE)
    assert b.precision == "bf16" and b.describe()["inference_precision"] == "bf16"  # type: ignore[attr-defined]
    image = a.input_spec.preprocess(load_image(IMAGE)).tensor
    text = a.encode_text(SHAPES, progress=False)
    sa, sb = a.infer(image, text, None).scores, b.infer(image, text, None).scores
    assert (sa.argmax(0) == sb.argmax(0)).mean() >= 0.98


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(SedUserError, match="fp32 or bf16"):
        OpenVinoBackend(DEMO_BUNDLE, precision="int4")
    with pytest.raises(SedUserError, match="runs a bundle"):
        make_backend("openvino")
    for bad in ("ort:bf16", "openvino:int8", "torch:bf16"):
        with pytest.raises(SedUserError, match="the only variant is openvino:bf16"):
            make_backend(bad, bundle=DEMO_BUNDLE)
    with pytest.raises(SedUserError, match="--device cuda is for --backend torch"):
        make_backend("openvino", bundle=DEMO_BUNDLE, device="cuda")


def test_sed_run_with_openvino_writes_what_ort_writes(tmp_path: Path) -> None:
    outs = {}
    for backend in ("openvino", "ort"):
        out = tmp_path / backend
        r = subprocess.run([str(Path(sys.executable).parent / "sed-run"), "infer", str(DEMO_BUNDLE), str(IMAGE),
                            "--backend", backend, "--out", str(out), "--no-progress"], capture_output=True, text=True,
                           env={**os.environ, "SED_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
        assert r.returncode == 0, r.stderr
        outs[backend] = (out / "shapes.json").read_text()
    import json

    ov, ort = json.loads(outs["openvino"]), json.loads(outs["ort"])
    assert ov["backend"] == "openvino"
    assert [c["name"] for c in ov["classes_present"]] == [c["name"] for c in ort["classes_present"]]


def test_auto_runs_a_bundle_on_openvino_unless_low_memory_asks_for_onnx_runtime():
    """Where the openvino extra is installed, `--backend auto` runs a bundle on it (measured faster than ONNX
    Runtime on the same bundles); --low-memory keeps ONNX Runtime's arena-less sessions."""
    from sed_runtime.backends import make_backend, openvino_installed
    from sed_runtime.backends.ort_backend import OrtBackend

    assert openvino_installed()
    assert make_backend("auto", bundle=DEMO_BUNDLE).name == "openvino"
    assert isinstance(make_backend("auto", bundle=DEMO_BUNDLE, low_memory=True), OrtBackend)
    assert make_backend("ort", bundle=DEMO_BUNDLE).name == "ort"
