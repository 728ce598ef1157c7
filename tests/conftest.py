"""Suite-wide hooks: freed memory goes back to the OS after each test, and with SED_TEST_CURRENT=FILE the running
test's id is kept in FILE for `.ci/memwatch.py`, which charges the process tree's memory peaks to tests."""

from __future__ import annotations

import os

import pytest

_CURRENT = os.environ.get("SED_TEST_CURRENT")


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


def pytest_runtest_logstart(nodeid, location):  # noqa: ANN001
    """FILE always names the running test, so an outside sampler of the process tree's memory (which also sees
    subprocesses, unlike this process's own peak counters) can charge each peak to its test."""
    if _CURRENT:
        with open(_CURRENT, "w") as f:
            f.write(nodeid)
