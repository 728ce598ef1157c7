"""Text embeddings at vocabulary scale: the whole 77-token text tower against the cut at the longest prompt.

Both paths, torch and ONNX Runtime, encode the same prompts (the vocabulary's, in the order the runtime uses)
in the same batches, interleaved batch by batch so machine noise hits both alike. The old path runs on a
slice of the prompts (the whole of A-847 takes about an hour that way on 2 cores); with --whole the new torch
path then encodes the entire vocabulary from an empty cache, as `sed-run` would. Random weights (no
checkpoint can be downloaded here): the cost does not depend on them, and equality is checked on the slice.

    python benchmarks/text_speed.py --model sed-b --vocab ade847 --classes 12 --whole \
        --out benchmarks/results/cpu-sed-b-text
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sed-b")
    ap.add_argument("--vocab", default="ade847")
    ap.add_argument("--classes", type=int, default=12, help="classes of the slice both paths encode")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--whole", action="store_true", help="also encode the whole vocabulary with the new path")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import open_clip
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sed_bench.measure import machine_info
    from sed_bench.report import write_script_report
    from sed_export.config import load_model_config
    from sed_export.model import build_model
    from sed_export.onnx_export import _export, save_graph
    from sed_export.onnx_text import TEXT_INPUTS, TEXT_OUTPUTS, _TextTower, export_text_encoder
    from sed_export.text import encode_text_trimmed, encode_vocabulary
    from sed_runtime.prompt_ensemble import encode_vocabulary_with
    from sed_runtime.tokenizer import longest_prompt
    from sed_runtime.vocab import Vocabulary, load_vocabulary

    model = build_model(load_model_config(args.model), seed=0)
    clip = model.clip_model.eval()
    ctx = int(clip.context_length)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    vocab = load_vocabulary(args.vocab)
    part = Vocabulary(f"{vocab.name}[:{args.classes}]", vocab.classes[: args.classes])

    with tempfile.TemporaryDirectory() as tmp:
        new_onnx, old_onnx = Path(tmp) / "new.onnx", Path(tmp) / "old.onnx"
        export_text_encoder(clip, new_onnx)
        tokens = torch.zeros(2, ctx, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = 49406, 49407
        save_graph(_export(_TextTower(clip, False), (tokens,), TEXT_INPUTS, TEXT_OUTPUTS,
                           {"tokens": {0: "T"}, "text_features": {0: "T"}}), old_onnx)
        opts = ort.SessionOptions()
        sessions = {name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for name, p in (("ort new", new_onnx), ("ort old", old_onnx))}

    times = {k: 0.0 for k in ("torch old", "torch new", "ort old", "ort new")}
    lengths: list[int] = []

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def run(texts: list[str]) -> np.ndarray:
            t0 = time.perf_counter()
            out = fn(texts)
            times[name] += time.perf_counter() - t0
            return out
        return run

    def torch_old(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return clip.encode_text(tokenizer(texts)).float().numpy()

    def torch_new(texts: list[str]) -> np.ndarray:
        tok = tokenizer(texts)
        lengths.append(longest_prompt(tok))
        with torch.inference_mode():
            return encode_text_trimmed(clip, tok[:, : longest_prompt(tok)]).float().numpy()

    def ort_old(texts: list[str]) -> np.ndarray:
        return sessions["ort old"].run(None, {"tokens": tokenizer(texts).numpy()})[0]

    def ort_new(texts: list[str]) -> np.ndarray:
        tok = tokenizer(texts).numpy()
        return sessions["ort new"].run(None, {"tokens": np.ascontiguousarray(tok[:, : longest_prompt(tok)])})[0]

    # Interleave: one batch of each path in turn, through the same streaming reduction the runtime uses.
    from sed_runtime.templates import class_prompts

    templates = model.templates
    prompts = sum(len(class_prompts(c, templates)[0]) for c in part.classes)
    results = {}
    fns = {"torch old": torch_old, "torch new": torch_new, "ort old": ort_old, "ort new": ort_new}
    for start in range(0, len(part), max(1, args.batch_size // len(templates))):
        sub = Vocabulary("s", part.classes[start : start + max(1, args.batch_size // len(templates))])
        for name, fn in fns.items():
            emb = encode_vocabulary_with(timed(name, fn), sub, templates, batch_size=args.batch_size, progress=False)
            results.setdefault(name, []).append(emb)
    emb = {k: np.concatenate(v) for k, v in results.items()}
    diffs = {k: float(np.abs(emb[k] - emb["torch old"]).max()) for k in emb if k != "torch old"}

    report: dict = {
        "command": " ".join(["python", "benchmarks/text_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "model": args.model, "weights": "random (seed 0)", "vocabulary": vocab.name,
        "templates": len(templates), "batch_size": args.batch_size,
        "slice": {"classes": len(part), "prompts": prompts,
                  "seconds": {k: round(v, 2) for k, v in times.items()},
                  "ms_per_prompt": {k: round(1e3 * v / prompts, 3) for k, v in times.items()},
                  "speedup_torch": round(times["torch old"] / times["torch new"], 2),
                  "speedup_ort": round(times["ort old"] / times["ort new"], 2),
                  "max_abs_diff_vs_torch_old": diffs,
                  "longest_prompt_tokens": {"min": min(lengths), "max": max(lengths), "of": ctx}},
    }
    all_prompts = sum(len(class_prompts(c, templates)[0]) for c in vocab.classes)
    report["whole"] = {"prompts": all_prompts,
                       "torch_old_predicted_s": round(times["torch old"] / prompts * all_prompts, 1)}
    if args.whole:
        t0 = time.perf_counter()
        full = encode_vocabulary(clip, tokenizer, vocab, templates, batch_size=args.batch_size, progress=True)
        took = time.perf_counter() - t0
        report["whole"].update({
            "torch_new_s": round(took, 1),
            "speedup_vs_predicted_old": round(report["whole"]["torch_old_predicted_s"] / took, 2),
            "slice_rows_max_abs_diff_vs_torch_old": float(np.abs(full[: len(part)] - emb["torch old"]).max()),
        })
    s = report["slice"]
    lines = [
        f"# Text embeddings at vocabulary scale: {args.model}, {vocab.name}", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} CPUs, load at start "
        f"{report['machine'].get('load_average_at_start')}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; random weights (cost does not depend on them).",
        "",
        f"Slice: the first {len(part)} classes, {prompts} prompts ({len(templates)} templates), batches of "
        f"{args.batch_size}, old and new interleaved batch by batch; longest prompt per batch "
        f"{s['longest_prompt_tokens']['min']}-{s['longest_prompt_tokens']['max']} of {ctx} tokens.", "",
        "| path | seconds | ms/prompt | max abs diff vs torch 77 tokens |", "|---|---|---|---|",
    ]
    for k in ("torch old", "torch new", "ort old", "ort new"):
        label = k.replace("old", "77 tokens").replace("new", "cut at longest prompt")
        lines.append(f"| {label} | {s['seconds'][k]} | {s['ms_per_prompt'][k]} | "
                     f"{'reference' if k == 'torch old' else f'{diffs[k]:.1e}'} |")
    lines += ["", f"Speed-up on the slice: torch {s['speedup_torch']}x, ONNX Runtime {s['speedup_ort']}x.", ""]
    w = report["whole"]
    if "torch_new_s" in w:
        lines.append(f"Whole {vocab.name} ({w['prompts']} prompts) from an empty cache, torch, cut: "
                     f"{w['torch_new_s']} s; "
                     f"the 77-token path predicted from the slice: {w['torch_old_predicted_s']} s "
                     f"({w['speedup_vs_predicted_old']}x). Its first {len(part)} classes equal the slice's 77-token "
                     f"embeddings within {w['slice_rows_max_abs_diff_vs_torch_old']:.1e}.")
    write_script_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
