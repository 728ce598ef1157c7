"""`sed-eval` end to end on the shipped trained model, folder datasets, and every bad dataset input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sed_runtime.scenes import generate_scene

BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "sed-eval"), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"SED_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


def write_folder(root: Path, seed: int, count: int, shift: int = 0) -> Path:
    """Generated scenes as a dataset folder: images/*.png and labels/*.png (labels + shift, 255 stays)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        s = generate_scene(seed, i)
        Image.fromarray(s.image).save(root / "images" / f"shapes-{seed}-{i:05d}.png")
        lab = s.label.astype(np.int64)
        lab[lab != 255] += shift
        Image.fromarray(lab.astype(np.uint8)).save(root / "labels" / f"shapes-{seed}-{i:05d}.png")
    return root


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case", ["size", "values", "missing", "empty", "nofolder", "outfile", "seed-folder"])
def test_bad_dataset_input_is_one_line(case, tmp_path, env):
    root = tmp_path / "data"
    args: list[str] = []
    if case in ("size", "values", "missing", "outfile"):
        write_folder(root, 5, 2)
        lab = root / "labels" / "shapes-5-00001.png"
        if case == "size":
            Image.new("L", (10, 12)).save(lab)
            needles = ["shapes-5-00001.png", "10x12", "size"]
        elif case == "values":
            Image.new("L", Image.open(lab).size, 99).save(lab)
            needles = ["shapes-5-00001.png", "class 99", "--vocab"]
        elif case == "missing":
            lab.unlink()
            needles = ["shapes-5-00001.png", "no label"]
        else:
            (tmp_path / "report").write_text("x")
            args = ["--out", str(tmp_path / "report")]
            needles = ["--out", "is a file"]
    elif case == "empty":
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        needles = ["holds no images"]
    elif case == "nofolder":
        needles = ["not found"]
    else:
        write_folder(root, 5, 1)
        args = ["--seed", "3"]
        needles = ["--seed"]
    r = run("--data", str(root), "--vocab", "shapes", "--no-progress", *args, env=env)
    one_line_error(r, *needles)


@pytest.fixture(scope="module")
def shapes_eval(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("eval")
    r = run("--data", "shapes:6", "--backend", "torch", "--topk", "all,8,1", "--out", str(out), "--no-progress",
            env=env)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "results.json").read_text()), out, r


def test_shipped_model_scores_far_above_chance(shapes_eval):
    data, out, r = shapes_eval
    cells = {c["topk"]: c for c in data["cells"]}
    # 24 classes: chance is about 4% mIoU. The shipped model reaches 79% mIoU and 96% pixel accuracy on 200
    # held-out scenes. On these six: mIoU 68.2 (few images: a class predicted on a few pixels where it is absent
    # counts as IoU 0), pixel accuracy 97.4, mean accuracy 78.3. A model that learned nothing fails these.
    assert cells["all"]["miou"] > 50 and cells["all"]["pixel_accuracy"] > 93, cells["all"]
    assert cells["all"]["mean_accuracy"] > 65, cells["all"]
    # CER on a trained model rejects: at k = 1 the first point keeps far fewer than the 24 classes.
    assert cells["1"]["kept_counts_mean"][0] < 10  # measured 6.3
    assert {p.name for p in out.iterdir()} == {"report.md", "results.json", "results.csv"}
    report = (out / "report.md").read_text()
    assert "| torch fp32 | all |" in report and "Per-class IoU" in report and "mIoU" in r.stdout


def test_folder_dataset_equals_generated_and_reduce_zero_label(tmp_path, env, shapes_eval):
    """The same scenes as PNG folders give the same mIoU; with labels + 1, --reduce-zero-label undoes it."""
    from sed_runtime.evaluation import EVAL_SEED

    data, _, _ = shapes_eval
    ref = {c["topk"]: c["miou"] for c in data["cells"]}["all"]
    plain = write_folder(tmp_path / "plain", EVAL_SEED, 6)
    shifted = write_folder(tmp_path / "shifted", EVAL_SEED, 6, shift=1)
    for folder, extra in ((plain, []), (shifted, ["--reduce-zero-label"])):
        out = tmp_path / f"out-{folder.name}"
        r = run("--data", str(folder), "--vocab", "shapes", "--backend", "torch", "--topk", "all", "--out", str(out),
                "--no-progress", *extra, env=env)
        assert r.returncode == 0, r.stderr
        cells = json.loads((out / "results.json").read_text())["cells"]
        assert cells[0]["miou"] == pytest.approx(ref, abs=1e-9)
    r = run("--data", str(tmp_path / "plain"), "--vocab", "shapes", "--out", str(tmp_path / "out-plain"),
            "--no-progress", env=env)
    one_line_error(r, "already exists", "--force")
