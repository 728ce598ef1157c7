"""sed-bench: grid logic, argument errors, forced kept counts (torch == ONNX Runtime), ORT stage split, report
generation. Runs on sed-tiny with one timed call per cell; nothing here asserts a timing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sed_bench.cli import app
from sed_bench.grid import Cell, build_grid, parse_backends, parse_kept, parse_topks, parse_vocabs, run_order
from sed_bench.paper import TABLE7, paper_kept, paper_ms
from sed_runtime.errors import SedUserError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"


@pytest.fixture()
def classes3(tmp_path: Path) -> Path:
    p = tmp_path / "three.txt"
    p.write_text("cat\ndog, puppy\nsky\n")
    return p


@pytest.fixture()
def classes5(tmp_path: Path) -> Path:
    p = tmp_path / "five.json"
    p.write_text(json.dumps(["cat", "dog", "sky", "tree", "road"]))
    return p


@pytest.fixture()
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("SED_CACHE_DIR", str(tmp_path / "cache"))
    return {"SED_CACHE_DIR": str(tmp_path / "cache")}


# ------------------------------------------------------------------------------------------------ grid logic


def test_parse_grid_arguments(classes3: Path) -> None:
    assert parse_backends("torch, ort,torch") == ["torch", "ort"]
    assert parse_topks("all,8,1,2,8") == [1, 2, 8, None]
    assert parse_kept(None) is None and parse_kept("Paper") == "paper"
    assert parse_kept("48,40,32") == (48, 40, 32)
    labels = [label for label, _ in parse_vocabs(f"voc20,{classes3},{classes3}")]
    assert labels == ["voc20", "three", "three-1"]
    assert parse_backends("tensorrt,ort") == ["trt", "ort"]
    assert parse_backends("ort:int8,openvino:bf16+int8,openvino:int8+bf16,openvino") == [
        "ort:int8", "openvino:int8+bf16", "openvino"]  # variants in one order, so duplicates are found
    for bad in ("torch:int8", "ort:bf16", "openvino:fp16", "ort:", "trt:int8"):
        with pytest.raises(SedUserError, match="variant"):
            parse_backends(bad)
    for bad, fn in [("onnx", parse_backends), ("0", parse_topks), ("x", parse_topks),
                    ("1,2", parse_kept), ("8,4,2,1", parse_kept), ("0,0,0", parse_kept), ("2,4,8", parse_kept),
                    ("a,b,c", parse_kept), ("nope_vocab", parse_vocabs)]:
        with pytest.raises(SedUserError):
            fn(bad)


def test_build_grid_and_paper_counts(classes3: Path) -> None:
    vocabs = parse_vocabs(f"voc20,ade847,{classes3}")
    cells = build_grid(vocabs, [1, 8, None], (3, 2, 1))
    assert len(cells) == 9
    assert Cell("three", 3, 8, (3, 2, 1)) in cells and Cell("voc20", 20, None, None) in cells
    with pytest.raises(SedUserError, match="more than three"):
        build_grid(vocabs, [1], (4, 2, 1))
    with pytest.raises(SedUserError, match="paper"):
        build_grid(vocabs, [1], "paper")  # no paper numbers for a user vocabulary
    with pytest.raises(SedUserError, match="paper"):
        build_grid(vocabs[:1], [16], "paper")  # nor for k = 16
    cells = build_grid(vocabs[:2], [1, 2, 4, 8, None], "paper")
    forced = {(c.vocab, c.topk): c.forced for c in cells}
    assert forced[("ade847", 8)] == (81, 81, 81) and forced[("voc20", 8)] == (20, 20, 20)  # 21.9 clipped to N
    assert forced[("ade847", None)] is None
    for name, n in (("ade847", 847), ("pc459", 459), ("ade150", 150), ("pc59", 59), ("voc20", 20)):
        for k in (1, 2, 4, 8):
            assert 1 <= paper_kept(name, n, k) <= n  # type: ignore[operator]
        assert paper_ms(name, n, None) == TABLE7[name][None]
    assert paper_ms("voc20", 21, 1) is None  # a different class list is not the paper's column
    order = run_order(build_grid(vocabs[:2], [1, 8, None], "paper"))
    assert [c.topk is None for c in order] == [False] * 4 + [True] * 2
    assert order[-1].num_classes == 847 and order[0].decoder_classes() <= order[3].decoder_classes()


# ------------------------------------------------------------------------------------------------ CLI errors


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "sed-bench"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, classes3: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        ["--backend", "trt"],
        ["--vocabs", "no_such_vocab"],
        ["--topk", "0,8"],
        ["--kept", "5,4", "--vocabs", "voc20"],
        ["--kept", "30,20,10", "--vocabs", "voc20"],
        ["--kept", "4,4,4", "--vocabs", f"voc20,{classes3}", "--topk", "1"],
        ["--kept", "5,5,5", "--topk", "all"],
        ["--out", str(existing)],
        ["--images", str(tmp_path / "missing.jpg")],
        ["--text", "fake"],
        ["--backend", "openvino:fp16"],
        ["--backend", "ort:int8", "--calib", str(tmp_path / "no-such-folder")],
        [str(DEMO_BUNDLE), "--backend", "openvino:int8"],
        ["--class-chunk", "0"],
        ["--class-chunk", "4", "--max-memory", "1"],
    ]
    for args in cases:
        r = _bench(*args, "--no-progress")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert "pass a BUNDLE built with `sed-export build --engine tensorrt`" in _bench("--backend", "torch,trt").stderr
    assert not any(existing.iterdir())


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = ("import sys; from typer.testing import CliRunner; from sed_bench.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = {'torch', 'onnxruntime', 'matplotlib'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------- forced kept counts, stages


def test_forced_kept_counts_agree_between_torch_and_ort(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from sed_bench.forcing import forced_decoder_graph, kept_feed, torch_selector
    from sed_bench.graphs import bench_graphs
    from sed_runtime.backends.torch_backend import TorchBackend

    folder = bench_graphs("sed-tiny", None, "fp32", tmp_path / "work", log=lambda _: None)
    assert bench_graphs("sed-tiny", None, "fp32", tmp_path / "work", log=lambda _: None) == folder  # cached
    forced = forced_decoder_graph(onnx.load(str(folder / "decoder.onnx")))
    onnx.checker.check_model(forced, full_check=True)
    enc = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(forced.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 3, 768, 768)).astype(np.float32)
    text = rng.standard_normal((9, 80, 64)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    dense, res4, res3, res2 = enc.run(None, {"image": image})
    torch_backend = TorchBackend("sed-tiny")
    reference = torch_backend.infer(image, text, 1)
    for k, counts in [(1, (6, 4, 2)), (2, (9, 9, 9)), (1, (9, 3, 3)), (1, (20, 20, 1))]:
        out = dec.run(None, {"dense": dense, "text": text, "res4": res4, "res3": res3, "res2": res2,
                             "k": np.array([k], np.int64), **kept_feed(counts)})
        torch_backend.cer_select = torch_selector(counts)
        r = torch_backend.infer(image, text, k)
        want = [min(counts[0], 9), min(counts[0], counts[1], 9), min(*counts, 9)]
        assert [len(x) for x in r.kept] == want
        for i in range(3):
            np.testing.assert_array_equal(out[1 + i], r.kept[i])
            assert np.all(np.diff(r.kept[i]) > 0)
            if i:
                assert set(r.kept[i]) <= set(r.kept[i - 1])
        np.testing.assert_allclose(out[0], r.scores, atol=1e-4)
    torch_backend.cer_select = None  # the hook off gives the reference again
    again = torch_backend.infer(image, text, 1)
    np.testing.assert_array_equal(again.scores, reference.scores)


def test_ort_stage_split_charges_optimizer_nodes_to_neighbours() -> None:
    from sed_bench.ort_profile import node_stage, split_stages

    assert node_stage("pre//conv1/Conv_kernel_time") == "cost_volume"
    assert node_stage("pre//head0/Conv_kernel_time") == "cer0"
    assert node_stage("decoder2//aux/Conv_kernel_time") == "cer2"
    assert node_stage("decoder3//head/Conv_kernel_time") == "head"
    assert node_stage("cer1/force/Best_kernel_time") == "cer1"
    assert node_stage("ScatterSurvivors_kernel_time") == "head"
    assert node_stage("BiasGelu_token_8_kernel_time") is None
    events = [{"name": n, "dur": d} for n, d in [
        ("pre//conv1/Conv", 1000), ("ReorderInput_token_1", 500), ("decoder1//layer/Conv", 2000),
        ("BiasGelu", 300), ("cer1/TopK", 100), ("ScatterSurvivors", 50)]]
    assert split_stages(events) == {"cost_volume": 1.0, "decoder1": 2.8, "cer1": 0.1, "head": 0.05}


# ----------------------------------------------------------------------------------------- end to end runs


def test_synthetic_run_writes_every_report(tmp_path: Path, classes3: Path, classes5: Path, cache_env: dict) -> None:
    out = tmp_path / "report"
    r = CliRunner().invoke(app, [
        "--model", "sed-tiny", "--backend", "torch,ort", "--vocabs", f"{classes3},{classes5}", "--topk", "1,all",
        "--kept", "3,2,1", "--text", "synthetic", "--warmup", "0", "--iters", "1", "--out", str(out),
        "--work", str(tmp_path / "work"), "--no-progress"])
    assert r.exit_code == 0, r.output
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "cells.csv", "results.json", "latency_vs_k.png"} <= files
    res = json.loads((out / "results.json").read_text())
    assert res["labels"]["mode"] == "SYNTHETIC" and res["labels"]["synthetic_text"]
    assert res["machine"]["cpu"] and res["versions"]["onnxruntime"]
    assert set(res["backends"]) == {"torch", "ort"}
    cells = {(c["backend"], c["vocab"], c["topk"]): c for c in res["cells"]}
    assert len(cells) == 8 and all(c["status"] == "ok" for c in cells.values())
    for b in ("torch", "ort"):
        for v in ("three", "five"):
            c = cells[(b, v, "1")]
            assert [c["kept"][f"cer{i}"]["median"] for i in range(3)] == [3, 2, 1]
            assert c["forced_kept"] == [3, 2, 1]
            assert {"preprocess", "encoder", "decoder", "postprocess", "total", "cer0", "decoder3"} <= set(c["ms"])
            assert c["memory"]["rss_peak_mb"] > 0
            assert cells[(b, v, "all")]["kept"] is None
    assert cells[("ort", "five", "1")]["stage_source"]["decoder1"] == "ort-profile"
    assert cells[("torch", "five", "1")]["stage_source"]["decoder1"] == "timed"
    assert res["text"]["torch"]["three"]["source"].startswith("SYNTHETIC")
    fit = res["cost_model"]["torch"]["total_vs_kept"]
    assert fit["n"] == 4 and fit["r2"] is not None
    md = (out / "report.md").read_text()
    assert "SYNTHETIC KEPT COUNTS" in md and "SYNTHETIC TEXT" in md and "RANDOM WEIGHTS" in md
    assert "| torch | ort | torch / ort |" in md and "Cost model" in md and "CER selection" in md
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 8 and {row["kept_mode"] for row in rows} == {"SYNTHETIC"}
    assert {row["text_mode"] for row in rows} == {"SYNTHETIC"}
    r = CliRunner().invoke(app, ["--vocabs", str(classes3), "--out", str(out), "--no-progress"])
    assert r.exit_code == 2  # no overwrite without --force


def test_measured_mode_with_real_text_and_memory_limit(tmp_path: Path, classes3: Path, classes5: Path,
                                                       cache_env: dict) -> None:
    out = tmp_path / "real"
    r = CliRunner().invoke(app, [
        "--model", "sed-tiny", "--backend", "torch", "--vocabs", f"{classes3},{classes5}", "--topk", "2,all",
        "--warmup", "0", "--iters", "1", "--max-rss-gb", "0.0001", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["labels"]["mode"] == "RANDOM WEIGHTS" and not res["labels"]["synthetic_kept"]
    text = res["text"]["torch"]
    assert text["three"]["source"].startswith("computed") and text["five"]["ms"] > 0
    status = {(c["vocab"], c["topk"]): c["status"] for c in res["cells"]}
    # Cheapest first: the k cells measure (no fit before two sizes were seen), then the limit skips.
    assert status[("three", "2")] == "ok" and status[("five", "2")] == "ok"
    assert status[("five", "all")] == "skipped"
    measured = [c for c in res["cells"] if c["status"] == "ok" and c["topk"] == "2"]
    assert all(1 <= c["kept"]["cer2"]["median"] <= c["num_classes"] for c in measured)
    md = (out / "report.md").read_text()
    assert "## Not measured" in md and "--max-rss-gb" in md and "SYNTHETIC K" not in md and "SYNTHETIC T" not in md
    # Reports re-render from results.json alone.
    (out / "report.md").unlink()
    from sed_bench.report import rerender

    assert rerender(out)["markdown"].read_text() == md


def test_cost_model_recovers_planted_linear_costs() -> None:
    """Cells whose times are exact linear functions of N and kept give back those coefficients with R² = 1."""
    from sed_bench.report import cost_model

    cells = []
    for n, kept in [(20, 5), (59, 9), (150, 12), (150, 40), (459, 30), (847, 81)]:
        k = kept
        stages = {"cost_volume": 0.5 * n, "cer0": 0.01 * n, "decoder1": 1.0 * k, "cer1": 0.02 * k,
                  "decoder2": 2.0 * k, "cer2": 0.03 * k, "decoder3": 4.0 * k, "head": 0.1 * k}
        dec = 5.0 + sum(stages.values())
        ms = {s: {"median": v} for s, v in stages.items()}
        ms["decoder"] = {"median": dec}
        ms["total"] = {"median": 100.0 + dec}
        cells.append({
            "backend": "torch", "status": "ok", "vocab": f"v{n}", "num_classes": n,
            "topk": 8, "ms": ms,
            "kept": {f"cer{i}": {"median": kept} for i in range(3)},
        })
    model = cost_model({"backends": ["torch"], "cells": cells})["torch"]
    dec = model["decoder_vs_n_and_kept"]
    assert dec["pre_ms_per_class"] == pytest.approx(0.51, abs=1e-9)  # cost volume + cer0 run on all N
    assert dec["post_ms_per_class"] == pytest.approx(7.15, abs=1e-9)
    assert dec["a_ms"] == pytest.approx(5.0, abs=1e-6) and dec["r2"] == pytest.approx(1.0)
    assert model["per_stage"]["decoder3"]["ms_per_class"] == pytest.approx(4.0)
    share = model["cer_share"]["cells"][0]
    assert share["cer_ms"] == pytest.approx(0.01 * 20 + 0.05 * 5)
    assert model["total_vs_kept"]["n"] == 6


def test_cost_model_per_cer_point_separates_the_layers() -> None:
    """Kept counts that shrink from point to point: one mean kept count mispredicts, the per-point fit does not."""
    from sed_bench.report import cost_model

    cells = []
    for n, kept in [(20, (9, 7, 5)), (59, (20, 12, 9)), (150, (40, 20, 12)), (150, (90, 60, 40)),
                    (459, (80, 50, 30)), (847, (120, 100, 81)), (847, (847, 847, 847))]:
        dec = 5.0 + 0.5 * n + 1.0 * kept[0] + 4.0 * kept[1] + 16.0 * kept[2]
        cells.append({
            "backend": "torch", "status": "ok", "vocab": f"v{n}", "num_classes": n, "topk": 8,
            "ms": {"decoder": {"median": dec}, "total": {"median": 100.0 + dec}},
            "kept": {f"cer{i}": {"median": kept[i]} for i in range(3)},
        })
    model = cost_model({"backends": ["torch"], "cells": cells})["torch"]
    per_point = model["decoder_per_cer_point"]
    assert per_point["layer_ms_per_kept_class"] == pytest.approx([1.0, 4.0, 16.0], abs=1e-6)
    assert per_point["pre_ms_per_class"] == pytest.approx(0.5, abs=1e-6)
    assert all(c["predicted_ms"] == pytest.approx(c["measured_ms"], rel=1e-6) for c in per_point["cells"])
    assert model["decoder_vs_n_and_kept"]["r2"] < 1.0  # the mean-kept model cannot fit these cells exactly


def test_memory_budget_runs_large_cells_class_chunked(tmp_path: Path, cache_env: dict) -> None:
    """--max-memory: a cell whose one-pass decoder is predicted above the budget runs class-chunked on both
    backends, with forced kept counts still exact, and the report says so; a small cell runs in one pass."""
    vocab = tmp_path / "many.json"
    vocab.write_text(json.dumps([f"class {i}" for i in range(60)]))
    out = tmp_path / "chunked"
    r = CliRunner().invoke(app, [
        "--model", "sed-shapes", "--backend", "torch,ort", "--vocabs", f"{vocab}", "--topk", "2,all",
        "--kept", "9,5,3", "--text", "synthetic", "--warmup", "0", "--iters", "1", "--max-memory", "0.1",
        "--out", str(out), "--work", str(tmp_path / "work"), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    cells = {(c["backend"], c["topk"]): c for c in res["cells"]}
    for b in ("torch", "ort"):
        assert cells[(b, "all")]["decoder"].startswith("class-chunked"), cells[(b, "all")]["decoder"]
        assert cells[(b, "2")]["decoder"] == "one pass"
        assert [cells[(b, "2")]["kept"][f"cer{i}"]["median"] for i in range(3)] == [9, 5, 3]
    assert "chunks of" in (out / "report.md").read_text()
    assert {row["decoder"] for row in csv.DictReader((out / "cells.csv").open())} >= {"one pass"}


def test_openvino_and_int8_variants_force_kept_counts(tmp_path: Path, cache_env: dict) -> None:
    """The CPU variants side by side (issue 13's grid): OpenVINO forces the kept counts in its one-graph decoder
    (a forced copy of the graph) and class-chunked (numpy); the int8 variants run an encoder calibrated here whose
    manifest says so, and a second run reuses it."""
    from needs import need

    need("openvino")
    vocab = tmp_path / "many.json"
    vocab.write_text(json.dumps([f"class {i}" for i in range(30)]))
    out = tmp_path / "variants"
    args = ["--model", "sed-shapes", "--backend", "ort:int8,openvino,openvino:int8+bf16", "--vocabs", f"{vocab}",
            "--topk", "2,all", "--kept", "9,5,3", "--text", "synthetic", "--warmup", "0", "--iters", "1",
            "--calib-images", "2", "--work", str(tmp_path / "work"), "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["backends"]) == ["ort:int8", "openvino", "openvino:int8+bf16"]
    assert res["backends"]["openvino"]["precision"] == "fp32"
    assert res["backends"]["openvino:int8+bf16"]["precision"] == "int8, bf16 inference"
    for name in ("ort:int8", "openvino:int8+bf16"):
        assert res["backends"][name]["int8"].endswith("calibrated on 2 images from shapes"), res["backends"][name]
    cells = {(c["backend"], c["topk"]): c for c in res["cells"]}
    for b in res["backends"]:
        assert cells[(b, "2")]["decoder"] == "one pass"
        assert [cells[(b, "2")]["kept"][f"cer{i}"]["median"] for i in range(3)] == [9, 5, 3], b
        assert cells[(b, "all")]["status"] == "ok"
    report = (out / "report.md").read_text()
    assert "openvino:int8+bf16" in report and "torch" not in res["backends"]
    int8_folders = sorted(p.name for p in (tmp_path / "work").iterdir() if "-int8-" in p.name)
    assert len(int8_folders) == 1  # one calibrated encoder for both int8 variants
    manifest = json.loads((tmp_path / "work" / int8_folders[0] / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["calibration"]["images"] == 2

    # Chunked OpenVINO forces the counts too (--class-chunk: at 30 classes no budget would choose chunks, whose
    # compiled segment programs cost more than the one pass they would save).
    out2 = tmp_path / "chunked"
    r = CliRunner().invoke(app, [*args[:3], "openvino", *args[4:], "--class-chunk", "4", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    res = json.loads((out2 / "results.json").read_text())
    assert res["settings"]["class_chunk"] == 4
    cell = next(c for c in res["cells"] if c["topk"] == "2")
    assert cell["decoder"] == "class-chunked, 4 classes per step", cell["decoder"]
    assert [cell["kept"][f"cer{i}"]["median"] for i in range(3)] == [9, 5, 3]
