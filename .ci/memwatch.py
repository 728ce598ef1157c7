"""Charge the test suite's memory to its tests: sample the summed RSS of a process tree (pytest and every
subprocess it starts) every 0.2 s and keep the peak per running test, named by the file that tests/conftest.py
writes when SED_TEST_CURRENT is set.

    SED_TEST_CURRENT=/tmp/current .venv/bin/python -m pytest -q &
    .venv/bin/python .ci/memwatch.py $! /tmp/current peaks.txt

peaks.txt is rewritten at every new peak: "MB<TAB>test id", largest first.
"""

from __future__ import annotations

import collections
import os
import sys
import time

from sed_bench.measure import rss_mb


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids[ppid].append(int(entry))
    return kids


def tree_rss_mb(root: int) -> int:
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += int(rss_mb(pid) or 0)
        todo.extend(kids.get(pid, []))
    return total


def main(root: int, current_file: str, out: str) -> None:
    peaks: dict[str, int] = collections.defaultdict(int)
    while os.path.exists(f"/proc/{root}"):
        try:
            with open(current_file) as f:
                test = f.read().strip() or "?"
        except OSError:
            test = "?"
        total = tree_rss_mb(root)
        if total > peaks[test]:
            peaks[test] = total
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(f"{mb}\t{t}\n" for t, mb in sorted(peaks.items(), key=lambda kv: -kv[1]))
            os.replace(tmp, out)
        time.sleep(0.2)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
