"""`need(module)`: the honest importorskip. A package that is not installed skips the test with a stated reason;
one that is installed but fails to import is an error, not a silent skip. With SED_TESTS_STRICT=1 (set by
.ci/run, which installs every extra the suite uses) a missing package fails too."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest

EXTRAS = {"torch": "export", "open_clip": "export", "onnx": "onnx", "onnxruntime": "onnx", "tokenizers": "onnx",
          "hypothesis": "dev", "openvino": "openvino", "tritonclient": "triton", "ray": "ray"}


def need(name: str) -> ModuleType:
    if importlib.util.find_spec(name) is None:
        why = f"{name} is not installed (pip install -e '.[{EXTRAS.get(name, 'dev')}]')"
        if os.environ.get("SED_TESTS_STRICT") == "1":
            pytest.fail(f"{why}, and SED_TESTS_STRICT=1 says the suite's extras are installed", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    return importlib.import_module(name)  # an installed but broken package raises here: an error, not a skip
