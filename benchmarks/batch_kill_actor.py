"""Kill one `sed-run batch` actor mid-run: what finished must survive, and a rerun must complete the rest.

A local 2-actor run over generated images; once a share of the label PNGs exists, one Ray actor process
(`ray::MapWorker`) gets SIGKILL. Recorded: whether the run finished on its own (Ray restarts the actor and
retries its task) or failed, every label present at the kill compared byte for byte afterwards, and, if
anything is missing, a rerun of the same command (which skips what is done).

    python benchmarks/batch_kill_actor.py --bundle examples/bundles/sed-shapes --images 60 \
        --out benchmarks/results/cpu-batch-kill-actor
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch_throughput import _tree  # same folder: the process-tree walk over /proc


def _labels(folder: Path) -> dict[str, str]:
    """label file name -> sha256 of its bytes (only whole files exist: they are written atomically)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png")}


def _actors(root: int) -> list[int]:
    pids = []
    for pid in _tree(root):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if name.startswith("ray::MapWorker"):
            pids.append(pid)
    return pids


def _run(cmd: list[str], env: dict[str, str], labels: Path, kill_at: int | None, timeout_s: float
         ) -> dict[str, object]:
    """Run `cmd`; with `kill_at`, SIGKILL one actor once that many labels exist. Bounded by `timeout_s`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    killed: dict[str, object] = {}
    try:
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit(f"{' '.join(cmd)} ran past {timeout_s} s")
            if kill_at is not None and not killed and labels.is_dir() and len(list(labels.glob("*.png"))) >= kill_at:
                actors = _actors(proc.pid)
                if actors:
                    before = _labels(labels)
                    os.kill(actors[0], signal.SIGKILL)
                    killed = {"pid": actors[0], "at_s": round(time.perf_counter() - t0, 1), "labels": before,
                              "actors_alive": len(actors)}
            time.sleep(0.2)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    tail = (out.strip().splitlines() or [""])[-1] if proc.returncode == 0 else (err.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "last_line": tail[:200],
            "killed": killed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--kill-after", type=float, default=0.3, help="share of labels written before the kill")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pyarrow.parquet as pq

    from sed_bench.measure import machine_info
    from sed_bench.report import write_script_report
    from sed_runtime.scenes import write_scene_folder

    sed_run = str(Path(sys.executable).parent / "sed-run")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        write_scene_folder(data, 1000, args.images)
        cmd = [sed_run, "batch", str(data / "images"), str(out), "--bundle", str(args.bundle), "--actors", "2",
               "--cpus-per-actor", "1", "--no-progress"]
        first = _run(cmd, env, out / "labels", max(1, int(args.images * args.kill_after)), 900)
        if not first["killed"]:
            raise SystemExit("the run ended before an actor could be killed; use more --images")
        killed = first["killed"]
        assert isinstance(killed, dict)
        at_kill: dict[str, str] = killed.pop("labels")
        after_first = _labels(out / "labels")
        rerun = None
        if len(after_first) < args.images or first["returncode"] != 0:
            rerun = _run(cmd, env, out / "labels", None, 900)
        final = _labels(out / "labels")
        rows = pq.read_table(out / "summary.parquet").to_pylist() if (out / "summary.parquet").exists() else []
    survived = sum(1 for name, sha in at_kill.items() if final.get(name) == sha)
    results = {
        "command": "python benchmarks/batch_kill_actor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "bundle": str(args.bundle), "images": args.images,
        "killed": {**killed, "labels_written_before": len(at_kill)},
        "first_run": first, "labels_after_first_run": len(after_first), "rerun": rerun,
        "labels_final": len(final), "labels_unchanged_since_kill": survived,
        "summary_rows": len(rows), "error_rows": sum(1 for r in rows if r["error"]),
    }
    m = results["machine"]
    lines = [f"# Killing a `sed-run batch` actor mid-run: {args.images} generated scenes, {args.bundle}", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB. Local Ray, 2 actors x 1 CPU; "
             f"one actor process (pid {killed['pid']}) got SIGKILL {killed['at_s']} s into the run, when "
             f"{len(at_kill)} of {args.images} labels were written.", "",
             "| | exit code | wall s | labels after | final line |", "|---|---|---|---|---|",
             f"| run with the kill | {first['returncode']} | {first['wall_s']} | {len(after_first)} | "
             f"{first['last_line'][:110]} |"]
    if rerun is not None:
        lines.append(f"| rerun (skips what is done) | {rerun['returncode']} | {rerun['wall_s']} | {len(final)} | "
                     f"{rerun['last_line'][:110]} |")
    lines += ["", f"- Labels written before the kill and byte-identical at the end: {survived} of {len(at_kill)}.",
              f"- Labels at the end: {len(final)} of {args.images}; summary rows: {len(rows)} "
              f"({results['error_rows']} error rows)."]
    write_script_report(args.out, results, lines)
    return 0 if survived == len(at_kill) and len(final) == args.images == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
