"""A Triton Inference Server model repository from a bundle: the image encoder, the decoder, the text encoder,
and an ensemble (image + text embeddings -> scores and kept classes), all in Triton's own formats.

Shapes and types come from the bundle's graphs, so every `config.pbtxt` states what its model file really
takes. Batch size 1 as in SED's inference path (`max_batch_size: 0`, full shapes): the decoder's class axis N
is the variable one (-1), and `k` keeps its ONNX shape [1]. Platform `python` serves the same ONNX files from
Python-backend models (ONNX Runtime inside; for servers built with only that backend). Every config is checked
against Triton's own ModelConfig protobuf (tritonclient ships it) and against the graph before the repository is
written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sed_runtime.bundle import Bundle
from sed_runtime.errors import BundleError, OutputError, SedUserError

__all__ = ["PLATFORMS", "model_configs", "write_triton_repository", "validate_config"]

PLATFORMS = ("onnxruntime", "tensorrt", "python")
PYTHON_MODEL = Path(__file__).with_name("triton_python") / "model.py"  # runs model.onnx with ONNX Runtime
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
NAMES = {"encoder": "sed_encoder", "decoder": "sed_decoder", "text_encoder": "sed_text_encoder"}
ENSEMBLE = "sed"


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensors(kind: str, records: list[dict[str, Any]]) -> str:
    items = []
    for r in records:
        items.append(f'  {{\n    name: "{r["name"]}"\n    data_type: {TYPES[r["dtype"]]}\n'
                     f'    dims: [ {", ".join(str(d) for d in _dims(r["shape"]))} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _model_config(name: str, platform: str, graph: dict[str, Any]) -> str:
    """`platform` is Triton's (onnxruntime_onnx, tensorrt_plan) or "python" for our Python-backend model."""
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    runs_on = 'backend: "python"' if platform == "python" else f'platform: "{platform}"'
    return (f'name: "{name}"\n{runs_on}\nmax_batch_size: 0\n'
            + _tensors("input", graph["inputs"]) + _tensors("output", graph["outputs"])
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def _ensemble_config(graphs: dict[str, dict[str, Any]]) -> str:
    enc, dec = graphs["encoder"], graphs["decoder"]
    inputs = [enc["inputs"][0]] + [r for r in dec["inputs"] if r["name"] in ("text", "k")]
    outputs = dec["outputs"]
    feats = [r["name"] for r in enc["outputs"]]
    enc_map = "".join(f'      output_map {{\n        key: "{n}"\n        value: "{n}"\n      }}\n' for n in feats)
    dec_in = "".join(f'      input_map {{\n        key: "{r["name"]}"\n        value: "{r["name"]}"\n      }}\n'
                     for r in dec["inputs"])
    dec_out = "".join(f'      output_map {{\n        key: "{r["name"]}"\n        value: "{r["name"]}"\n      }}\n'
                      for r in outputs)
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
            + _tensors("input", inputs) + _tensors("output", outputs)
            + "ensemble_scheduling {\n  step [\n"
            + f'    {{\n      model_name: "{NAMES["encoder"]}"\n      model_version: -1\n'
            + '      input_map {\n        key: "image"\n        value: "image"\n      }\n' + enc_map + "    },\n"
            + f'    {{\n      model_name: "{NAMES["decoder"]}"\n      model_version: -1\n' + dec_in + dec_out
            + "    }\n  ]\n}\n")


def model_configs(bundle: Bundle, platform: str = "onnxruntime") -> dict[str, str]:
    """Model name -> config.pbtxt text for the encoder, decoder, text encoder and the ensemble."""
    if platform not in PLATFORMS:
        raise SedUserError(f"--platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    graphs = bundle.manifest["graphs"]
    if platform == "tensorrt" and "engines" not in bundle.manifest:
        raise BundleError(f"{bundle.root} has no TensorRT plans; build it with `sed-export build --engine tensorrt` "
                          "or export with --platform onnxruntime")
    engines = bundle.manifest.get("engines") or {}
    if platform == "tensorrt" and engines.get("cer") == "split":
        raise BundleError(f"{bundle.root} runs CER between four decoder plans (--cer split), which an ensemble "
                          "cannot express; export a standard-ops or plugin bundle, or --platform onnxruntime")
    configs = {}
    for role, name in NAMES.items():
        trt = platform == "tensorrt" and role != "text_encoder"  # the text encoder has no plan: always ONNX
        kind = "python" if platform == "python" else "tensorrt_plan" if trt else "onnxruntime_onnx"
        configs[name] = _model_config(name, kind, graphs[role])
    configs[ENSEMBLE] = _ensemble_config(graphs)
    return configs


def validate_config(text: str) -> Any:
    """Parse with Triton's ModelConfig schema; a config Triton would reject raises SedUserError."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SedUserError("validating Triton configs needs tritonclient: pip install 'sed-deploy[triton]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise SedUserError(f"generated config.pbtxt does not parse with Triton's schema ({e}); "
                           "please report it") from None


def write_triton_repository(bundle_dir: Path, out: Path, platform: str = "onnxruntime", force: bool = False) -> Path:
    """Write (whole or not at all) a model repository for `bundle_dir` into `out`; returns `out`."""
    bundle = Bundle.open(bundle_dir)
    configs = model_configs(bundle, platform)
    for text in configs.values():
        validate_config(text)
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another --out")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for role, name in [*NAMES.items(), ("ensemble", ENSEMBLE)]:
            folder = tmp / name
            (folder / "1").mkdir(parents=True)
            (folder / "config.pbtxt").write_text(configs[name])
            if role == "ensemble":
                continue
            if platform == "tensorrt" and role != "text_encoder":
                plan = bundle.root / bundle.manifest["engines"]["plans"][role]["file"]
                shutil.copy2(plan, folder / "1" / "model.plan")
            else:
                shutil.copy2(bundle.path(role), folder / "1" / "model.onnx")
            if platform == "python":
                shutil.copy2(PYTHON_MODEL, folder / "1" / "model.py")
        (tmp / "README.md").write_text(_readme(bundle, platform))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readme(bundle: Bundle, platform: str) -> str:
    plugins = [p["file"] for p in (bundle.manifest.get("engines") or {}).get("plugins", [])]
    lines = [
        f"# Triton model repository for {bundle.model_name} ({bundle.manifest['precision']}, {platform})", "",
        f"Exported by `sed-export triton` from `{bundle.root}`. Models: `{NAMES['encoder']}` (image -> features),",
        f"`{NAMES['decoder']}` (features + text embeddings N x P x E + k -> scores N x h x w, kept0..2, and probs:",
        "the kept2 rows alone),",
        f"`{NAMES['text_encoder']}` (tokens from the bundle's tokenizer.json -> text features), and the ensemble",
        f"`{ENSEMBLE}` (image + text + k -> scores and kept). Text embeddings are per vocabulary: compute them once",
        "(`sed-export embed-text`, or the bundle's `text/*.safetensors`) and send them with every request.", "",
        "    tritonserver --model-repository=$PWD",
    ]
    if platform == "python":
        lines += ["", "Every model is a Python-backend model (`1/model.py`) running `1/model.onnx` with ONNX Runtime",
                  "on the CPU: the Python that the backend's stub runs needs numpy and onnxruntime."]
    if plugins:
        lines += ["", "The decoder plan uses our top-k-union plugin: load it with",
                  f"`--backend-config=tensorrt,plugins=/path/to/{plugins[0]}` (or LD_PRELOAD it)."]
    return "\n".join(lines) + "\n"
