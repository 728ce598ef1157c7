"""Train a small SED on generated shapes scenes with the official recipe, on a CPU if need be.

Recipe (`../shared/reference/SED_REFERENCE.md` section 3): the four BCE terms, the final logits and the three aux
heads (on detached features), each upsampled bilinearly to the label size, against one-hot targets (ignore
pixels get all-zero targets, as in the official code), summed with equal weights. The CLIP text tower is frozen;
the visual tower, the decoder and the CER heads train jointly with AdamW. Differences from the official run,
forced by training from scratch on two cores: no pretrained CLIP (so no 0.01 backbone lr multiplier), batch 1,
pooling (1, 1) in training too, and generated scenes instead of COCO-Stuff crops.

Every step's scene is `generate_scene(data_seed, step)`, so a resumed run sees exactly the data an
uninterrupted one would. The result is written in the official checkpoint format (`{"model": state_dict}`)
and as fp16 safetensors with a model card, so it loads through the same code as the released weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sed_runtime.backends.base import InputSpec
from sed_runtime.errors import SedUserError
from sed_runtime.scenes import IGNORE_INDEX, SHAPES_CLASSES, generate_scene
from sed_runtime.vocab import Vocabulary

from .checkpoint import file_sha256, save_official_checkpoint
from .config import ModelConfig
from .model import OFFICIAL_PREFIX, SedModel, build_model, official_state_dict

__all__ = ["TrainSettings", "train", "trainable_parameters"]

RESUME_FILE = "last.pth"
FINAL_CHECKPOINT = "model_final.pth"
LOSS_LOG = "loss_log.csv"
CARD = "model_card.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    lr: float = 8e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0  # model initialisation
    data_seed: int = 0  # generate_scene(data_seed, step); evaluation uses other seeds
    checkpoint_every: int = 200
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    text_steps: int = 300  # stand-in for CLIP's text pretraining, before the tower is frozen (see pretrain_text)


def trainable_parameters(model: SedModel) -> list[torch.nn.Parameter]:
    """Freeze the CLIP text tower (everything under clip_model that is not `visual`), as the official recipe does."""
    params = []
    for name, p in model.named_parameters():
        frozen = name.startswith("clip_model.") and not name.startswith("clip_model.visual.")
        p.requires_grad_(not frozen)
        if not frozen:
            params.append(p)
    return params


def pretrain_text(model: SedModel, classes: tuple[str, ...], steps: int, seed: int, lr: float = 1e-3) -> None:
    """Stand-in for CLIP's text pretraining, run once before the SED recipe freezes the text tower.

    SED freezes a text tower that CLIP pretraining made meaningful; ours starts random, and a random causal
    transformer maps every prompt to nearly the same direction (the EOT token averages mostly template words:
    class-mean cosines up to 0.997 for "red circle" vs "red square"), leaving the frozen cost volume almost no
    signal to tell the shapes apart. So the tower first learns to separate the classes' prompts: each prompt's
    embedding is classified against the classes' mean embeddings (cosine / 0.07, cross-entropy), over random
    templates and synonyms. No weight decay, so token rows no prompt uses stay as initialised.
    """
    import open_clip

    from sed_runtime.templates import class_prompts

    clip = model.clip_model
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.config.clip["text_cfg"]["context_length"]))
    prompts = [tokenizer(class_prompts(c, model.templates)[0]) for c in classes]  # per class: (P*S, 77)
    params = [p for n, p in clip.named_parameters() if not n.startswith("visual.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    per_class = 8
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    was_training = clip.training
    clip.eval()  # no dropout; gradients still flow
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.cat([t[torch.randint(len(t), (per_class,), generator=gen)] for t in prompts])
            emb = F.normalize(clip.encode_text(batch), dim=-1)
            protos = F.normalize(emb.reshape(len(classes), per_class, -1).mean(1), dim=-1)
            loss = F.cross_entropy(emb @ protos.T / 0.07, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clip.train(was_training)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sample(spec: InputSpec, data_seed: int, index: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair: the preprocessed image (1, 3, S, S) and the one-hot target (N, S, S) at label size.

    The label is squashed to S x S with nearest neighbour, the same geometry as the image's preprocessing.
    Ignore pixels get all-zero targets (the official BCE does not mask them).
    """
    from PIL import Image

    scene = generate_scene(data_seed, index)
    pre = spec.preprocess(scene.image)
    s = spec.input_size
    label = np.asarray(Image.fromarray(scene.label).resize((s, s), Image.NEAREST)).astype(np.int64)
    onehot = np.zeros((num_classes, s, s), np.float32)
    valid = label != IGNORE_INDEX
    onehot[label[valid], np.nonzero(valid)[0], np.nonzero(valid)[1]] = 1.0
    return torch.from_numpy(pre.tensor), torch.from_numpy(onehot)


def sed_loss(final: torch.Tensor, aux: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Sum of the four BCE terms, each on logits upsampled (bilinear) to the target's size."""
    size = target.shape[-2:]
    terms = []
    for logits in [final, *aux]:
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        terms.append(F.binary_cross_entropy_with_logits(up, target))
    return sum(terms), [float(t.detach()) for t in terms]  # type: ignore[return-value]


def _text_embeddings(model: SedModel, vocab: Vocabulary) -> torch.Tensor:
    import open_clip

    from .text import encode_vocabulary

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.config.clip["text_cfg"]["context_length"]))
    emb = encode_vocabulary(model.clip_model, tokenizer, vocab, model.templates, progress=False)
    return torch.from_numpy(emb)


def _recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that change the result (threads and checkpoint spacing do not)."""
    return {k: v for k, v in settings.items() if k not in ("threads", "checkpoint_every")}


def _save_resume(path: Path, model: SedModel, opt: torch.optim.Optimizer, step: int, s: TrainSettings) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": official_state_dict(model), "optimizer": opt.state_dict(), "step": step,
                "settings": asdict(s)}, tmp)
    os.replace(tmp, path)


def _prefetch(spec: InputSpec, s: TrainSettings, start: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Scenes for steps start..steps-1, generated one step ahead on a helper thread."""
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(sample, spec, s.data_seed, start, n) if start < s.steps else None
        for step in range(start, s.steps):
            cur = nxt.result()  # type: ignore[union-attr]
            nxt = pool.submit(sample, spec, s.data_seed, step + 1, n) if step + 1 < s.steps else None
            yield cur


def train(
    config: ModelConfig, out: Path, settings: TrainSettings, *, resume: bool = True, progress: bool = True
) -> Path:
    """Train `config` on generated shapes scenes into `out`; returns the final official checkpoint's path.

    `out` holds `last.pth` (resume state, every `checkpoint_every` steps), `loss_log.csv`, and at the end
    `model_final.pth` (official format) and `<model>.safetensors` (fp16) with `model_card.json`.
    """
    from tqdm import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary("shapes", SHAPES_CLASSES)
    model = build_model(config, seed=settings.seed)
    spec = InputSpec(config.sed.input_size, config.sed.min_size_test, config.sed.max_size_test,
                     config.sed.pixel_mean, config.sed.pixel_std)
    start = 0
    resume_path = out / RESUME_FILE
    resuming = resume and resume_path.exists()
    if not resuming and settings.text_steps:
        pretrain_text(model, vocab.classes, settings.text_steps, settings.seed)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if resuming:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if _recipe(state.get("settings", {})) != _recipe(asdict(settings)):
            raise SedUserError(f"{resume_path} was written with other settings ({_recipe(state.get('settings', {}))}); "
                               "pass the same options to resume, or --restart to start over")
        model.load_state_dict({k.removeprefix(OFFICIAL_PREFIX): v for k, v in state["model"].items()})
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    text = _text_embeddings(model, vocab)  # the frozen tower's embeddings: computed once
    log_path = out / LOSS_LOG
    header = "step,loss,loss_final,loss_aux0,loss_aux1,loss_aux2,lr,seconds\n"
    if start == 0 or not log_path.exists():
        log_path.write_text(header)
    else:  # drop rows of steps after the resume point: they are computed again
        rows = log_path.read_text().splitlines()[1:]
        log_path.write_text(header + "".join(r + "\n" for r in rows if r and int(r.split(",")[0]) < start))
    model.train()
    model.clip_model.transformer.eval()  # frozen tower: no dropout either
    t_start = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc="train", unit="step", disable=not progress)
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        for step, (image, target) in enumerate(_prefetch(spec, settings, start, len(vocab)), start=start):
            lr = lr_at(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            feats = model.encode_image(image)
            final, aux = model.transformer.training_logits(feats.dense, text, (feats.res4, feats.res3, feats.res2))
            loss, terms = sed_loss(final, aux, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.writerow([step, f"{float(loss.detach()):.5f}", *(f"{t:.5f}" for t in terms), f"{lr:.6g}",
                          f"{time.perf_counter() - t_start:.1f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", final=f"{terms[0]:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                log_file.flush()
                _save_resume(resume_path, model, opt, step + 1, settings)
    bar.close()
    model.eval()
    final_path = out / FINAL_CHECKPOINT
    save_official_checkpoint(model, final_path)
    return final_path


def export_fp16_weights(checkpoint: Path, dest: Path) -> str:
    """The official-format checkpoint as fp16 safetensors (what the package ships); returns its sha256."""
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(half, str(tmp), metadata={"format": "official SED state dict, fp16"})
    os.replace(tmp, dest)
    return file_sha256(dest)


def write_model_card(path: Path, card: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate_weights(model: str | Path, weights: Path, images: int, topks: tuple[int | None, ...] = (None, 8)
                     ) -> dict[str, Any]:
    """Held-out mIoU of `weights` (torch reference) on generated scenes, for the model card."""
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.evaluation import EVAL_SEED, generated_dataset, run_eval
    from sed_runtime.pipeline import SedPipeline

    vocab = Vocabulary("shapes", SHAPES_CLASSES)
    pipeline = SedPipeline(TorchBackend(model, weights), vocab, progress=False)
    run = run_eval({"torch fp32": pipeline}, list(topks), generated_dataset(images, EVAL_SEED), len(vocab),
                   progress=False)
    results: dict[str, Any] = {"dataset": run.dataset, "seed": EVAL_SEED, "images": images, "backend": "torch fp32"}
    for cell in run.cells:
        summary = cell.summary(vocab.classes)
        results[cell.k_label if cell.topk is None else f"k{cell.topk}"] = {
            key: summary[key] for key in ("miou", "pixel_accuracy", "kept_counts_mean", "per_class_iou")}
    return results


def run_training(
    model: str, out: Path, *, steps: int, lr: float, seed: int, data_seed: int, checkpoint_every: int,
    text_steps: int, eval_images: int, threads: int | None, restart: bool, force: bool, progress: bool,
) -> None:
    """`sed-export train`: train (or resume), then write fp16 weights, held-out metrics and the model card."""
    import platform

    from .config import load_model_config

    config = load_model_config(model)
    weights = out / f"{config.name}.safetensors"
    if weights.exists() and not force:
        raise SedUserError(f"{out} already holds a finished run ({weights.name}); pass --force to train again into it")
    settings = TrainSettings(steps=steps, lr=lr, seed=seed, data_seed=data_seed,
                             checkpoint_every=checkpoint_every, threads=threads, text_steps=text_steps)
    if restart and (out / RESUME_FILE).exists():
        (out / RESUME_FILE).unlink()
    t0 = time.perf_counter()
    final = train(config, out, settings, resume=not restart, progress=progress)
    seconds = time.perf_counter() - t0
    sha = export_fp16_weights(final, weights)
    metrics = evaluate_weights(model, weights, eval_images) if eval_images else None
    card = {
        "model": config.name,
        "weights": weights.name,
        "sha256": sha,
        "bytes": weights.stat().st_size,
        "format": "official SED state dict (keys sem_seg_head.predictor.*), fp16 safetensors",
        "config": config.to_dict(),
        "data": {"generator": "sed_runtime.scenes.generate_scene", "seed": data_seed, "vocabulary": "shapes",
                 "classes": list(SHAPES_CLASSES)},
        "recipe": {
            **_recipe(asdict(settings)), "batch_size": 1, "optimizer": "AdamW", "schedule": "linear warm-up, cosine",
            "loss": "sum of 4 BCE terms (final + 3 aux heads on detached features), logits upsampled to the label size",
            "frozen": "CLIP text tower (after text_steps of prompt-classification pretraining, a stand-in for "
                      "CLIP's)", "init": "random (no pretrained CLIP)",
        },
        "final_loss": _last_loss(out / LOSS_LOG),
        "train_seconds": _train_seconds(out / LOSS_LOG),
        "seconds_this_invocation": round(seconds, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "eval": metrics,
    }
    write_model_card(out / CARD, card)
    if metrics:
        print(f"held-out mIoU (torch fp32, {eval_images} generated images): k=all {metrics['all']['miou']:.2f}, "
              f"k=8 {metrics['k8']['miou']:.2f}")
    print(f"weights {weights} ({weights.stat().st_size / 1e6:.1f} MB), model card {out / CARD}")


def _train_seconds(log: Path) -> float:
    """Wall time of all training sessions of a run (the log's clock restarts at each resume)."""
    total, last = 0.0, 0.0
    for row in log.read_text().strip().splitlines()[1:]:
        t = float(row.rsplit(",", 1)[1])
        if t < last:
            total += last
        last = t
    return round(total + last, 1)


def _last_loss(log: Path) -> dict[str, float] | None:
    rows = log.read_text().strip().splitlines()
    if len(rows) < 2:
        return None
    header, tail = rows[0].split(","), rows[-min(100, len(rows) - 1):]
    values = np.array([[float(x) for x in r.split(",")] for r in tail])
    return {f"{h}_mean_last_{len(tail)}": round(float(v), 5) for h, v in zip(header[1:6], values[:, 1:6].mean(0))}
