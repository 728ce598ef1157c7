"""Batch inference over many images on Ray Data: decode in Ray tasks, segment in an actor pool, one label PNG per
image and one Parquet table of summaries. Ray schedules and retries; nothing here is a scheduler.

- One backend per actor (ONNX Runtime with intra-op threads = the actor's CPUs; TensorRT per GPU), with the
  vocabulary's text embeddings computed once per actor.
- Actors write each image's label map (uint16 PNG, atomically) and return only a small summary row, never
  N x H x W scores.
- Resumable: an image whose label PNG exists and whose summary row was written is skipped; a bad image becomes
  an error row, never a crashed job. A run that dies (an actor killed, Ctrl-C) still writes the rows it got, and
  an image whose label an actor wrote but whose row never reached the table is redone by the rerun.
- Without an address, a local Ray runs on 127.0.0.1 only (no dashboard) and is stopped at the end. Ray
  replaces localhost by the machine's reachable address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set
  before it starts (checked with Ray 2.60), so that is set first.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError, SedUserError
from .evaluation import IMAGE_SUFFIXES

__all__ = ["BatchSummary", "labels_path", "list_images", "run", "start_local_ray"]

SUMMARY = "summary.parquet"

# Before any `import ray` in this process: Ray reads it at import time (see start_local_ray).
_LOOPBACK_BEFORE_RAY = "ray" not in __import__("sys").modules or \
    os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass(frozen=True)
class BatchSummary:
    images: int
    done: int
    skipped: int
    errors: int
    seconds: float
    output: Path

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def list_images(source: str) -> list[str]:
    """Image files of a local folder (sorted), or of any folder pyarrow's filesystems reach (s3://, gs://, ...)."""
    if "://" in source:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(source)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        scheme = source.split("://", 1)[0]
        return sorted(f"{scheme}://{i.path}" for i in infos if i.is_file and i.path.lower().endswith(IMAGE_SUFFIXES))
    folder = Path(source)
    if not folder.is_dir():
        raise SedUserError(f"input {source} is not a folder; pass a folder of images (or a URI such as s3://...)")
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def labels_path(output: Path, image: str, root: str) -> Path:
    """OUTPUT/labels/<path relative to the input, suffix .png>: unique even when stems repeat in subfolders."""
    rel = image.split("://", 1)[-1][len(root.split("://", 1)[-1]):].lstrip("/")
    return output / "labels" / Path(rel).with_suffix(".png")


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(p) as f:
            return f.read()
    return Path(path).read_bytes()


def _load(path: str) -> np.ndarray:
    from .preprocess import load_image

    if "://" not in path:
        return load_image(path)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=Path(path).suffix) as f:  # load_image reads files: same checks
        f.write(_read_bytes(path))
        f.flush()
        return load_image(f.name)


def _decode(row: dict[str, Any], spec: Any) -> dict[str, Any]:
    """Ray task: read, decode and preprocess one image; a bad file becomes an error row (same tensor shape, so
    the column stays one fixed-shape tensor)."""
    t0 = time.perf_counter()
    out = {"image": row["image"], "label": row["label"], "error": "", "height": 0, "width": 0,
           "tensor": np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)}
    try:
        pre = spec.preprocess(_load(row["image"]))
        out.update(tensor=pre.tensor, height=pre.orig_hw[0], width=pre.orig_hw[1])
    except SedUserError as e:
        out["error"] = str(e)
    except OSError as e:
        out["error"] = f"cannot read {row['image']}: {e}"
    out["decode_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    return out


class Segmenter:
    """Ray actor: one backend, the vocabulary's embeddings, and the label PNG writer."""

    def __init__(self, bundle: str, vocab: dict[str, Any], topk: int | None, threads: int, backend: str) -> None:
        from .backends import make_backend
        from .vocab import Vocabulary

        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if backend == "ort":
            from .backends.ort_backend import OrtBackend

            self.backend = OrtBackend(Path(bundle), threads=threads)
        else:
            self.backend = make_backend(backend, bundle=Path(bundle))
        self.vocab = Vocabulary(vocab["name"], tuple(vocab["classes"]))
        self.text = self.backend.encode_text(self.vocab, progress=False)
        self.topk = topk

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from .outputs import _write_atomic
        from .postprocess import class_fractions, segment

        rows: dict[str, list[Any]] = {k: [] for k in ("image", "label", "error", "classes_present", "kept_counts",
                                                      "decode_ms", "model_ms", "height", "width")}
        for i in range(len(batch["image"])):
            error = str(batch["error"][i])
            present, kept, ms = "", "", 0.0
            if not error:
                try:
                    t0 = time.perf_counter()
                    tensor = np.asarray(batch["tensor"][i], dtype=np.float32)
                    result = self.backend.infer(tensor, self.text, self.topk)
                    hw = (int(batch["height"][i]), int(batch["width"][i]))
                    seg = segment(result.scores, hw, result.rows)
                    buf = io.BytesIO()
                    Image.fromarray(seg.astype(np.uint16)).save(buf, format="PNG")
                    _write_atomic(Path(batch["label"][i]), buf.getvalue())
                    ms = (time.perf_counter() - t0) * 1e3
                    present = json.dumps([{"name": self.vocab.classes[c], "fraction": round(float(f), 6)}
                                          for c, f in class_fractions(seg, len(self.vocab))])
                    kept = json.dumps(None if result.kept is None else [len(k) for k in result.kept])
                except Exception as e:  # one bad image is an error row; the job goes on
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            for key, value in (("image", batch["image"][i]), ("label", batch["label"][i]), ("error", error),
                               ("classes_present", present), ("kept_counts", kept),
                               ("decode_ms", float(batch["decode_ms"][i])),
                               ("model_ms", round(ms, 2)), ("height", int(batch["height"][i])),
                               ("width", int(batch["width"][i]))):
                rows[key].append(value)
        return rows


def start_local_ray(num_cpus: int | None = None) -> Any:
    """A private Ray on 127.0.0.1 only, without a dashboard (the caller stops it with ray.shutdown()).

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, so a process that imported Ray before this
    module cannot be made loopback-only here: that is refused rather than started on every interface.
    """
    import sys

    if "ray" in sys.modules and not _LOOPBACK_BEFORE_RAY:
        raise SedUserError("Ray was imported before sed_runtime.batch, so a local Ray would listen on every "
                           "interface; import sed_runtime.batch first, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                           "before importing ray")
    import ray

    return ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                    configure_logging=False, log_to_driver=False, ignore_reinit_error=False)


def run(input: str, output: Path, bundle: Path, *, vocab: Any = None, topk: int | None = 8,
        address: str | None = None, actors: int = 1, cpus_per_actor: int = 1, gpus_per_actor: float = 0.0,
        batch_size: int = 1, backend: str = "ort", progress: bool = True) -> BatchSummary:
    """Segment every image under `input` into `output` (labels/ and summary.parquet); see the module doc."""
    from .bundle import Bundle

    if actors < 1 or cpus_per_actor < 1 or batch_size < 1 or gpus_per_actor < 0:
        raise SedUserError("--actors, --cpus-per-actor and --batch-size must be >= 1, --gpus-per-actor >= 0")
    b = Bundle.open(bundle)
    if vocab is None:
        from .vocab import Vocabulary

        voc = b.manifest["vocabulary"]
        vocab = Vocabulary(voc["name"], tuple(voc["classes"]))
    images = list_images(input)
    if not images:
        raise SedUserError(f"no images in {input} (looked for {', '.join(IMAGE_SUFFIXES)}); check the folder")
    try:
        (output / "labels").mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output {output} is not writable ({e.strerror}); choose another location") from None
    root = input.rstrip("/")
    todo = [(img, labels_path(output, img, root)) for img in images]
    summarized = _summarized_images(output / SUMMARY)
    pending = [(img, lab) for img, lab in todo if not (lab.exists() and img in summarized)]
    skipped = len(todo) - len(pending)

    import ray

    own = not ray.is_initialized() and address is None
    if own:
        start_local_ray()
    elif not ray.is_initialized():
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SedUserError(f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0][:120]}); "
                               "check --address, or leave it out for a local run") from None
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and final line say what matters
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        if pending:
            ds = ray.data.from_items([{"image": img, "label": str(lab)} for img, lab in pending])
            # Decoding reserves no CPU: the actors may hold every CPU (--cpus-per-actor 2 on 2 cores), and a
            # decode task that waited for a free CPU would never run (seen: the run stalled). Without a CPU
            # reservation Ray would start a worker per pending task (seen: 100+ workers, 2.7x slower), so the
            # decode pool is bounded to one task per actor.
            ds = ds.map(_decode, fn_kwargs={"spec": b.input_spec}, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=actors))
            ds = ds.map_batches(
                Segmenter, batch_size=batch_size, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                compute=ray.data.ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={"bundle": str(b.root), "vocab": {"name": vocab.name,
                                                                          "classes": list(vocab.classes)},
                                       "topk": topk, "threads": cpus_per_actor, "backend": backend})
            from tqdm import tqdm

            with tqdm(total=len(pending), desc="images", unit="img", disable=not progress) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
                    rows.extend(batch.to_dict("records"))
                    bar.update(len(batch))
    finally:
        if own:
            ray.shutdown()
        if rows:  # also when the run failed: what finished is kept, and a rerun only redoes the rest
            _write_summary(output / SUMMARY, rows)
    seconds = time.perf_counter() - t0
    errors = sum(1 for r in rows if r["error"])
    return BatchSummary(len(images), len(rows) - errors, skipped, errors, seconds, output)


def _summarized_images(path: Path) -> set[str]:
    """Images that have a row in the summary table, error rows excepted (those are retried)."""
    if not path.exists():
        return set()
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["image", "error"]).to_pylist()
    return {r["image"] for r in table if not r["error"]}


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge this run's rows into the table (a rerun replaces the rows of images it redid), written whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old: list[dict[str, Any]] = []
    if path.exists():
        redone = {r["image"] for r in rows}
        old = [r for r in pq.read_table(path).to_pylist() if r["image"] not in redone]
    merged = sorted(old + rows, key=lambda r: r["image"])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(merged), tmp)
    os.replace(tmp, path)
