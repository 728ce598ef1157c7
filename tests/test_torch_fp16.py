"""The torch backend's fp16 mode (autocast; what sed-bench compares on a GPU) against its fp32 mode."""

from __future__ import annotations

import numpy as np
import pytest
from needs import need

torch = need("torch")

from sed_export.decoder import linear_attention  # noqa: E402
from sed_runtime.backends.torch_backend import TorchBackend  # noqa: E402
from sed_runtime.errors import SedUserError  # noqa: E402
from sed_runtime.postprocess import segment  # noqa: E402


def test_linear_attention_class_sums_stay_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 300, 8, generator=g) for _ in range(3))
    ref = linear_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.float16):
        got = linear_attention(q, k, v)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_fp16_agrees_with_fp32_on_segmentation() -> None:
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 768, 768, generator=g).numpy()
    text = torch.nn.functional.normalize(torch.randn(6, 80, 64, generator=g), dim=-1).numpy()
    a = TorchBackend("sed-tiny", seed=9).infer(image, text, 2)
    fp16 = TorchBackend("sed-tiny", seed=9, precision="fp16")
    assert fp16.describe()["precision"] == "fp16"
    b = fp16.infer(image, text, 2)
    diff = np.abs(a.scores - b.scores).max()
    assert 0 < diff < 5e-3  # > 0: half precision really ran
    assert (segment(a.scores, (300, 400)) == segment(b.scores, (300, 400))).mean() >= 0.98
    with pytest.raises(SedUserError, match="fp32 or fp16"):
        TorchBackend("sed-tiny", precision="int8")
