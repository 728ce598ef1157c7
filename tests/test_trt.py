"""TensorRT: profiles, manifest checks, backend choice and bad inputs (pure Python, always run); real plan builds
with TensorRT-RTX on the CPU (marked tensorrt); the TensorRT backend on a GPU (marked gpu + tensorrt); mypy over
the TensorRT modules."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from needs import need

from sed_export.trt_profiles import (
    N_MAX,
    ClassRange,
    Profile,
    ShapeRange,
    check_classes,
    check_network_inputs,
    class_range,
    decoder_profile,
)
from sed_runtime.backends.cuda_memory import grow
from sed_runtime.backends.trt_env import current_gpu
from sed_runtime.backends.trt_plans import (
    EngineRecord,
    PlanRecord,
    TensorDesc,
    arch_runs_on,
    check_compute_capability,
    check_engines_here,
    check_files,
    check_version,
    choose_backend,
    parse_engines,
    plan_buffers,
    tensor_nbytes,
)
from sed_runtime.bundle import FORMAT, sha256_file
from sed_runtime.errors import SedUserError
from sed_runtime.split_decoder import SEGMENTS

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "astronaut.jpg"


def run(tool: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 with exactly one `error:` line and no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------------------


def test_class_range_covers_every_shipped_vocabulary():
    from sed_runtime.vocab import load_vocabulary

    for name in ("ade150", "ade847", "coco", "pc459", "pc59", "voc20", "voc20b"):
        n = len(load_vocabulary(name))
        r = class_range(n)
        assert (r.min, r.opt, r.max) == (1, n, N_MAX)
        check_classes(n, r.to_json())
    assert class_range(847).max >= 847


def test_class_range_refuses_a_vocabulary_beyond_max_classes():
    with pytest.raises(SedUserError, match="--max-classes 30"):
        class_range(30, n_max=20)
    with pytest.raises(SedUserError, match="empty"):
        class_range(0)


def test_decoder_profile_from_the_graph_shape():
    prof = decoder_profile(["N", 80, 64], ClassRange(1, 150, 1024))
    (text,), (k,) = prof.shapes, prof.values
    assert (text.name, text.min, text.opt, text.max) == ("text", (1, 80, 64), (150, 80, 64), (1024, 80, 64))
    assert (k.name, k.min, k.opt, k.max) == ("k", (1,), (8,), (1024,))
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))) == prof
    assert decoder_profile([-1, 80, 64], ClassRange(1, 3, 4)).values[0].opt == (3,)  # k opt clamped to opt N
    with pytest.raises(SedUserError, match="expected"):
        decoder_profile([5, 80, 64], ClassRange(1, 5, 10))
    with pytest.raises(ValueError):
        ShapeRange("x", (3,), (2,), (4,))


def test_split_decoder_profiles_from_the_segment_shapes():
    from sed_export.trt_profiles import split_decoder_profiles

    layer = {"x": ["M", 128, 24, 24], "cg": ["M", 80, 24, 24], "skip": [1, 32, 48, 48], "keep": ["K"]}
    shapes = {"decoder_pre": {"text": ["N", 80, 64], "dense": [1, 512, 24, 24]},
              **{s: layer for s in SEGMENTS[1:]}}
    prof = split_decoder_profiles(shapes, class_range(150))
    assert set(prof) == set(SEGMENTS)
    (text,) = prof["decoder_pre"].shapes
    assert text.name == "text" and text.min == (1, 80, 64) and text.opt == (150, 80, 64) and text.max == (1024, 80, 64)
    x1 = {r.name: r for r in prof["decoder1"].shapes}
    assert x1["x"].opt == (150, 128, 24, 24) and x1["keep"].opt == (64,) and x1["keep"].max == (1024,)
    x2 = {r.name: r for r in prof["decoder2"].shapes}  # later layers see what CER kept: tuned for 64 rows
    assert x2["cg"].min == (1, 80, 24, 24) and x2["cg"].opt == (64, 80, 24, 24) and x2["x"].max[0] == 1024
    small = split_decoder_profiles(shapes, class_range(5))
    assert {r.name: r.opt for r in small["decoder3"].shapes}["keep"] == (5,)
    check_network_inputs({"x": [-1, 128, 24, 24], "cg": [-1, 80, 24, 24], "skip": [1, 32, 48, 48], "keep": [-1]},
                         [], [prof["decoder1"]], "decoder1.onnx")
    with pytest.raises(SedUserError, match="expected only axis 0 dynamic"):
        split_decoder_profiles({**shapes, "decoder1": {**layer, "x": ["M", "C", 24, 24]}}, class_range(5))


def test_chunked_plans_get_a_static_profile_per_power_of_two_chunk():
    """The chunked plans' sizes are exactly the sizes the runner hands out for a power-of-two chunk (so every chunk
    meets a built profile), and only the inputs with a class axis get ranges."""
    from sed_export.trt_profiles import chunk_sizes, chunked_decoder_profiles
    from sed_runtime.chunked_decoder import chunk_spans

    assert chunk_sizes(64) == (1, 2, 4, 8, 16, 32, 64) and chunk_sizes(1) == (1,) and chunk_sizes(100)[-1] == 64
    for n in (1, 7, 63, 64, 65, 847):
        assert {rows for _, rows in chunk_spans(n, 64, fixed_sizes=True)} <= set(chunk_sizes(64))
    with pytest.raises(SedUserError, match="--max-chunk must be >= 1"):
        chunk_sizes(-3)
    shapes = {"chunk_skips": {"res4": [1, 768, 24, 24]},
              "chunk_stats1": {"x": ["T", 128, 24, 24], "total": [1]},
              "chunk_apply1": {"y": ["T", 128, 24, 24], "cg": ["T", 80, 24, 24], "skip": [1, 64, 48, 48],
                               "kv": [1, 4, 32, 32, 576], "ksum": [1, 4, 32, 576], "total": [1]}}
    prof = chunked_decoder_profiles(shapes, (1, 2, 4))
    assert prof["chunk_skips"] == []  # per image: nothing dynamic
    assert [p.shapes[0].min for p in prof["chunk_stats1"]] == [(1, 128, 24, 24), (2, 128, 24, 24), (4, 128, 24, 24)]
    four = {r.name: r for r in prof["chunk_apply1"][2].shapes}
    assert set(four) == {"y", "cg"} and four["cg"].min == four["cg"].opt == four["cg"].max == (4, 80, 24, 24)
    check_network_inputs({n: [-1 if d == "T" else d for d in s] for n, s in shapes["chunk_apply1"].items()}, [],
                         prof["chunk_apply1"], "chunk_apply1.onnx")


def test_network_inputs_need_a_range_for_every_dynamic_axis():
    prof = decoder_profile(["N", 80, 64], ClassRange(1, 20, 1024))
    inputs = {"dense": [1, 64, 24, 24], "text": [-1, 80, 64], "k": [1]}
    check_network_inputs(inputs, ["k"], [prof], "decoder.onnx")
    with pytest.raises(SedUserError, match="no profile range"):
        check_network_inputs({**inputs, "res4": [-1, 3]}, ["k"], [prof], "decoder.onnx")
    with pytest.raises(SedUserError, match="fixes it to 512"):
        check_network_inputs({**inputs, "text": [-1, 80, 512]}, ["k"], [prof], "decoder.onnx")
    with pytest.raises(SedUserError, match="shape input 'k'"):
        check_network_inputs(inputs, ["k"], [Profile(shapes=prof.shapes)], "decoder.onnx")
    with pytest.raises(SedUserError, match="no optimisation profile"):
        check_network_inputs(inputs, [], [], "decoder.onnx")
    check_network_inputs({"image": [1, 3, 768, 768]}, [], [], "encoder.onnx")


def test_out_of_profile_message_names_the_fix():
    with pytest.raises(SedUserError) as e:
        check_classes(1500, {"min": 1, "opt": 20, "max": 1024}, "decoder.plan")
    msg = str(e.value)
    assert "1500 classes" in msg and "1..1024" in msg and "--max-classes 1500" in msg and "--backend ort" in msg


# ---------------------------------------------------------------------------------------------------------------
# Runtime checks (pure Python)
# ---------------------------------------------------------------------------------------------------------------


def engines_section(**over):
    sec = {
        "engine": "tensorrt",
        "builder": {"module": "tensorrt", "version": "10.13.0.35"},
        "precision": "fp16",
        "compute_capability": "8.6",
        "classes": {"min": 1, "opt": 150, "max": 1024},
        "plugins": [],
        "plans": {
            "encoder": {"file": "encoder.plan", "sha256": "0" * 64, "bytes": 10},
            "decoder": {"file": "decoder.plan", "sha256": "0" * 64, "bytes": 10},
        },
    }
    sec.update(over)
    return sec


def record(**over) -> EngineRecord:
    return parse_engines({"engines": engines_section(**over)})


def test_parse_engines():
    rec = record()
    assert rec.engine == "tensorrt" and rec.version == "10.13.0.35" and rec.compute_capability == "8.6"
    assert rec.plans["decoder"].file == "decoder.plan" and rec.classes["max"] == 1024
    with pytest.raises(SedUserError, match="no TensorRT plans"):
        parse_engines({"engine": "onnx"})
    with pytest.raises(SedUserError, match="malformed"):
        parse_engines({"engines": {"engine": "tensorrt", "plans": {}}})
    with pytest.raises(SedUserError, match="unknown engine"):
        record(engine="tensorflow")


def test_parse_engines_of_a_split_decoder():
    seg = {"file": "decoder_split/x.plan", "sha256": "0" * 64, "bytes": 10}
    plans = {"encoder": seg, **{s: {**seg, "file": f"decoder_split/{s}.plan"} for s in SEGMENTS}}
    lib = {"file": "plugins/libsed_topk_union.so", "sha256": "1" * 64, "bytes": 5}
    rec = record(cer="split", plans=plans, kernel=lib)
    assert rec.decoder_roles == SEGMENTS and rec.plans["decoder2"].file == "decoder_split/decoder2.plan"
    assert rec.kernel is not None and rec.kernel.file == "plugins/libsed_topk_union.so"
    assert record(cer="split", plans=plans, kernel=None).kernel is None  # the host rule runs CER
    assert record().decoder_roles == ("decoder",) and record().cer == "standard-ops"
    with pytest.raises(SedUserError, match="malformed"):  # a split manifest without its segment plans
        record(cer="split")
    with pytest.raises(SedUserError, match="unknown CER mode 'magic'"):
        record(cer="magic")


def test_parse_engines_with_chunked_plans():
    from sed_runtime.chunked_decoder import SEGMENTS as CHUNKED

    plan = {"file": "x.plan", "sha256": "0" * 64, "bytes": 10}
    sec = engines_section()
    plans = {**sec["plans"], **{s: {**plan, "file": f"decoder_chunked/{s}.plan"} for s in CHUNKED}}
    rec = record(plans=plans, chunk_sizes=[1, 2, 4, 8])
    assert rec.chunk_sizes == (1, 2, 4, 8) and rec.chunked_roles == CHUNKED
    assert rec.plans["chunk_apply3"].file == "decoder_chunked/chunk_apply3.plan"
    assert record().chunk_sizes == () and record().chunked_roles == ()  # built with --max-chunk 0, or before
    with pytest.raises(SedUserError, match="malformed"):  # chunk sizes recorded but the plans missing
        record(chunk_sizes=[1, 2])
    with pytest.raises(SedUserError, match="not all >= 1"):
        record(plans=plans, chunk_sizes=[0, 2])
    from sed_runtime.backends.trt_plans import plan_chunk

    # the chunk the memory budget allows, rounded down to a size the plans were built for
    assert [plan_chunk(rec, c) for c in (1, 7, 8, 47, 1000)] == [1, 4, 8, 8, 8]
    assert plan_chunk(record(plans=plans, chunk_sizes=[4, 8]), 2) == 4  # below every size: the smallest
    with pytest.raises(SedUserError, match="no class-chunked decoder plans.*--max-chunk 0"):
        plan_chunk(record(), 16)


def test_version_mismatch_names_both_versions():
    check_version(record(), "tensorrt", "10.13.0.35")
    with pytest.raises(SedUserError) as e:
        check_version(record(), "tensorrt", "10.16.0.72")
    assert "TensorRT 10.13.0.35" in str(e.value) and "10.16.0.72 is installed" in str(e.value)
    with pytest.raises(SedUserError, match="TensorRT-RTX 1.7.1.116"):
        check_version(record(engine="tensorrt-rtx", builder={"version": "1.7.1.116"}), "tensorrt_rtx_bindings", "1.8")


def test_compute_capability_checks():
    check_compute_capability(record(), "8.6")
    with pytest.raises(SedUserError) as e:
        check_compute_capability(record(), "9.0", "NVIDIA H100")
    assert "built for compute capability 8.6 but NVIDIA H100 is 9.0" in str(e.value)
    rtx = record(engine="tensorrt-rtx", compute_capability=None)
    check_compute_capability(rtx, "8.9")
    check_compute_capability(rtx, "12.0")
    with pytest.raises(SedUserError, match="8.0 or newer"):
        check_compute_capability(rtx, "7.5")


def test_plan_files_missing_truncated_or_modified(tmp_path):
    data = b"x" * 100
    (tmp_path / "a.plan").write_bytes(data)
    good = PlanRecord("a.plan", sha256_file(tmp_path / "a.plan"), 100)
    check_files(tmp_path, [good], "plan")
    with pytest.raises(SedUserError, match="truncated \\(60 of 100 bytes\\)"):
        (tmp_path / "a.plan").write_bytes(data[:60])
        check_files(tmp_path, [good], "plan")
    with pytest.raises(SedUserError, match="sha256"):
        (tmp_path / "a.plan").write_bytes(b"y" * 100)
        check_files(tmp_path, [good], "plan")
    with pytest.raises(SedUserError, match="plugin library .*libsed.so is missing"):
        check_files(tmp_path, [PlanRecord("plugins/libsed.so", "0", 1)], "plugin library")


def test_plan_already_hashed_by_bundle_verify_is_not_hashed_again(tmp_path, monkeypatch):
    import sed_runtime.backends.trt_plans as tb

    (tmp_path / "a.plan").write_bytes(b"x" * 100)
    rec = PlanRecord("a.plan", sha256_file(tmp_path / "a.plan"), 100)

    def no_hashing(_path):
        raise AssertionError("hashed twice")

    monkeypatch.setattr(tb, "sha256_file", no_hashing)
    check_files(tmp_path, [rec], "plan", {"a.plan": {"sha256": rec.sha256, "bytes": 100}})
    with pytest.raises(AssertionError, match="hashed twice"):  # a different manifest hash: check it
        check_files(tmp_path, [rec], "plan", {"a.plan": {"sha256": "0" * 64, "bytes": 100}})


def test_auto_backend_choice():
    assert choose_backend(False, True, True) == ("ort", None)
    assert choose_backend(True, True, True) == ("trt", None)
    assert choose_backend(True, False, True)[0] == "ort" and "not installed" in choose_backend(True, False, True)[1]
    assert choose_backend(True, True, False)[0] == "ort" and "no CUDA GPU" in choose_backend(True, True, False)[1]


def test_buffer_planning():
    assert tensor_nbytes((2, 3), 4) == 24 and tensor_nbytes((0, 5), 4) == 1
    with pytest.raises(ValueError):
        tensor_nbytes((-1, 3), 4)
    plan = plan_buffers([
        TensorDesc("text", True, (20, 80, 64), 4),
        TensorDesc("k", True, (1,), 8, on_host=True),
        TensorDesc("scores", False, (20, 192, 192), 4),
        TensorDesc("kept0", False, (-1,), 8),
    ])
    assert plan.inputs == {"text": 20 * 80 * 64 * 4} and plan.outputs == {"scores": 20 * 192 * 192 * 4}
    assert plan.dynamic == ["kept0"]
    with pytest.raises(ValueError):
        plan_buffers([TensorDesc("text", True, (-1, 80, 64), 4)])
    assert grow(0, 10) == 10 and grow(10, 5) == 10 and grow(10, 11) == 20 and grow(10, 50) == 50
    assert grow(100, 101, 1.25) == 125


def test_plugin_decoder_k_on_the_device_is_never_rebound_as_an_output():
    """Review finding 1: with `--cer plugin`, k is a device input the backend writes; the output-binding loop
    took every static tensor, handed k a fresh unwritten buffer and the plugin read garbage."""
    from sed_runtime.backends.trt_backend import decoder_output_buffers

    plan = plan_buffers([
        TensorDesc("dense", True, (1, 64, 24, 24), 4),
        TensorDesc("text", True, (20, 80, 64), 4),
        TensorDesc("k", True, (1,), 8),  # plugin decoder: a device tensor, not a shape input
        TensorDesc("scores", False, (20, 192, 192), 4),
        TensorDesc("kept0", False, (-1,), 8),
    ])
    assert decoder_output_buffers(plan) == {"scores": 20 * 192 * 192 * 4}


def test_a_plugin_library_is_registered_once_per_process(tmp_path):
    """Review finding 5: a second TrtBackend in one process reloaded the plugin library and failed."""
    from sed_runtime.backends import trt_env

    class Registry:
        def __init__(self):
            self.loads = []

        def load_library(self, path):
            if self.loads:  # TensorRT: creators already registered -> None
                return None
            self.loads.append(path)
            return object()

    trt = types.SimpleNamespace(__name__="fake_tensorrt_once")
    reg = Registry()
    lib = PlanRecord("plugins/libsed_topk_union_plugin.so", "a" * 64, 10)
    trt_env.load_plugin_library(trt, reg, tmp_path / "b1" / lib.file, lib)
    trt_env.load_plugin_library(trt, reg, tmp_path / "b2" / lib.file, lib)  # another bundle, same library
    assert len(reg.loads) == 1
    other = PlanRecord(lib.file, "b" * 64, 10)  # a different build of the same plugin: TensorRT refuses it
    with pytest.raises(SedUserError, match="another build of it is loaded already from .*b1"):
        trt_env.load_plugin_library(trt, reg, tmp_path / "b3" / lib.file, other)


def test_auto_falls_back_to_ort_for_plans_of_another_tensorrt_or_gpu(tmp_path, monkeypatch):
    """Review finding 5: `--backend auto` picked trt for plans it cannot run (README promised a fallback)."""
    from sed_runtime.backends import trt_env

    (tmp_path / "manifest.json").write_text(json.dumps({"engines": engines_section()}))
    monkeypatch.setattr(trt_env.Bundle, "open", staticmethod(
        lambda root, verify=False: types.SimpleNamespace(manifest=json.loads((root / "manifest.json").read_text()))))
    fake = types.SimpleNamespace(__name__="tensorrt", __version__="10.13.0.35", Runtime=object)
    monkeypatch.setattr(trt_env, "runtime_module", lambda engine: fake)
    monkeypatch.setattr(trt_env, "trt_available", lambda engine: True)
    monkeypatch.setattr(trt_env, "current_gpu", lambda: {"name": "RTX A6000", "compute_capability": "8.6"})
    assert trt_env.auto_backend(tmp_path) == ("trt", None)
    monkeypatch.setattr(trt_env, "current_gpu", lambda: {"name": "H200", "compute_capability": "9.0"})
    choice, why = trt_env.auto_backend(tmp_path)
    assert choice == "ort" and "compute capability 8.6" in why and "H200" in why
    fake.__version__ = "10.14.1"
    monkeypatch.setattr(trt_env, "current_gpu", lambda: {"name": "RTX A6000", "compute_capability": "8.6"})
    choice, why = trt_env.auto_backend(tmp_path)
    assert choice == "ort" and "10.13.0.35" in why and "10.14.1" in why


def test_text_fingerprint_sees_in_place_edits_and_shapes():
    from sed_runtime.backends.trt_backend import text_fingerprint

    a = np.random.default_rng(0).standard_normal((20, 80, 64)).astype(np.float32)
    before = text_fingerprint(a)
    assert text_fingerprint(a.copy()) == before
    a[0, 0, 0] += 1.0  # the first element is always sampled
    assert text_fingerprint(a) != before
    assert text_fingerprint(a.reshape(80, 20, 64)) != text_fingerprint(a)


def test_library_architectures():
    assert arch_runs_on("80,86,90", "8.6") and arch_runs_on("80,86,90", "8.9") and arch_runs_on("80,86,90", "9.0")
    assert arch_runs_on("80", "12.0")  # PTX of sm_80 JIT-compiles on newer GPUs
    assert not arch_runs_on("80,86,90", "7.5")  # Turing: rebuild with 75
    assert not arch_runs_on("86-real", "8.0") and not arch_runs_on("90-real", "10.0")
    assert arch_runs_on("native", "7.5")  # unreadable: the load decides
    seg = {"file": "x.plan", "sha256": "0" * 64, "bytes": 10}
    plans = {"encoder": seg, **{s: seg for s in SEGMENTS}}
    rec = record(cer="split", plans=plans, compute_capability="8.0",
                 kernel={"file": "k.so", "sha256": "0", "bytes": 1, "cuda_archs": "86-real,90-real"})
    assert rec.kernel is not None and rec.kernel.cuda_archs == "86-real,90-real"
    a100 = {"name": "A100", "compute_capability": "8.0"}
    with pytest.raises(SedUserError, match=r"kernel library k.so was compiled for CUDA architectures 86-real"):
        check_engines_here(rec, "tensorrt", "10.13.0.35", a100)
    ok = record(cer="split", plans=plans, compute_capability="8.0",
                kernel={"file": "k.so", "sha256": "0", "bytes": 1, "cuda_archs": "80,86,90"})
    check_engines_here(ok, "tensorrt", "10.13.0.35", a100)


def test_import_trt_refuses_an_empty_namespace_package(monkeypatch):
    from sed_export import trt_build

    monkeypatch.setattr(trt_build.importlib, "import_module", lambda name: types.ModuleType(name))
    with pytest.raises(SedUserError, match=r"TensorRT \(module tensorrt\) is not installed"):
        trt_build.import_trt("tensorrt")
    assert trt_build.resolve_engine("auto").engine is None
    assert "not installed" in (trt_build.resolve_engine("auto").note or "")
    with pytest.raises(SedUserError, match="not installed"):
        trt_build.resolve_engine("tensorrt")
    assert trt_build.resolve_engine("onnx") == trt_build.EngineChoice(None)
    with pytest.raises(SedUserError, match="--engine must be one of"):
        trt_build.resolve_engine("tflite")


def test_timing_cache_file_is_keyed_by_version_and_gpu(tmp_path):
    from sed_export.trt_build import timing_cache_file

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    path = timing_cache_file(tmp_path, trt, {"name": "x", "compute_capability": "8.6"})
    assert path == tmp_path / "tensorrt-10.13.0.35-sm86.cache"


# ---------------------------------------------------------------------------------------------------------------
# Bad input through the CLIs (fake bundle: no torch, no TensorRT call)
# ---------------------------------------------------------------------------------------------------------------


def fake_bundle(root: Path, **engines_over) -> Path:
    root.mkdir(parents=True)
    for name in ("encoder.plan", "decoder.plan"):
        (root / name).write_bytes(b"plan-bytes")
    plans = {
        role: {"file": f"{role}.plan", "sha256": sha256_file(root / f"{role}.plan"), "bytes": 10}
        for role in ("encoder", "decoder")
    }
    manifest = {
        "format": FORMAT,
        "model": {"name": "sed-tiny", "clip": {"embed_dim": 64}},
        "precision": "fp32",
        "graphs": {},
        "files": {},  # the plan checks of the backend, not the bundle's, are under test
        "input": {"input_size": 768, "min_size": 640, "max_size": 2560, "pixel_mean": [0, 0, 0],
                  "pixel_std": [1, 1, 1]},
        "templates": ["a photo of a {}."],
        "weights": {"source": "random"},
        "vocabulary": {"name": "two", "classes": ["cat", "dog"]},
        "engine": "tensorrt",
        "engines": engines_section(plans=plans, **engines_over),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def infer(bundle_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("sed-run", "infer", str(bundle_path), str(IMAGE), "--out", str(out), "--no-progress", *extra)


def test_cli_trt_backend_without_tensorrt_or_gpu_is_one_line(tmp_path):
    b = fake_bundle(tmp_path / "b")
    line = one_error_line(infer(b / "encoder.plan", tmp_path / "o", "--backend", "trt"))
    assert "tensorrt" in line.lower() and "--backend ort" in line


def test_cli_truncated_plan_is_one_line(tmp_path):
    b = fake_bundle(tmp_path / "b")
    (b / "decoder.plan").write_bytes(b"plan")
    line = one_error_line(infer(b, tmp_path / "o", "--backend", "trt"))
    assert "decoder.plan is truncated (4 of 10 bytes)" in line


def test_cli_missing_plugin_library_is_one_line(tmp_path):
    b = fake_bundle(tmp_path / "b", plugins=[{"file": "plugins/libsed_topk_union.so", "sha256": "0", "bytes": 5}])
    line = one_error_line(infer(b, tmp_path / "o", "--backend", "trt"))
    assert "plugin library" in line and "libsed_topk_union.so is missing" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="tensorrt_rtx_bindings absent")
def test_cli_plan_from_another_tensorrt_version_is_one_line(tmp_path):
    b = fake_bundle(tmp_path / "b", engine="tensorrt-rtx", compute_capability=None,
                    builder={"module": "tensorrt_rtx_bindings", "version": "1.0.0.1"})
    line = one_error_line(infer(b, tmp_path / "o", "--backend", "trt"))
    assert "built by TensorRT-RTX 1.0.0.1" in line and "is installed" in line


def test_cli_no_plans_is_one_line(tmp_path):
    b = fake_bundle(tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    del m["engines"]
    (b / "manifest.json").write_text(json.dumps(m))
    assert "no TensorRT plans" in one_error_line(infer(b, tmp_path / "o", "--backend", "trt"))


def test_cli_build_refuses_bad_engine_options_before_exporting(tmp_path):
    out = tmp_path / "never"
    assert "--engine must be one of" in one_error_line(
        run("sed-export", "build", "--vocab", "voc20", "--engine", "tflite", "--out", str(out)))
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt-rtx",
                                  "--max-classes", "10", "--out", str(out)))
        assert "20 classes" in line and "--max-classes 20" in line
        line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt-rtx",
                                  "--plugin-lib", str(tmp_path / "nope.so"), "--out", str(out)))
        assert "nope.so not found" in line
        line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt-rtx",
                                  "--cer", "split", "--kernel-lib", str(tmp_path / "nope.so"), "--out", str(out)))
        assert "--kernel-lib" in line and "nope.so not found" in line
        line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt-rtx",
                                  "--cer", "plugin", "--out", str(out)))
        assert "--cer plugin needs --plugin-lib" in line
        line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt-rtx",
                                  "--kernel-lib", str(tmp_path / "nope.so"), "--out", str(out)))
        assert "--kernel-lib is only used with --cer split" in line
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "onnx", "--plugin-lib",
                              str(tmp_path / "nope.so"), "--out", str(out)))
    assert "--plugin-lib" in line
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "onnx", "--cer", "split",
                              "--out", str(out)))
    assert "--cer split shapes TensorRT plans" in line and "--engine tensorrt" in line
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--cer", "magic", "--out", str(out)))
    assert "--cer must be one of" in line
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--max-chunk", "-4", "--out", str(out)))
    assert "--max-chunk must be >= 1" in line
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "onnx", "--max-chunk", "32",
                              "--out", str(out)))
    assert "--max-chunk shapes TensorRT plans" in line
    assert not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and hasattr(__import__("tensorrt"), "Builder"),
    reason="real TensorRT is installed here",
)
def test_cli_build_engine_tensorrt_without_tensorrt_is_one_line(tmp_path):
    out = tmp_path / "never"
    line = one_error_line(run("sed-export", "build", "--vocab", "voc20", "--engine", "tensorrt", "--out", str(out)))
    assert "TensorRT (module tensorrt) is not installed" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# TensorRT-RTX: real plans built on the CPU
# ---------------------------------------------------------------------------------------------------------------

rtx_missing = importlib.util.find_spec("tensorrt_rtx_bindings") is None
needs_rtx = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(rtx_missing, reason="tensorrt_rtx_bindings not installed (pip install 'sed-deploy[rtx]')"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"SED_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def rtx_bundle(request, tmp_path_factory, env):
    if rtx_missing:
        pytest.skip("tensorrt_rtx_bindings not installed (pip install 'sed-deploy[rtx]')")
    need("torch")
    need("onnx")
    out = tmp_path_factory.mktemp("engines") / f"tiny-{request.param}"
    r = run("sed-export", "build", "--classes", "sky; grass; person; dog; building", "--precision", request.param,
            "--engine", "tensorrt-rtx", "--out", str(out), "--no-progress", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "encoder.plan" in r.stdout and "decoder.plan" in r.stdout
    return out, request.param


@pytest.mark.tensorrt
def test_rtx_bundle_manifest_and_plan_hashes(rtx_bundle):
    out, precision = rtx_bundle
    m = json.loads((out / "manifest.json").read_text())
    eng = m["engines"]
    assert m["engine"] == eng["engine"] == "tensorrt-rtx" and eng["precision"] == m["precision"] == precision
    assert eng["builder"]["module"] == "tensorrt_rtx_bindings" and re.match(r"\d+\.\d+", eng["builder"]["version"])
    assert eng["compute_capability"] is None and eng["timing_cache"] is None and eng["cer"] == "standard-ops"
    assert eng["classes"] == {"min": 1, "opt": 5, "max": 1024}
    for role in ("encoder", "decoder"):
        plan = eng["plans"][role]
        path = out / plan["file"]
        assert plan["file"] == f"{role}.plan" and plan["onnx"] == f"{role}.onnx"
        assert path.stat().st_size == plan["bytes"] > 1_000_000 and sha256_file(path) == plan["sha256"]
        assert m["files"][plan["file"]]["sha256"] == plan["sha256"]
    (dec_profile,) = eng["plans"]["decoder"]["profiles"]
    assert dec_profile["shapes"]["text"] == {"min": [1, 80, 64], "opt": [5, 80, 64], "max": [1024, 80, 64]}
    assert dec_profile["values"]["k"] == {"min": [1], "opt": [5], "max": [1024]}
    assert eng["plans"]["encoder"]["profiles"] == []
    # the class-chunked plans (default --max-chunk 64): one static profile per power-of-two chunk size
    from sed_runtime.chunked_decoder import SEGMENTS as CHUNKED

    assert eng["chunk_sizes"] == [1, 2, 4, 8, 16, 32, 64]
    for seg in CHUNKED:
        plan = eng["plans"][seg]
        assert plan["file"] == f"decoder_chunked/{seg}.plan" and plan["onnx"] == m["graphs"][seg]["file"]
        assert m["files"][plan["file"]]["sha256"] == plan["sha256"] == sha256_file(out / plan["file"])
        assert len(plan["profiles"]) == (0 if seg == "chunk_skips" else 7)
    rows = [p["shapes"]["y"]["min"][0] for p in eng["plans"]["chunk_apply2"]["profiles"]]
    assert rows == eng["chunk_sizes"] and eng["plans"]["chunk_apply2"]["profiles"][3]["shapes"]["cg"]["max"][0] == 8
    assert parse_engines(m).chunked_roles == CHUNKED
    parse_engines(m)  # the runtime accepts what the builder wrote
    assert not list(out.parent.glob(".*"))  # no temporary folders or caches left beside the bundle


@pytest.mark.tensorrt
def test_rtx_bundle_runs_with_ort_when_no_gpu_and_resolves_from_a_plan(rtx_bundle, env, tmp_path):
    out, precision = rtx_bundle
    if precision != "fp32":
        pytest.skip("the fallback path is the same for fp16; run once to keep CI short")
    if current_gpu() is not None:
        pytest.skip("a GPU is visible: auto may pick the TensorRT backend")
    r = run("sed-run", "infer", str(out / "encoder.plan"), str(IMAGE), "--out", str(tmp_path), "--no-progress",
            env=env)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stderr
    from sed_runtime.backends import openvino_installed

    cpu_backend = "openvino" if openvino_installed() else "ort"  # what auto runs a bundle with on the CPU
    assert json.loads((tmp_path / "astronaut.json").read_text())["backend"] == cpu_backend
    assert f"(--backend {cpu_backend})" in r.stderr


@pytest.mark.tensorrt
def test_rtx_truncated_plan_is_refused_before_tensorrt(rtx_bundle, tmp_path):
    out, _ = rtx_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / "decoder.plan").read_bytes()
    (copy / "decoder.plan").write_bytes(data[: len(data) // 2])
    line = one_error_line(infer(copy, tmp_path / "o", "--backend", "trt"))
    assert "decoder.plan" in line and "truncated" in line


def _kernel_library(build: Path) -> Path:
    """libsed_topk_union.so for one architecture (about 15 s); skips, saying why, without cmake and nvcc."""
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not on PATH: the split bundle with the kernel library cannot be built")
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}
    for cmd in ([cmake, "-S", str(ROOT / "kernels"), "-B", str(build), "-DTENSORRT_ROOT=/nonexistent",
                 "-DCMAKE_CUDA_ARCHITECTURES=86"], [cmake, "--build", str(build), "--target", "sed_topk_union"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    return build / "libsed_topk_union.so"


@pytest.mark.tensorrt
def test_rtx_builds_the_split_decoder_for_real(tmp_path, env):
    """--cer split: TensorRT-RTX builds the four segment plans, with the kernel library and its architectures
    recorded (the host-rule variant differs only in not copying the library)."""
    if rtx_missing:
        pytest.skip("tensorrt_rtx_bindings not installed (pip install 'sed-deploy[rtx]')")
    need("torch")
    lib = _kernel_library(tmp_path / "kernels")
    out = tmp_path / "split"
    cmd = ["sed-export", "build", "--classes", "sky; grass; person; dog; building", "--engine", "tensorrt-rtx",
           "--cer", "split", "--out", str(out), "--no-progress", "--kernel-lib", str(lib), "--max-chunk", "0"]
    r = run(*cmd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "manifest.json").read_text())
    eng = m["engines"]
    # --max-chunk 0: no class-chunked plans (their ONNX stays, for ONNX Runtime and OpenVINO)
    assert eng["cer"] == "split" and set(eng["plans"]) == {"encoder", *SEGMENTS} and eng["chunk_sizes"] == []
    assert "chunk_pre" in m["graphs"] and not (out / "decoder_chunked" / "chunk_pre.plan").exists()
    for seg in SEGMENTS:
        plan = eng["plans"][seg]
        assert plan["file"] == f"decoder_split/{seg}.plan" and plan["onnx"] == m["graphs"][seg]["file"]
        assert (out / plan["file"]).stat().st_size == plan["bytes"] > 100_000
        assert m["files"][plan["file"]]["sha256"] == plan["sha256"] == sha256_file(out / plan["file"])
    assert eng["plans"]["decoder_pre"]["profiles"][0]["shapes"]["text"]["max"] == [1024, 80, 64]
    assert eng["plans"]["decoder2"]["profiles"][0]["shapes"]["keep"] == {"min": [1], "opt": [5], "max": [1024]}
    assert "decoder.plan" not in m["files"] and "decoder.onnx" in m["files"]  # the ORT twin stays
    assert eng["kernel"]["file"] == "plugins/libsed_topk_union.so" and "the CUDA kernel" in r.stdout
    assert m["files"][eng["kernel"]["file"]]["sha256"] == eng["kernel"]["sha256"]
    assert eng["kernel"]["cuda_archs"] == "86"  # read from the library's marker, checked against the GPU at load
    assert eng["device_memory"] == {}  # TensorRT-RTX plans deserialise only on a GPU: not known at build time
    rec = parse_engines(m)
    assert rec.decoder_roles == SEGMENTS and rec.kernel is not None
    check_files(out, [*rec.plans.values(), rec.kernel], "plan")


@pytest.mark.tensorrt
def test_rtx_plans_deserialise_with_the_rtx_runtime(rtx_bundle):
    if current_gpu() is None:
        pytest.skip("TensorRT-RTX 1.7 deserialises plans only with a CUDA GPU and driver (checked: without one, "
                    "deserialize_cuda_engine returns None after cudaError 35)")
    import tensorrt_rtx_bindings as trt

    out, _ = rtx_bundle
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for role in ("encoder", "decoder"):
        assert runtime.deserialize_cuda_engine((out / f"{role}.plan").read_bytes()) is not None


@pytest.mark.tensorrt
@pytest.mark.skipif(rtx_missing, reason="tensorrt_rtx_bindings not installed")
def test_rtx_builder_reports_parser_and_build_errors_in_one_line(tmp_path):
    import tensorrt_rtx_bindings as trt

    from sed_export.trt_build import build_engine

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(SedUserError, match="cannot parse bad.onnx"):
        build_engine(trt, bad, tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()


# ---------------------------------------------------------------------------------------------------------------
# The TensorRT backend on a GPU
# ---------------------------------------------------------------------------------------------------------------


def _real_tensorrt() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _real_tensorrt() or current_gpu() is None,
                    reason="needs TensorRT (tensorrt with a Builder) and a CUDA GPU visible to cuda-python")
def test_trt_backend_matches_ort_on_gpu(tmp_path):
    env = {"SED_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "tiny"
    r = run("sed-export", "build", "--classes", "sky; grass; person; dog; building", "--engine", "tensorrt",
            "--out", str(out), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    import numpy as np

    for backend in ("trt", "ort"):
        r = run("sed-run", "infer", str(out / "encoder.plan"), str(IMAGE), "--backend", backend, "--topk", "2",
                "--save-npz", "--out", str(tmp_path / backend), "--no-progress", env=env)
        assert r.returncode == 0, r.stderr
    a, b = np.load(tmp_path / "trt" / "astronaut.npz"), np.load(tmp_path / "ort" / "astronaut.npz")
    np.testing.assert_allclose(a["scores"], b["scores"], atol=2e-3)
    for i in range(3):
        np.testing.assert_array_equal(a[f"kept{i}"], b[f"kept{i}"])
    # the class-chunked plans, forced by a device budget far below the one-pass peak of 150 classes
    r = run("sed-run", "infer", str(out / "encoder.plan"), str(IMAGE), "--backend", "trt", "--vocab", "ade150",
            "--topk", "all", "--max-memory", "0.3", "--save-npz", "--out", str(tmp_path / "chunked"), "--no-progress",
            env=env)
    assert r.returncode == 0, r.stderr
    assert "class-chunked plans" in r.stderr
    r = run("sed-run", "infer", str(out / "encoder.plan"), str(IMAGE), "--backend", "ort", "--vocab", "ade150",
            "--topk", "all", "--save-npz", "--out", str(tmp_path / "one-pass"), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    c, d = np.load(tmp_path / "chunked" / "astronaut.npz"), np.load(tmp_path / "one-pass" / "astronaut.npz")
    np.testing.assert_allclose(c["scores"], d["scores"], atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------------------------


def _patched_stubs(dest: Path) -> Path | None:
    """tensorrt-stubs 10.13 ships invalid Python (`in:` parameters, a required arg after defaults): fix a copy."""
    import importlib.metadata as md

    try:
        dist = md.distribution("tensorrt-stubs")
    except md.PackageNotFoundError:
        return None
    for pkg in ("tensorrt", "tensorrt_bindings"):
        src = Path(str(dist.locate_file(pkg)))
        if not src.is_dir():
            return None
        shutil.copytree(src, dest / pkg)
    pyi = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,]\s*)in:", r"\1in_:", pyi.read_text())
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    pyi.write_text(text)
    return dest


def test_mypy_tensorrt_modules(tmp_path):
    """mypy over trt_build, trt_profiles and trt_backend (config in pyproject), with TensorRT's stubs when present."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy not installed (pip install -e '.[dev]')")
    stubs = _patched_stubs(tmp_path / "typings")
    env = {**os.environ, "MYPYPATH": str(stubs)} if stubs else dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(ROOT / ".mypy_cache")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


@pytest.mark.tensorrt
def test_rtx_plugin_node_decoder_without_its_library_fails_in_one_line(rtx_bundle, tmp_path):
    """The plugin-node variant reaches TensorRT-RTX's parser; without the plugin library it names the node."""
    out, precision = rtx_bundle
    if precision != "fp32":
        pytest.skip("one precision is enough for the parser path")
    import onnx
    import tensorrt_rtx_bindings as trt

    from sed_export.onnx_plugin import plugin_nodes
    from sed_export.trt_build import build_engine, plugin_decoder

    dst = tmp_path / "decoder_plugin.onnx"
    plugin_decoder(out / "decoder.onnx", dst, 1024)
    assert len(plugin_nodes(onnx.load(str(dst)))) == 3
    prof = decoder_profile(["N", 80, 64], class_range(5))
    with pytest.raises(SedUserError, match="cannot parse decoder_plugin.onnx: .*Plugin not found.*TopkUnion"):
        build_engine(trt, dst, tmp_path / "decoder.plan", (prof,))
