"""INT8 calibration: calibration sets, their cache, and QDQ quantization of the encoder (and the decoder).

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
The decoder stays fp32 unless asked (`CalibrationRequest.decoder`, `--int8-decoder`, CPU flavour): then it is
calibrated on the fp32 encoder's outputs for the same images and the bundle vocabulary's embeddings, through CER at
`DECODER_K`, and `decoder_exclusions` (the heads CER ranks on, the final head, activation x activation MatMuls) stay
float and read float. The manifest records all of it.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.backends.base import InputSpec
from sed_runtime.errors import DatasetError, SedUserError
from sed_runtime.evaluation import IMAGE_SUFFIXES
from sed_runtime.text_cache import default_cache_dir

__all__ = ["FLAVOURS", "METHODS", "CalibrationRequest", "CalibrationSet", "calibrated_encoder", "calibration_set",
           "calibration_tensors",
           "decoder_class_groups", "decoder_exclusions", "quantize_decoder", "quantize_encoder", "quantize_graph",
           "ranges_cache_path"]

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
    decoder: bool = False  # quantize the one-graph decoder too (CPU flavour), calibrated through CER at DECODER_K


DECODER_K = 8  # CER's k while calibrating the decoder: sed-run's default
# The decoder's calibration runs hold about twice the one-pass decoder's predicted peak (sed-b, A-150, random
# weights keeping every class: 16.6 GB for a predicted 7.9 GiB), so each image sees a group of the vocabulary sized
# to keep that under DECODER_CALIB_BUDGET; the groups cover every class across the images.
DECODER_CALIB_FACTOR = 2.0
DECODER_CALIB_BUDGET = 4 * 2**30


def decoder_class_groups(memory: Any, num_classes: int, images: int, seed: int) -> list[np.ndarray]:
    """Class indices each calibration image decodes: the whole vocabulary when it fits DECODER_CALIB_BUDGET
    (`memory`: a `sed_runtime.memory.DecoderMemory`, every class kept), else a seeded partition into near-equal
    groups that do, assigned to the images in turn."""
    size = num_classes
    while size > 1 and DECODER_CALIB_FACTOR * memory.peak_bytes(size) > DECODER_CALIB_BUDGET:
        size -= 1
    groups = max(1, -(-num_classes // size))
    order = np.random.default_rng(seed).permutation(num_classes) if groups > 1 else np.arange(num_classes)
    parts = [np.sort(part) for part in np.array_split(order, groups)]
    return [parts[i % groups] for i in range(images)]


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
    """onnxruntime.quantization's CalibrationDataReader over feed dictionaries."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _calibrate(pre: Path, feeds: Sequence[dict[str, np.ndarray]], method: str, ranges_out: Path) -> None:
    """Activation ranges of `pre` (the `quant_pre_process`ed graph) over `feeds`, one image per run of an
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
        for feed in feeds:  # each call folds one image into the running ranges or histograms
            calibrator.collect_data(_Reader([feed]))
        save_tensors_data(calibrator.compute_data(), ranges_out)


def ranges_cache_path(tensors_key: str, fp32_graph: Path, method: str, flavour: str,
                      cache_dir: Path | None = None) -> Path:
    """Where the activation ranges of this calibration of this graph are cached."""
    h = hashlib.sha256(fp32_graph.read_bytes()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / "calib" / f"{tensors_key}-{h}-{method}-{flavour}.ranges.json"


def calibrated_encoder(fp32_path: Path, out_path: Path, model_name: str, checkpoint_sha256: str | None,
                       spec: InputSpec, request: CalibrationRequest, calib: CalibrationSet,
                       ) -> tuple[dict[str, Any], np.ndarray, str]:
    """The whole int8 encoder step of `request` on its drawn set `calib`: preprocess the images (or take them from
    the cache), quantize `fp32_path` into `out_path` with the ranges cache. Returns the manifest's record (with its
    `calibration` section), the preprocessed tensors, and a line saying what came from the caches."""
    tensors, cached = calibration_tensors(model_name, checkpoint_sha256, spec, calib)
    ranges = ranges_cache_path(cache_key(model_name, checkpoint_sha256, spec, calib), fp32_path, request.method,
                               request.flavour)
    record = quantize_encoder(fp32_path, out_path, tensors, request.flavour, request.method, ranges_cache=ranges,
                              min_sqnr_db=request.min_sqnr_db)
    how = record.pop("ranges")  # not in the manifest: a rebuild from the cache is the same bundle
    note = (f"{len(calib.names)} images from {request.source} (seed {request.seed}), {request.method} ranges {how}"
            f"{', images cached' if cached else ''}")
    record["calibration"] = {"source": calib.source, "images": len(calib.names), "seed": request.seed,
                             "image_list_sha256": calib.digest, "names": list(calib.names)}
    return record, tensors, note


def quantize_encoder(fp32_path: Path, out_path: Path, tensors: np.ndarray, flavour: str = "cpu",
                     method: str = "minmax", ranges_cache: Path | None = None,
                     min_sqnr_db: float | None = None) -> dict[str, Any]:
    """Static QDQ int8 of an fp32 encoder graph over preprocessed images (see the module docstring)."""
    import onnx

    name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    record = quantize_graph(fp32_path, out_path, [{name: x[None]} for x in tensors], flavour, method, ranges_cache,
                            min_sqnr_db)
    return {**record, "graphs": {"encoder": "int8", "decoder": "fp32", "text_encoder": "fp32"}}


DECODER_HEADS = ("head0", "aux", "head")  # the aux heads CER ranks on, and the final per-class head


def decoder_exclusions(graph_path: Path) -> dict[str, str]:
    """Decoder nodes left in float whatever they score, with why: the heads (CER ranks classes on the aux heads'
    logits; the last head gives the scores) and every MatMul of two activations (the cost volume's image-text
    cosine, the class attention's products), whose per-tensor ranges span every class. On the trained sed-shapes
    (16 calibration scenes, 40 held-out ones at k = 1): quantizing all of them kept 99.35% of pixels, these rules
    99.93%."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    constant = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in OP_TYPES:
            continue
        if any(f"/{h}/" in node.name for h in DECODER_HEADS):
            out[node.name] = "head (CER ranking or final scores)"
        elif node.op_type == "MatMul" and not set(node.input[:2]) & constant:
            out[node.name] = "activation x activation MatMul"
    return out


def quantize_decoder(fp32_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                     min_sqnr_db: float | None = None) -> dict[str, Any]:
    """Static QDQ int8 (CPU flavour) of the one-graph decoder over real encoder outputs and the bundle's text
    embeddings, through CER (the feeds carry k), leaving `decoder_exclusions` in float."""
    rules = decoder_exclusions(fp32_path)
    record = quantize_graph(fp32_path, out_path, feeds, "cpu", method, None, min_sqnr_db, exclude=sorted(rules))
    return {**record, "excluded_by_rule": rules}


def quantize_graph(fp32_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]], flavour: str = "cpu",
                   method: str = "minmax", ranges_cache: Path | None = None, min_sqnr_db: float | None = None,
                   exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Static QDQ int8 of an fp32 graph in `flavour` with `method` ranges over `feeds` (one dict per image);
    `ranges_cache` is read when it exists and written (whole) when not; `exclude` stays in float. With
    `min_sqnr_db`, nodes whose activation input scores below it (`quant_sensitivity.node_sqnr` on two of the feeds)
    are left in float too and the graph is quantized again from the same ranges. Returns the manifest's record."""
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
        candidates = [n.name for n in model.graph.node if n.op_type in OP_TYPES]
        hit = ranges_cache is not None and _valid_json(ranges_cache)
        ranges = ranges_cache if hit else Path(tmp) / "ranges.json"
        if not hit:
            _calibrate(pre, feeds, method, ranges)

        def quantize(leave: list[str]) -> None:
            quantize_static(str(pre), str(out_path), None, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(OP_TYPES),
                            nodes_to_exclude=leave, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            extra_options=options, calibration_cache_path=str(ranges))  # ranges from the file

        quantize(list(exclude))
        if exclude:
            _float_inputs(out_path, exclude)
        if min_sqnr_db is not None:
            from .quant_sensitivity import node_sqnr

            sensitivity = node_sqnr(out_path, list(feeds[:2]), OP_TYPES)
            excluded = sorted(n for n, db in sensitivity.items() if db < min_sqnr_db)
            if excluded:
                quantize(sorted({*exclude, *excluded}))  # from the same ranges file: no second calibration
                _float_inputs(out_path, [*exclude, *excluded])
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
    quantized = sorted(n.name for n in q.graph.node  # both operands (data and weight, or two activations) int8
                       if n.op_type in OP_TYPES and set(n.input[:2]) <= dq_outputs)
    return {
        "flavour": flavour,
        "method": f"onnxruntime quantize_static, QDQ, {METHODS[method]}",
        "ranges": "from the cache" if hit else "calibrated",
        "collection": "one image at a time",
        "activations": "int8 (symmetric, per tensor)" if trt else "uint8 (asymmetric, per tensor)",
        "weights": "int8 (symmetric, per channel)",
        "bias": "float (not quantized)" if trt else "int32",
        "op_types": list(OP_TYPES),
        "quantized_nodes": len(quantized),
        "candidate_nodes": len(candidates),
        "not_quantized": sorted(set(candidates) - set(quantized)),
        **({} if min_sqnr_db is None else {"sensitivity": {
            "min_sqnr_db": min_sqnr_db, "images": min(2, len(feeds)),
            "excluded": {n: round(sensitivity[n], 1) for n in excluded},
            "sqnr_db": {"min": round(min(sensitivity.values()), 1) if sensitivity else None,
                        "median": round(float(np.median(list(sensitivity.values()))), 1) if sensitivity else None}}}),
    }


def _float_inputs(path: Path, nodes: Sequence[str]) -> None:
    """Rewire `nodes` (left in float) to read the float tensors behind any Q/DQ pair they share with quantized
    neighbours: ONNX Runtime feeds every consumer of a quantized tensor from the same DequantizeLinear, so a head
    left in float would still see int8-rounded inputs."""
    import onnx

    model = onnx.load(str(path))
    q_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq_source = {n.output[0]: q_input.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    wanted = set(nodes)
    for node in model.graph.node:
        if node.name in wanted:
            for i, name in enumerate(node.input):
                if dq_source.get(name):  # an activation's pair (a weight's DQ reads an initializer, not a Q)
                    node.input[i] = dq_source[name]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    while True:  # drop Q/DQ pairs nothing reads any more
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    onnx.save(model, str(path))


def _valid_json(path: Path) -> bool:
    """Whether a cached ranges file can be used (a damaged one is recalibrated and replaced)."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
