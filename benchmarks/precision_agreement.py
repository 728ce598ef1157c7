"""How far each reduced-precision CPU path moves from fp32, inside the model: per encoder output (cosine, SQNR)
and per CER point (the kept sets), on held-out generated scenes of the trained model.

`sed-eval` judges the end result (mIoU, per-class IoU, seg agreement); this says where a difference starts. The
reference is the first path (OpenVINO fp32 on the fp32 bundle, which equals the torch reference to 1e-3). All
paths see the same preprocessed images and the same text embeddings.

    python benchmarks/precision_agreement.py engines/shapes-fp32 engines/shapes-int8 --scenes 50 \
        --out benchmarks/results/cpu-sed-shapes-precision-agreement
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("dense", "res4", "res3", "res2")


def _paths(fp32: Path, int8: Path) -> dict[str, object]:
    from sed_runtime.backends.openvino_backend import OpenVinoBackend
    from sed_runtime.backends.ort_backend import OrtBackend

    return {
        "openvino fp32 (reference)": OpenVinoBackend(fp32),
        "openvino fp32, bf16 inference": OpenVinoBackend(fp32, precision="bf16"),
        "onnxruntime int8": OrtBackend(int8),
        "openvino int8": OpenVinoBackend(int8),
        "openvino int8, bf16 inference": OpenVinoBackend(int8, precision="bf16"),
    }


def _sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(float((ref**2).sum()) / noise))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_bundle", type=Path)
    ap.add_argument("int8_bundle", type=Path)
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--topk", default="1,8")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sed_bench.measure import machine_info, versions
    from sed_bench.report import write_script_report
    from sed_runtime.evaluation import EVAL_SEED
    from sed_runtime.scenes import SHAPES_CLASSES, generate_scene
    from sed_runtime.vocab import Vocabulary

    ks = [int(k) for k in args.topk.split(",")]
    paths = _paths(args.fp32_bundle, args.int8_bundle)
    ref_name = next(iter(paths))
    ref = paths[ref_name]
    vocab = Vocabulary("shapes", SHAPES_CLASSES)
    text = ref.encode_text(vocab, progress=False)  # type: ignore[attr-defined]
    cos: dict[str, dict[str, list[float]]] = {p: {o: [] for o in OUTPUTS} for p in paths}
    sqnr: dict[str, dict[str, list[float]]] = {p: {o: [] for o in OUTPUTS} for p in paths}
    jaccard: dict[str, dict[str, list[float]]] = {p: {f"k={k} cer{i}": [] for k in ks for i in range(3)}
                                                  for p in paths}
    same_sets: dict[str, dict[str, list[bool]]] = {p: {f"k={k}": [] for k in ks} for p in paths}
    agree: dict[str, dict[str, list[float]]] = {p: {f"k={k}": [] for k in ks} for p in paths}
    for index in range(args.scenes):
        image = ref.input_spec.preprocess(generate_scene(EVAL_SEED, index).image).tensor  # type: ignore[attr-defined]
        ref_feats = ref.encode_image(image)  # type: ignore[attr-defined]
        ref_out = {k: ref.decode(ref_feats, text, k) for k in ks}  # type: ignore[attr-defined]
        for name, backend in paths.items():
            feats = ref_feats if backend is ref else backend.encode_image(image)  # type: ignore[attr-defined]
            for o in OUTPUTS:
                a = np.asarray(ref_feats.data[o], np.float64).ravel()
                b = np.asarray(feats.data[o], np.float64).ravel()
                cos[name][o].append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
                sqnr[name][o].append(_sqnr_db(a, b))
            for k in ks:
                r = ref_out[k] if backend is ref else backend.decode(feats, text, k)  # type: ignore[attr-defined]
                for i in range(3):
                    x, y = set(ref_out[k].kept[i].tolist()), set(r.kept[i].tolist())
                    jaccard[name][f"k={k} cer{i}"].append(len(x & y) / max(1, len(x | y)))
                same_sets[name][f"k={k}"].append(all(np.array_equal(ref_out[k].kept[i], r.kept[i]) for i in range(3)))
                n = len(text)
                agree[name][f"k={k}"].append(float((ref_out[k].full_scores(n).argmax(0)
                                                    == r.full_scores(n).argmax(0)).mean()))
    rows = []
    for name in paths:
        rows.append({
            "path": name,
            "encoder_cosine": {o: round(float(np.mean(cos[name][o])), 6) for o in OUTPUTS},
            "encoder_sqnr_db": {o: round(float(np.mean(sqnr[name][o])), 2) if name != ref_name else None
                                for o in OUTPUTS},
            "kept_jaccard": {key: round(float(np.mean(v)), 4) for key, v in jaccard[name].items()},
            "identical_kept_sets": {key: round(float(np.mean(v)), 4) for key, v in same_sets[name].items()},
            "score_argmax_agreement": {key: round(float(np.mean(v)), 5) for key, v in agree[name].items()},
        })
    command = "python benchmarks/precision_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "machine": machine_info(), "versions": versions(), "scenes": args.scenes,
              "scene_seed": EVAL_SEED, "topk": ks, "rows": rows}
    m = report["machine"]
    lines = [f"# Precision agreement inside the model: {args.fp32_bundle.name} / {args.int8_bundle.name}", "",
             f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB. {args.scenes} held-out generated "
             f"scenes (seed {EVAL_SEED}), the trained sed-shapes, the shapes vocabulary (24 classes). Reference: "
             f"{ref_name}. Means over the scenes.", "",
             "## Encoder outputs: cosine / SQNR dB against the reference", "",
             "| path | " + " | ".join(OUTPUTS) + " |", "|---|" + "---|" * len(OUTPUTS)]
    for r in rows[1:]:
        lines.append(f"| {r['path']} | " + " | ".join(
            f"{r['encoder_cosine'][o]} / {r['encoder_sqnr_db'][o]}" for o in OUTPUTS) + " |")
    keys = list(rows[0]["kept_jaccard"])
    lines += ["", "## Kept sets per CER point: Jaccard overlap with the reference (share of scenes with all three "
              "sets identical)", "", "| path | " + " | ".join(keys) + " | " + " | ".join(
                  f"identical {k}" for k in rows[0]["identical_kept_sets"]) + " |",
              "|---|" + "---|" * (len(keys) + len(rows[0]["identical_kept_sets"]))]
    for r in rows[1:]:
        lines.append(f"| {r['path']} | " + " | ".join(str(r["kept_jaccard"][k]) for k in keys) + " | " + " | ".join(
            f"{100 * v:.0f}%" for v in r["identical_kept_sets"].values()) + " |")
    lines += ["", "## Score argmax agreement with the reference (decoder resolution)", "",
              "| path | " + " | ".join(rows[0]["score_argmax_agreement"]) + " |",
              "|---|" + "---|" * len(rows[0]["score_argmax_agreement"])]
    for r in rows[1:]:
        lines.append(f"| {r['path']} | " + " | ".join(
            f"{100 * v:.2f}%" for v in r["score_argmax_agreement"].values()) + " |")
    write_script_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
