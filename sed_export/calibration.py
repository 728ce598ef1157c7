"""INT8 calibration for the CPU path: calibration sets, their cache, and QDQ quantization of the encoder.

A calibration set is a deterministic sample of user images (`--calib DIR`) or of generated scenes
(`--calib shapes`), preprocessed exactly as at run time. The preprocessed tensors are cached under
`$SED_CACHE_DIR/calib/`, keyed by model, checkpoint sha256, input settings and the image list's hash (names and
file bytes), so a changed image, checkpoint or model recalibrates and never reuses stale ranges.

The encoder is where a CPU run spends its time (sed-b: about 2.8 s of a 768 x 768 image on 2 cores), so it is
what we quantize, with ONNX Runtime's static QDQ (after `quant_pre_process`) on Conv/MatMul/Gemm only, S8
per-channel weights, ranges by `METHODS` (MinMax by default), in one of two flavours (`FLAVOURS`):
- `cpu` (ONNX Runtime, OpenVINO): U8 asymmetric activations, int32 biases, as their int8 kernels want;
- `tensorrt` (explicit quantization in a strongly typed network): S8 symmetric activations (TensorRT rejects
  non-zero zero points) and float biases (no int32 bias), the rest of the graph fp32. Not fp16: Q/DQ on fp16
  tensors needs opset 19, and the bundle's graphs are opset 18.
The decoder stays fp32: CER ranks classes on its aux logits, and its cost is small at the paper's k. The
manifest records all of it.

Calibration drives ONNX Runtime's calibrator one image at a time on a session without the CPU memory arena, so
its memory is one image's activations whatever the image count (`quantize_static`'s own loop holds every image's
intermediate tensors until the end, and its arena keeps their high-water mark; measured on sed-b's encoder, 4
images: 6.45 GiB with the arena, 5.38 without). The ranges go to ONNX Runtime's calibration cache format, which
`quantize_static(calibration_cache_path=...)` then reads; they are kept beside the tensors, keyed by the tensors'
key, the fp32 graph's bytes, the method and the flavour, so a rebuild with the same inputs skips calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.backends.base import InputSpec
from sed_runtime.errors import DatasetError, SedUserError
from sed_runtime.evaluation import IMAGE_SUFFIXES
from sed_runtime.text_cache import default_cache_dir

__all__ = ["FLAVOURS", "METHODS", "CalibrationRequest", "CalibrationSet", "calibration_set", "calibration_tensors",
           "quantize_encoder", "ranges_cache_path"]

CALIB_SCENE_SEED = 7  # generated calibration scenes: neither the training seed (0) nor sed-eval's (1000)
OP_TYPES = ("Conv", "MatMul", "Gemm")
FLAVOURS = ("cpu", "tensorrt")
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # --calib-method: ORT's names


@dataclass(frozen=True)
class CalibrationRequest:
    """What `sed-export build --precision int8` was asked for: where the images come from, how many, the draw's
    seed, the Q/DQ flavour and the range method."""

    source: str
    images: int = 32
    seed: int = 0
    flavour: str = "cpu"
    method: str = "minmax"
    min_sqnr_db: float | None = None  # leave nodes whose activation input scores below this in float


@dataclass(frozen=True)
class CalibrationSet:
    """The chosen images: where they come from, their names and the hash that keys the cache."""

    source: str
    names: tuple[str, ...]
    digest: str
    seed: int

    def images(self) -> Iterator[np.ndarray]:
        from sed_runtime.preprocess import load_image
        from sed_runtime.scenes import generate_scene

        for name in self.names:
            if self.source == "shapes":
                yield generate_scene(CALIB_SCENE_SEED, int(name.rsplit("-", 1)[1])).image
            else:
                yield load_image(Path(self.source) / name)


def calibration_set(source: str, count: int, seed: int = 0) -> CalibrationSet:
    """`count` images drawn without replacement (numpy seed `seed`) from a folder, or generated scenes."""
    if count < 1:
        raise SedUserError(f"--calib-images must be >= 1, got {count}")
    h = hashlib.sha256()
    if source == "shapes":
        rng = np.random.default_rng(seed)
        names = tuple(f"scene-{i}" for i in sorted(rng.choice(100_000, size=count, replace=False).tolist()))
        h.update(f"shapes:{CALIB_SCENE_SEED}:".encode() + "\n".join(names).encode())
        return CalibrationSet("shapes", names, h.hexdigest(), seed)
    folder = Path(source)
    if not folder.is_dir():
        raise DatasetError(f"--calib {source}: not a folder; pass a folder of images or 'shapes'")
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < count:
        raise DatasetError(f"--calib {source} has {len(files)} images, fewer than --calib-images {count}; "
                           "add images or lower --calib-images")
    rng = np.random.default_rng(seed)
    names = tuple(sorted(files[i] for i in rng.choice(len(files), size=count, replace=False).tolist()))
    for name in names:  # names and contents: an edited image is another calibration set
        h.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    return CalibrationSet(str(folder.resolve()), names, h.hexdigest(), seed)


def cache_key(model_name: str, checkpoint_sha256: str | None, spec: InputSpec, calib: CalibrationSet) -> str:
    record = {"model": model_name, "checkpoint": checkpoint_sha256 or "random", "input": spec.__dict__,
              "images": calib.digest}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()[:32]


def calibration_tensors(model_name: str, checkpoint_sha256: str | None, spec: InputSpec, calib: CalibrationSet,
                        cache_dir: Path | None = None) -> tuple[np.ndarray, bool]:
    """(n, 3, S, S) float32 preprocessed images and whether they came from the cache."""
    root = (cache_dir or default_cache_dir()) / "calib"
    path = root / f"{cache_key(model_name, checkpoint_sha256, spec, calib)}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(calib.names), 3, spec.input_size, spec.input_size):
                return cached, True
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed
    tensors = np.concatenate([spec.preprocess(img).tensor for img in calib.images()]).astype(np.float32)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, tensors)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time next build
    return tensors, False


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed tensors."""

    def __init__(self, tensors: np.ndarray, input_name: str) -> None:
        self._it = iter(tensors)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x[None]}


def _calibrate(pre: Path, tensors: np.ndarray, input_name: str, method: str, ranges_out: Path) -> None:
    """Activation ranges of `pre` (the `quant_pre_process`ed graph) over `tensors`, one image per run of an
    arena-less session, written to `ranges_out` in ONNX Runtime's calibration cache format."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(pre, list(OP_TYPES), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, METHODS[method]))
        calibrator.infer_session = None  # replaced by one without the arena (same graph options as ORT's own)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        for i in range(len(tensors)):  # each call folds one image into the running ranges or histograms
            calibrator.collect_data(_Reader(tensors[i:i + 1], input_name))
        save_tensors_data(calibrator.compute_data(), ranges_out)


def ranges_cache_path(tensors_key: str, fp32_graph: Path, method: str, flavour: str,
                      cache_dir: Path | None = None) -> Path:
    """Where the activation ranges of this calibration of this graph are cached."""
    h = hashlib.sha256(fp32_graph.read_bytes()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / "calib" / f"{tensors_key}-{h}-{method}-{flavour}.ranges.json"


def quantize_encoder(fp32_path: Path, out_path: Path, tensors: np.ndarray, flavour: str = "cpu",
                     method: str = "minmax", ranges_cache: Path | None = None,
                     min_sqnr_db: float | None = None) -> dict[str, Any]:
    """Static QDQ int8 of an fp32 encoder graph in `flavour` with `method` ranges (see the module docstring);
    `ranges_cache` is read when it exists and written (whole) when not. With `min_sqnr_db`, nodes whose activation
    input scores below it (`quant_sensitivity.node_sqnr` on two calibration images) are left in float and the graph
    is quantized again from the same ranges. Returns the manifest's record."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if flavour not in FLAVOURS:
        raise SedUserError(f"int8 flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    if method not in METHODS:
        raise SedUserError(f"--calib-method must be one of {', '.join(METHODS)}, got {method!r}")
    trt = flavour == "tensorrt"
    options: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} if trt \
        else {}
    sensitivity: dict[str, float] = {}
    excluded: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        input_name = model.graph.input[0].name
        candidates = [n.name for n in model.graph.node if n.op_type in OP_TYPES]
        hit = ranges_cache is not None and _valid_json(ranges_cache)
        ranges = ranges_cache if hit else Path(tmp) / "ranges.json"
        if not hit:
            _calibrate(pre, tensors, input_name, method, ranges)

        def quantize(exclude: list[str]) -> None:
            quantize_static(str(pre), str(out_path), None, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(OP_TYPES),
                            nodes_to_exclude=exclude, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            extra_options=options, calibration_cache_path=str(ranges))  # ranges from the file

        quantize([])
        if min_sqnr_db is not None:
            from .quant_sensitivity import node_sqnr

            sensitivity = node_sqnr(out_path, [{input_name: x[None]} for x in tensors[:2]], OP_TYPES)
            excluded = sorted(n for n, db in sensitivity.items() if db < min_sqnr_db)
            if excluded:
                quantize(excluded)  # from the same ranges file: no second calibration
        if ranges_cache is not None and not hit and ranges.is_file():
            try:
                ranges_cache.parent.mkdir(parents=True, exist_ok=True)
                fd, part = tempfile.mkstemp(dir=ranges_cache.parent, suffix=".part")
                os.close(fd)
                shutil.copyfile(ranges, part)
                os.replace(part, ranges_cache)
            except OSError:
                pass  # an unwritable cache only costs time next build
    q = onnx.load(str(out_path))
    dq_outputs = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sorted(n.name for n in q.graph.node if n.op_type in OP_TYPES and set(n.input) & dq_outputs)
    return {
        "flavour": flavour,
        "method": f"onnxruntime quantize_static, QDQ, {METHODS[method]}",
        "ranges": "from the cache" if hit else "calibrated",
        "collection": "one image at a time",
        "activations": "int8 (symmetric, per tensor)" if trt else "uint8 (asymmetric, per tensor)",
        "weights": "int8 (symmetric, per channel)",
        "bias": "float (not quantized)" if trt else "int32",
        "op_types": list(OP_TYPES),
        "graphs": {"encoder": "int8", "decoder": "fp32", "text_encoder": "fp32"},
        "quantized_nodes": len(quantized),
        "candidate_nodes": len(candidates),
        "not_quantized": sorted(set(candidates) - set(quantized)),
        **({} if min_sqnr_db is None else {"sensitivity": {
            "min_sqnr_db": min_sqnr_db, "images": min(2, len(tensors)),
            "excluded": {n: round(sensitivity[n], 1) for n in excluded},
            "sqnr_db": {"min": round(min(sensitivity.values()), 1) if sensitivity else None,
                        "median": round(float(np.median(list(sensitivity.values()))), 1) if sensitivity else None}}}),
    }


def _valid_json(path: Path) -> bool:
    """Whether a cached ranges file can be used (a damaged one is recalibrated and replaced)."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
