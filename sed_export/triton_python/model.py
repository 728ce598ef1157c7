"""Triton Python-backend model that runs the ONNX graph beside it (`model.onnx`) with ONNX Runtime on the CPU.

Written into each model of a `sed-export triton --platform python` repository. It serves a bundle from a
tritonserver that has only the Python backend (PyTriton's wheel, or a CPU-only build), and the `sed` ensemble
wires these models exactly as it wires the onnxruntime ones. Inputs and outputs are the graph's own, by name.
Needs numpy and onnxruntime in the Python the backend's stub runs.

Tensors cross the backend through DLPack (`np.from_dlpack`, `Tensor.from_dlpack`), not `as_numpy()` and
`Tensor(name, array)`: with numpy 2 in that Python, the stub of Triton 2.51 (PyTriton 0.7) silently sent empty
outputs that way, and the decoder read wrong inputs (measured: scores off by up to 0.996, kept classes 0..7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the Python backend inside tritonserver


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 0)  # 0: ONNX Runtime's default
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                feed = {name: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name)) for name in self.inputs}
                results = self.session.run(self.outputs, feed)
            except Exception as e:  # a bad request fails alone, with ONNX Runtime's message
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
                continue
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value))
                       for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
