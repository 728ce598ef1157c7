"""Suite-wide hooks. With SED_TEST_MEMLOG=FILE, each test whose run raised the peak RSS of the test process or of
its subprocesses is appended to FILE (test id, new peaks in MB), to find the tests that drive the suite's memory."""

from __future__ import annotations

import os
import resource

import pytest

_MEMLOG = os.environ.get("SED_TEST_MEMLOG")
_peaks = {"self": 0, "children": 0}


def _release_freed_memory() -> None:
    """Hand memory freed by a test back to the OS. glibc keeps freed heap pages mapped, so one big test
    leaves the pytest process at its peak, and the next test's subprocesses stack on top of it (measured: the
    split-decoder test reached 10.5 GB of process-tree RSS on top of 6.8 GB left over by earlier tests)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001
    yield
    _release_freed_memory()
    if not _MEMLOG:
        return
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    if own > _peaks["self"] or kids > _peaks["children"]:
        with open(_MEMLOG, "a") as f:
            f.write(f"{item.nodeid}\tself {own} MB\tchildren {kids} MB\n")
        _peaks.update(self=max(own, _peaks["self"]), children=max(kids, _peaks["children"]))


_CURRENT = os.environ.get("SED_TEST_CURRENT")


def pytest_runtest_logstart(nodeid, location):  # noqa: ANN001
    """With SED_TEST_CURRENT=FILE, FILE always names the running test, so an outside sampler of the process
    tree's memory (`.ci/memwatch.py`, which also sees subprocesses) can charge each peak to its test."""
    if _CURRENT:
        with open(_CURRENT, "w") as f:
            f.write(nodeid)
