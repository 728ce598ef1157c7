"""`sed-run batch` (Ray Data) against one `sed-run infer` process over the same generated images.

Each command runs in a fresh process on the same folder; wall time covers everything the user waits for
(start-up included), and the per-process RSS of every Ray actor is sampled twice a second for its peak.

    python benchmarks/batch_throughput.py --bundle examples/bundles/sed-shapes --images 200 \
        --out benchmarks/results/cpu-batch-sed-shapes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _timed(cmd: list[str], env: dict[str, str]) -> dict[str, object]:
    from sed_runtime.memory import rss_mb

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    actor_peak: dict[int, float] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if name.startswith("ray::MapWorker"):  # the actors, not the decode tasks
                actor_peak[pid] = max(actor_peak.get(pid, 0.0), rss_mb(pid) or 0.0)
        time.sleep(0.5)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return {"wall_s": round(wall, 1), "actor_peak_rss_mb": sorted(round(v) for v in actor_peak.values()),
            "last_line": (out.strip().splitlines() or [""])[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sed_bench.measure import machine_info
    from sed_bench.report import write_script_report
    from sed_runtime.scenes import write_scene_folder

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_scene_folder(data, 1000, args.images)
        images = data / "images"
        runs = [
            ("sed-run infer (one process)", [str(bin_dir / "sed-run"), "infer", str(args.bundle), str(images),
                                             "--out", f"{tmp}/infer", "--no-progress"]),
            ("sed-run batch, 1 actor x 2 CPUs", [str(bin_dir / "sed-run"), "batch", str(images), f"{tmp}/b1",
                                                 "--bundle", str(args.bundle), "--actors", "1",
                                                 "--cpus-per-actor", "2", "--no-progress"]),
            ("sed-run batch, 2 actors x 1 CPU", [str(bin_dir / "sed-run"), "batch", str(images), f"{tmp}/b2",
                                                 "--bundle", str(args.bundle), "--actors", "2",
                                                 "--cpus-per-actor", "1", "--no-progress"]),
        ]
        for label, cmd in runs:
            r = _timed(cmd, env)
            r.update(label=label, images_per_s_wall=round(args.images / float(r["wall_s"]), 2))  # type: ignore[arg-type]
            rows.append(r)
            print(label, r, flush=True)
    given = argv if argv is not None else sys.argv[1:]
    report = {"command": "python benchmarks/batch_throughput.py " + " ".join(given),
              "machine": machine_info(), "images": args.images, "bundle": str(args.bundle), "rows": rows}
    m = report["machine"]
    base = rows[0]["wall_s"]
    lines = [f"# Batch throughput: {args.images} generated scenes, {args.bundle}", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB; each command a fresh process, "
             "wall time including start-up (Ray's included).", "",
             "| run | wall s | images/s | vs one process | actor peak RSS MB | final line |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['wall_s']} | {r['images_per_s_wall']} | {base / r['wall_s']:.2f}x | "
                     f"{', '.join(str(x) for x in r['actor_peak_rss_mb']) or '-'} | {r['last_line'][:90]} |")
    write_script_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
