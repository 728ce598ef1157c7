"""Suite-wide hooks. With SED_TEST_MEMLOG=FILE, each test whose run raised the peak RSS of the test process or of
its subprocesses is appended to FILE (test id, new peaks in MB), to find the tests that drive the suite's memory."""

from __future__ import annotations

import os
import resource

import pytest

_MEMLOG = os.environ.get("SED_TEST_MEMLOG")
_peaks = {"self": 0, "children": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001
    yield
    if not _MEMLOG:
        return
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    if own > _peaks["self"] or kids > _peaks["children"]:
        with open(_MEMLOG, "a") as f:
            f.write(f"{item.nodeid}\tself {own} MB\tchildren {kids} MB\n")
        _peaks.update(self=max(own, _peaks["self"]), children=max(kids, _peaks["children"]))
