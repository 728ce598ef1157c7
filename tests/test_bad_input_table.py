"""The bad-input table (issue 17): every row is an input a user can get wrong, the exit code, and the one line
that must name the problem and the fix. All rows run the torch-free CLIs (`sed-run`, `sed-eval`) on the shipped
demo bundle, so the table runs wherever the runtime installs. Torch-side rows (checkpoints, configs, builds)
live beside their commands in test_cli.py, test_bundle.py, test_checkpoint.py and test_eval.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need

need("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"
IMAGE = ROOT / "examples" / "images" / "shapes.jpg"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of bad inputs, and a damaged copy of the demo bundle."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    (d / "broken.jpg").write_bytes(b"not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(IMAGE.read_bytes()[:2000])
    Image.fromarray((np.arange(400, dtype=np.float32).reshape(20, 20) * 1e3), mode="F").save(d / "float.tif")
    (d / "dup.json").write_text('["cat", "cat"]')
    (d / "dict.json").write_text('{"cat": 1}')
    (d / "empty.json").write_text("[]")
    (d / "bad.json").write_text('["cat", ')
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "a_file").write_text("x")
    (d / "no_images").mkdir()
    shutil.copytree(DEMO_BUNDLE, d / "damaged")
    with open(d / "damaged" / "decoder.onnx", "r+b") as f:
        f.truncate(1000)
    shutil.copytree(DEMO_BUNDLE, d / "no_manifest")
    (d / "no_manifest" / "manifest.json").unlink()
    shutil.copytree(DEMO_BUNDLE, d / "bad_manifest")
    (d / "bad_manifest" / "manifest.json").write_text("{not json")
    (d / "ds" / "images").mkdir(parents=True)
    (d / "ds" / "labels").mkdir()
    Image.open(IMAGE).save(d / "ds" / "images" / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(d / "ds" / "labels" / "a.png")  # wrong size
    (d / "ds2" / "images").mkdir(parents=True)
    (d / "ds2" / "labels").mkdir()
    Image.open(IMAGE).save(d / "ds2" / "images" / "a.png")  # no label
    return d


B, IMG = "{bundle}", "{image}"
# (tool, arguments, the words the one line must hold); every row exits 2.
TABLE = [
    # bundle argument
    ("sed-run", ["infer", "{w}/nosuch", IMG], ["nosuch not found", "bundle folder"]),
    ("sed-run", ["infer", "{w}/damaged", IMG], ["does not match its manifest hash", "rebuild"]),
    ("sed-run", ["infer", "{w}/bad_manifest", IMG], ["not valid JSON", "rebuild"]),
    ("sed-run", ["infer", "{w}/no_manifest", IMG], ["no manifest.json", "rebuild"]),
    # images
    ("sed-run", ["infer", B, "{w}/nosuch.jpg"], ["nosuch.jpg not found"]),
    ("sed-run", ["infer", B, "{w}/broken.jpg"], ["cannot decode image", "broken.jpg"]),
    ("sed-run", ["infer", B, "{w}/empty.png"], ["cannot decode image", "empty.png"]),
    ("sed-run", ["infer", B, "{w}/truncated.jpg"], ["truncated.jpg"]),
    ("sed-run", ["infer", B, "{w}/float.tif"], ["float image", "8-bit"]),
    ("sed-run", ["infer", B, "{w}/no_images"], ["holds no images"]),
    ("sed-run", ["infer", B, "{w}/none/*.jpg"], ["no image matches"]),
    # vocabularies
    ("sed-run", ["infer", B, IMG, "--vocab", "nosuchvocab"], ["unknown vocabulary", "built-in"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "{w}/dup.json"], ["duplicate class 'cat'"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "{w}/dict.json"], ["JSON dict, not a list"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "{w}/empty.json"], ["empty.json"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "{w}/bad.json"], ["bad.json"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "{w}/latin1.txt"], ["not UTF-8"]),
    ("sed-run", ["infer", B, IMG, "--classes", ";;"], ["empty name"]),
    ("sed-run", ["infer", B, IMG, "--vocab", "shapes", "--classes", "cat"], ["either --vocab or --classes"]),
    ("sed-run", ["infer", IMG], ["no vocabulary", "--vocab"]),
    # k, backends, devices
    ("sed-run", ["infer", B, IMG, "--topk", "0"], ["--topk must be >= 1"]),
    ("sed-run", ["infer", B, IMG, "--topk", "-3"], ["--topk must be >= 1"]),
    ("sed-run", ["infer", B, IMG, "--topk", "many"], ["--topk must be a positive integer or 'all'"]),
    ("sed-run", ["infer", B, IMG, "--backend", "bogus"], ["unknown --backend"]),
    ("sed-run", ["infer", B, IMG, "--device", "gpu0"], ["unknown --device"]),
    ("sed-run", ["infer", B, IMG, "--device", "cuda"], ["--device cuda is for --backend torch", "--providers"]),
    # memory (issue 17): a run predicted not to fit is refused before any image
    ("sed-run", ["infer", B, IMG, "--vocab", "ade847", "--topk", "all", "--max-memory", "0.3"],
     ["needs about", "GiB", "847 classes", "--max-memory"]),
    ("sed-run", ["infer", B, IMG, "--max-memory", "-1"], ["--max-memory must be a positive"]),
    ("sed-run", ["infer", B, IMG, "--max-memory", "lots"], ["--max-memory must be a number of GiB", "lots"]),
    # outputs
    ("sed-run", ["infer", B, IMG, "--out", "{w}/a_file"], ["is a file"]),
    ("sed-run", ["infer", B, IMG, "--out", "{w}/a_file/sub"], ["cannot be created"]),
    # datasets (sed-eval)
    ("sed-eval", [B, "--data", "{w}/nosuch"], ["not found", "shapes:N"]),
    ("sed-eval", [B, "--data", "shapes:0"], ["positive image count"]),
    ("sed-eval", [B, "--data", "{w}/no_images"], ["no_images"]),
    ("sed-eval", [B, "--data", "{w}/ds"], ["a.png", "size"]),
    ("sed-eval", [B, "--data", "{w}/ds2"], ["a.png", "label"]),
    ("sed-eval", [B, "--data", "shapes:2", "--topk", "0"], ["--topk must be >= 1"]),
]


@pytest.mark.parametrize("tool,args,words", TABLE, ids=[f"{t} {' '.join(a)}" for t, a, _ in TABLE])
def test_bad_input_gets_one_line_and_exit_2(work, tmp_path, tool, args, words):
    argv = [a.format(w=work, bundle=DEMO_BUNDLE, image=IMAGE) for a in args]
    r = subprocess.run([str(BIN / tool), *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "SED_CACHE_DIR": str(tmp_path / "cache")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not any(tmp_path.glob("out/*")), "nothing is written for bad input"
