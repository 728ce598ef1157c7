"""`sed-run infer` end to end on sed-tiny, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need
from PIL import Image

need("torch")

from sed_runtime.postprocess import segment  # noqa: E402

BIN = Path(sys.executable).parent
CLASSES = "sky; grass, lawn; person; dog; building"


def run(tool: str, *args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 320, 3), dtype=np.uint8)).save(d / "landscape.jpg")
    Image.fromarray(rng.integers(0, 255, (330, 150, 4), dtype=np.uint8), "RGBA").save(d / "portrait.png")
    return d


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"SED_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def topk2_run(images, cache_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = run(
        "sed-run",
        "infer",
        str(images),
        "--classes",
        CLASSES,
        "--topk",
        "2",
        "--out",
        str(out),
        "--save-npz",
        "--no-progress",
        env_extra=cache_env,
    )
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.parametrize("stem,hw", [("landscape", (200, 320)), ("portrait", (330, 150))])
def test_outputs_exist_and_agree(topk2_run, stem, hw):
    out, _ = topk2_run
    overlay = Image.open(out / f"{stem}_overlay.png")
    assert overlay.height >= hw[0] and overlay.width > hw[1]  # image plus legend panel
    summary = json.loads((out / f"{stem}.json").read_text())
    data = np.load(out / f"{stem}.npz")
    scores, seg = data["scores"], data["seg"]
    assert scores.dtype == np.float32 and scores.shape == (5, 192, 192)
    assert seg.dtype == np.int32 and seg.shape == hw
    assert summary["image_size"] == {"height": hw[0], "width": hw[1]}
    kept = [data[f"kept{i}"] for i in range(3)]
    assert all(k.dtype == np.int32 and np.all(np.diff(k) > 0) for k in kept)
    assert set(kept[2]) <= set(kept[1]) <= set(kept[0])
    assert summary["kept_counts"] == [len(k) for k in kept]
    rejected = np.setdiff1d(np.arange(5), kept[2])
    assert np.all(scores[rejected] == 0) and np.all(scores[kept[2]] > 0)
    np.testing.assert_array_equal(segment(scores, hw), seg)  # seg is the official postprocess of scores
    present = summary["classes_present"]
    counts = np.bincount(seg.ravel(), minlength=5)
    assert {c["index"] for c in present} == set(np.nonzero(counts)[0].tolist())
    assert sum(c["fraction"] for c in present) == pytest.approx(1.0, abs=1e-4)
    for c in present:
        assert c["fraction"] == pytest.approx(counts[c["index"]] / seg.size, abs=1e-5)
    assert summary["timings_ms"]["total"] > 0 and summary["topk"] == 2


def test_topk_all_has_no_kept_and_refuses_overwrite(images, cache_env, tmp_path):
    img = str(images / "landscape.jpg")
    r = run(
        "sed-run",
        "infer",
        img,
        "--classes",
        CLASSES,
        "--topk",
        "all",
        "--out",
        str(tmp_path),
        "--save-npz",
        "--no-progress",
        env_extra=cache_env,
    )
    assert r.returncode == 0, r.stderr
    data = np.load(tmp_path / "landscape.npz")
    assert set(data.files) == {"scores", "seg"}
    assert np.all(data["scores"] > 0)
    assert json.loads((tmp_path / "landscape.json").read_text())["kept_counts"] is None
    before = (tmp_path / "landscape.json").stat().st_mtime_ns
    again = run(
        "sed-run", "infer", img, "--classes", CLASSES, "--out", str(tmp_path), "--no-progress", env_extra=cache_env
    )
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "landscape.json").stat().st_mtime_ns == before
    forced = run(
        "sed-run",
        "infer",
        img,
        "--classes",
        CLASSES,
        "--out",
        str(tmp_path),
        "--no-progress",
        "--force",
        env_extra=cache_env,
    )
    assert forced.returncode == 0, forced.stderr


def test_second_run_uses_the_text_cache(topk2_run, cache_env, images, tmp_path):
    """A second run with the same model and vocabulary must not run the text tower: it is made to fail here."""
    files = list(Path(cache_env["SED_CACHE_DIR"]).rglob("*.safetensors"))
    assert len(files) == 1  # one vocabulary, one model
    stamp = files[0].stat().st_mtime_ns
    code = (
        "import sys, sed_export.text as t\n"
        "def refuse(*a, **k): raise SystemExit('text tower ran: the cache was not used')\n"
        "t.encode_vocabulary = refuse\n"
        "from sed_runtime.cli import app\n"
        f"sys.argv = ['sed-run', 'infer', {str(images / 'landscape.jpg')!r}, '--classes', {CLASSES!r}, '--topk', '2',"
        f" '--out', {str(tmp_path / 'again')!r}, '--no-progress']\n"
        "app()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **cache_env})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "again" / "landscape.json").is_file()
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten


def _bad_inputs(tmp: Path, images: Path) -> dict[str, list[str]]:
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes((images / "landscape.jpg").read_bytes()[:300])
    empty_vocab = tmp / "empty.txt"
    empty_vocab.write_text("\n# nothing\n\n")
    wrong_ckpt = tmp / "wrong.pth"
    import torch

    torch.save(
        {"model": {"sem_seg_head.predictor.clip_model.visual.head.proj.weight": torch.zeros(640, 1024)}}, wrong_ckpt
    )
    img = str(images / "landscape.jpg")
    return {
        "missing image": [str(tmp / "nope.jpg"), "--classes", "cat"],
        "corrupt image": [str(corrupt), "--classes", "cat"],
        "unknown model": [img, "--classes", "cat", "--model", "sed-huge"],
        "wrong checkpoint": [img, "--classes", "cat", "--checkpoint", str(wrong_ckpt)],
        "empty vocabulary file": [img, "--vocab", str(empty_vocab)],
        "empty inline vocabulary": [img, "--classes", " "],
        "unknown vocabulary": [img, "--vocab", "ade9999"],
        "no vocabulary": [img],
        "k = 0": [img, "--classes", "cat", "--topk", "0"],
        "k not a number": [img, "--classes", "cat", "--topk", "eight"],
    }


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, images, cache_env):
    out = tmp_path / "out"
    for case, args in _bad_inputs(tmp_path, images).items():
        r = run("sed-run", "infer", *args, "--out", str(out), "--no-progress", env_extra=cache_env)
        assert r.returncode == 2, (case, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, r.stderr)
        assert "Traceback" not in r.stderr, case
        assert not out.exists() or not any(out.iterdir()), case
    hint = run(
        "sed-run",
        "infer",
        str(images / "landscape.jpg"),
        "--classes",
        "cat",
        "--out",
        str(out),
        "--checkpoint",
        str(tmp_path / "wrong.pth"),
        env_extra=cache_env,
    )
    assert "--model sed-b" in hint.stderr


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from sed_runtime.cli import app; "
        "r = CliRunner().invoke(app, ['infer', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    for tool in ("sed-export", "sed-bench"):
        assert run(tool, "--help").returncode == 0


def test_missing_extra_is_one_line_exit_2(tmp_path) -> None:
    """`sed-export build` on a torch-free install names the extra to install instead of a traceback."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "open_clip", "timm"):
            sys.modules[name] = None  # as if the export extra were not installed
        from sed_export.cli import app
        sys.argv = ["sed-export", "build", "--vocab", "voc20", "--out", {str(tmp_path / "b")!r}]
        app()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "pip install 'sed-deploy[export]'" in lines[0]
    assert not (tmp_path / "b").exists()


def test_skip_existing_redoes_only_missing_outputs(images, cache_env, tmp_path):
    out = tmp_path / "out"
    args = ["infer", str(images), "--classes", CLASSES, "--topk", "2", "--out", str(out), "--no-progress"]
    assert run("sed-run", *args, env_extra=cache_env).returncode == 0
    (out / "portrait.json").unlink()
    kept = (out / "landscape_overlay.png").stat().st_mtime_ns
    r = run("sed-run", *args, "--skip-existing", env_extra=cache_env)
    assert r.returncode == 0 and "skipping 1 image" in r.stderr, r.stderr
    assert (out / "portrait.json").exists() and (out / "landscape_overlay.png").stat().st_mtime_ns == kept
    r = run("sed-run", *args, "--skip-existing", env_extra=cache_env)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    r = run("sed-run", *args, "--skip-existing", "--force", env_extra=cache_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--skip-existing" in r.stderr


def test_interrupted_run_says_how_to_resume(cache_env, tmp_path):
    import signal
    import time

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):  # enough that the interrupt lands mid-run (8 sometimes all finished first)
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(src / f"im{i:02d}.png")
    out = tmp_path / "out"
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: a suite run with `&` would see the interrupt vanish. Ctrl-C at a terminal
    # reaches the default disposition, so give the child that.
    proc = subprocess.Popen([str(BIN / "sed-run"), "infer", str(src), "--classes", CLASSES, "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **cache_env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (out / "im00.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode} (0: the interrupt was lost)\n{err}"
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(line) == 1 and "--skip-existing" in line[0] and "Traceback" not in err, err
    written = len(list(out.glob("*.json")))
    assert f"interrupted: {written} of 40 images" in line[0]
    assert all((out / f"{p.stem}_overlay.png").exists() for p in out.glob("*.json"))  # whole images only
