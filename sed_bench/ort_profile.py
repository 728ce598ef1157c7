"""Per-stage decoder times for ONNX Runtime from its node profiler.

The decoder graph is one ONNX Runtime call, so its stages are not visible to a wall clock. Every node of the
graph `sed_export.onnx_export.build_decoder_graph` writes carries its stage in its name (`pre/`, `cer0/`,
`decoder1/`, ...); ORT's profiler records each node's kernel time, so summing them by name gives the stage
times. Nodes that ORT's optimiser adds (layout reorders, fused activations) have no prefix and are charged to
their neighbour: input reorders to the next named node, everything else to the previous one.

Stages match the torch backend's: the aux heads count as CER (head0 is `cer0`, `decoder{1,2}//aux` are
`cer1/2`), the final head, sigmoid and scatter into N classes are `head`. On GPU execution providers a node's
profiled time is launch-side, so the split is indicative only there.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

_TOP_LEVEL_HEAD = {"KeptColumn", "ProbsHW", "ScoresShape", "ScoresZero", "ScatterSurvivors"}
_TOP_LEVEL_CER0 = {"NumClasses", "ScalarN", "AllClasses"}
STAGES = ("cost_volume", "cer0", "decoder1", "cer1", "decoder2", "cer2", "decoder3", "head")


def node_stage(name: str) -> str | None:
    """Stage of a named decoder-graph node; None for nodes the optimiser created (no stage in the name)."""
    name = name.removesuffix("_kernel_time")
    if "/" not in name:
        if name in _TOP_LEVEL_HEAD:
            return "head"
        if name in _TOP_LEVEL_CER0:
            return "cer0"
        return None
    prefix = name.split("/", 1)[0]
    if prefix == "pre":
        return "cer0" if "/head0/" in name else "cost_volume"
    if prefix in ("cer0", "cer1", "cer2"):
        return prefix
    if prefix in ("decoder1", "decoder2"):
        return f"cer{prefix[-1]}" if "/aux/" in name else prefix
    if prefix == "decoder3":
        return "head" if ("/head/" in name or name.endswith("Sigmoid")) else "decoder3"
    return None


def split_stages(node_events: list[dict[str, Any]]) -> dict[str, float]:
    """ms per stage from one run's node events (in execution order)."""
    stages = [node_stage(e["name"]) for e in node_events]
    n = len(stages)
    resolved: list[str | None] = list(stages)
    for i, s in enumerate(stages):
        if s is not None:
            continue
        name = node_events[i]["name"]
        forward = name.startswith(("ReorderInput", "Memcpy"))
        order = list(range(i + 1, n)) + list(range(i - 1, -1, -1)) if forward else \
            list(range(i - 1, -1, -1)) + list(range(i + 1, n))
        resolved[i] = next((stages[j] for j in order if stages[j] is not None), "head")
    out: dict[str, float] = defaultdict(float)
    for e, s in zip(node_events, resolved):
        out[str(s)] += float(e.get("dur", 0)) / 1e3
    return dict(out)


def parse_profile(path: str | Path) -> list[dict[str, float]]:
    """One stage split per `model_run` in an ORT profile JSON, in run order."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    out = []
    for r in runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        out.append(split_stages([e for e in nodes if lo <= e["ts"] <= hi]))
    return out


class StageProfiler:
    """Profiled decoder sessions for the ORT backend: the timed calls themselves are profiled (ORT's profiler
    costs well under 1 % here), and `collect` splits each timed call's node times into stages."""

    def __init__(self, providers: list[str], threads: int | None = None, arena: bool = True) -> None:
        self.providers = providers
        self.threads = threads
        self.arena = arena
        self._tmp = tempfile.TemporaryDirectory(prefix="sed-bench-prof-")
        self._sessions: dict[str, Any] = {}
        self._calls: dict[str, list[str | None]] = defaultdict(list)  # session -> cell key per call (None: untimed)

    def session(self, key: str, model: str | Path | bytes) -> Any:
        """The profiled session for a decoder graph (created once per key), same options as the backend's."""
        if key not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self._tmp.name) / key)
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.enable_cpu_mem_arena = self.arena
            src = model if isinstance(model, bytes) else str(model)
            self._sessions[key] = ort.InferenceSession(src, sess_options=opts, providers=self.providers)
        return self._sessions[key]

    def note(self, key: str, cell_key: str | None) -> None:
        """Record that session `key` just ran one call for `cell_key` (None for warm-up calls)."""
        self._calls[key].append(cell_key)

    def collect(self) -> dict[str, list[dict[str, float]]]:
        """cell key -> one stage split per timed call; ends profiling and drops the sessions."""
        out: dict[str, list[dict[str, float]]] = defaultdict(list)
        for key, sess in self._sessions.items():
            splits = parse_profile(sess.end_profiling())
            if len(splits) != len(self._calls[key]):
                continue  # the profile does not line up with the calls: report no split rather than a wrong one
            for cell_key, split in zip(self._calls[key], splits):
                if cell_key is not None:
                    out[cell_key].append(split)
        self._sessions.clear()
        self._tmp.cleanup()
        return dict(out)
