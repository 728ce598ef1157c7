"""`sed-run batch` on Ray Data (issue 16, item 1): outputs equal the one-process pipeline, resume, error rows,
and a local Ray that listens on 127.0.0.1 only. Ray starts once for the module and is stopped by it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need

from sed_runtime import batch  # before Ray is imported: it sets Ray's loopback-only switch

need("ray")
need("onnxruntime")

from PIL import Image

from sed_runtime.scenes import SHAPES_CLASSES, generate_scene

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_BUNDLE = ROOT / "examples" / "bundles" / "sed-shapes"


def _listening() -> set[tuple[str, int]]:
    """(hex local address, port) of every listening TCP socket in this network namespace."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                addr, port = parts[1].split(":")
                found.add((addr, int(port, 16)))
    return found


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net/tcp[6] writes them (little-endian words)
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    before = _listening()
    batch.start_local_ray(num_cpus=2)
    opened = _listening() - before
    yield opened
    ray.shutdown()


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"scene{i}.png"
        Image.fromarray(generate_scene(1000, i).image).save(p)
        paths.append(p)
    return paths


def test_local_ray_listens_on_loopback_only(ray_local) -> None:
    assert ray_local, "Ray opened no listening socket?"
    assert {addr for addr, _ in ray_local} <= LOOPBACK, ray_local


def test_batch_equals_the_pipeline_resumes_and_reports_bad_images(ray_local, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from sed_runtime.pipeline import SedPipeline

    images = _images(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    s = batch.run(str(tmp_path / "in"), out, DEMO_BUNDLE, topk=8, progress=False)
    assert (s.images, s.done, s.errors, s.skipped) == (4, 3, 1, 0)
    table = pq.read_table(out / batch.SUMMARY).to_pylist()
    assert len(table) == 4
    bad = [r for r in table if r["error"]]
    assert len(bad) == 1 and "broken.jpg" in bad[0]["image"] and "broken.jpg" in bad[0]["error"]
    pipe = SedPipeline.from_bundle(DEMO_BUNDLE, topk=8)
    for p in images:
        label = np.asarray(Image.open(out / "labels" / f"{p.stem}.png"))
        assert label.dtype == np.uint16
        np.testing.assert_array_equal(label, pipe(p).seg)
    row = next(r for r in table if r["image"].endswith("scene0.png"))
    assert row["model_ms"] > 0 and row["decode_ms"] > 0 and row["height"] > 0
    truth = generate_scene(1000, 0).label  # scene0: sand and wall cover nearly all of it
    names = dict(enumerate(SHAPES_CLASSES))
    for cls in np.unique(truth[truth != 255]):
        if (truth == cls).mean() > 0.3:
            assert names[int(cls)] in row["classes_present"], (names[int(cls)], row["classes_present"])

    (out / "labels" / "scene1.png").unlink()  # as if the run had been killed before this image
    again = batch.run(str(tmp_path / "in"), out, DEMO_BUNDLE, topk=8, progress=False)
    assert (again.done, again.skipped, again.errors) == (1, 2, 1)  # the broken image is retried, and fails again
    assert len(pq.read_table(out / batch.SUMMARY).to_pylist()) == 4
    assert (out / "labels" / "scene1.png").exists()

    # Killed after an actor wrote scene2's label but before its row reached the table: the rerun redoes it.
    import pyarrow as pa

    kept_rows = [r for r in pq.read_table(out / batch.SUMMARY).to_pylist() if not r["image"].endswith("scene2.png")]
    pq.write_table(pa.Table.from_pylist(kept_rows), out / batch.SUMMARY)
    third = batch.run(str(tmp_path / "in"), out, DEMO_BUNDLE, topk=8, progress=False)
    assert (third.done, third.skipped, third.errors) == (1, 2, 1)
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in pq.read_table(out / batch.SUMMARY).to_pylist()) == [
        "broken.jpg", "scene0.png", "scene1.png", "scene2.png"]


def test_actors_holding_every_cpu_still_get_decoded_images(ray_local, tmp_path: Path) -> None:
    """With --cpus-per-actor 2 on this 2-CPU Ray the actor holds every CPU; decode tasks that waited for a CPU
    stalled the run forever, so this test gives up (fails) after 120 s instead of hanging."""
    import signal

    _images(tmp_path / "in", 2)

    def give_up(*_: object) -> None:
        raise TimeoutError("sed-run batch stalled with the actor holding every CPU")

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(120)
    try:
        s = batch.run(str(tmp_path / "in"), tmp_path / "out", DEMO_BUNDLE, cpus_per_actor=2, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert (s.done, s.errors) == (2, 0)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/empty", "{tmp}/o", "--bundle", str(DEMO_BUNDLE)], "no images in"),
    (["{tmp}/in", "{tmp}/o", "--bundle", "{tmp}/nosuch"], "not found"),
    (["{tmp}/in", "{tmp}/afile", "--bundle", str(DEMO_BUNDLE)], "is a file"),
    (["{tmp}/in", "{tmp}/o", "--bundle", str(DEMO_BUNDLE), "--backend", "torch"], "must be ort, openvino or trt"),
])
def test_bad_batch_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "in", 1)
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([str(BIN / "sed-run"), "batch", *argv, "--no-progress"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
