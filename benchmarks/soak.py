"""Soak test: one `sed-run infer` process over many generated scenes, watched from outside.

Samples the process's RSS and open file descriptors twice a second against the number of images finished,
then checks every output file is whole (overlay PNG decodes, JSON parses with the right image size). The RSS
slope after warm-up says whether anything grows per image; the report goes to --out as report.md,
samples.csv and results.json.

    python benchmarks/soak.py --bundle examples/bundles/sed-shapes --images 1000 \
        --out benchmarks/results/cpu-soak-sed-shapes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _check_outputs(images: list[Path], out: Path) -> list[str]:
    """Problems with the outputs: a missing or unreadable overlay or JSON, or a JSON with the wrong size."""
    from PIL import Image

    problems = []
    for image in images:
        overlay, summary = out / f"{image.stem}_overlay.png", out / f"{image.stem}.json"
        try:
            with Image.open(overlay) as im:
                im.load()
            data = json.loads(summary.read_text())
            with Image.open(image) as src:
                w, h = src.size
            if data["image_size"] != {"height": h, "width": w}:
                problems.append(f"{summary.name}: image_size {data['image_size']} for a {w}x{h} image")
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report
            problems.append(f"{image.stem}: {type(e).__name__}: {e}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("examples/bundles/sed-shapes"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=3000, help="scene seed (training uses 0, sed-eval 1000)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of images before the slope is fitted")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from sed_bench.measure import rss_mb
    from sed_runtime.scenes import write_scene_folder

    work = Path(tempfile.mkdtemp(prefix="sed-soak-"))
    try:
        data = work / "scenes"
        write_scene_folder(data, args.seed, args.images)
        images = sorted((data / "images").iterdir())
        outputs = work / "out"
        cmd = [str(Path(sys.executable).parent / "sed-run"), "infer", str(args.bundle), str(data / "images"),
               "--out", str(outputs), "--no-progress"]
        t0 = time.perf_counter()
        log = open(work / "stderr.log", "w")  # a file, not a pipe: one line per image would fill a pipe and stall
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                env={**os.environ, "SED_CACHE_DIR": str(work / "cache")})
        samples: list[tuple[float, int, float, int]] = []
        while proc.poll() is None:
            rss, fds = rss_mb(proc.pid), _open_fds(proc.pid)
            done = len(list(outputs.glob("*.json"))) if outputs.exists() else 0
            if rss and fds is not None:  # None or 0 while the process is still starting
                samples.append((time.perf_counter() - t0, done, rss, fds))
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        log.close()
        stderr = (work / "stderr.log").read_text()
        problems = _check_outputs(images, outputs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    arr = np.array(samples, dtype=np.float64)
    after = arr[arr[:, 1] >= max(1, args.warmup * args.images)]
    slope = float(np.polyfit(after[:, 1], after[:, 2], 1)[0]) * 100 if len(after) > 2 else float("nan")
    result = {
        "command": " ".join(["sed-run", *cmd[1:3], "<scenes>", "--out", "<out>", "--no-progress"]),
        "images": args.images, "scene_seed": args.seed, "exit_code": proc.returncode, "seconds": round(seconds, 1),
        "images_per_second": round(args.images / seconds, 2),
        "rss_mb": {"first_sample": round(arr[0, 2], 1), "after_warmup_min": round(after[:, 2].min(), 1),
                   "after_warmup_max": round(after[:, 2].max(), 1), "final": round(arr[-1, 2], 1)},
        "rss_slope_mb_per_100_images_after_warmup": round(slope, 3),
        "open_fds": {"after_warmup_min": int(after[:, 3].min()), "after_warmup_max": int(after[:, 3].max())},
        "outputs_checked": len(images), "output_problems": problems[:20], "output_problem_count": len(problems),
        "stderr_tail": stderr.strip().splitlines()[-3:],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "samples.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "images_done", "rss_mb", "open_fds"])
        w.writerows([[round(t, 1), int(d), round(r, 1), int(n)] for t, d, r, n in samples])
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    (args.out / "report.md").write_text(
        f"# Soak: {args.images} generated scenes through one `sed-run infer` process\n\n"
        f"Bundle `{args.bundle}`, scenes of seed {args.seed}; {r['machine']['cpus']} CPUs "
        f"({r['machine']['platform']}).\n\n"
        f"| | |\n|---|---|\n"
        f"| exit code | {r['exit_code']} |\n| wall time | {r['seconds']} s ({r['images_per_second']} images/s) |\n"
        f"| RSS first sample / after warm-up min-max / final | {r['rss_mb']['first_sample']} / "
        f"{r['rss_mb']['after_warmup_min']}-{r['rss_mb']['after_warmup_max']} / {r['rss_mb']['final']} MB |\n"
        f"| RSS slope after warm-up ({int(args.warmup * 100)}% of images) | "
        f"{r['rss_slope_mb_per_100_images_after_warmup']} MB per 100 images |\n"
        f"| open file descriptors after warm-up | {r['open_fds']['after_warmup_min']}-"
        f"{r['open_fds']['after_warmup_max']} |\n"
        f"| outputs whole (overlay decodes, JSON parses, right size) | "
        f"{len(images) - len(problems)} of {len(images)} |\n\n"
        "samples.csv holds every sample (seconds, images done, RSS, open fds).\n")
    print(json.dumps({k: r[k] for k in ("exit_code", "seconds", "rss_mb", "rss_slope_mb_per_100_images_after_warmup",
                                        "open_fds", "output_problem_count")}))
    return 0 if proc.returncode == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
