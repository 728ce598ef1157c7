"""Train a small SED on generated shapes scenes with the official recipe, on a CPU if need be.

Recipe (`../shared/reference/SED_REFERENCE.md` section 3): the four BCE terms, the final logits and the three aux
heads (on detached features), each upsampled bilinearly to the label size, against one-hot targets (ignore
pixels get all-zero targets, as in the official code), summed with equal weights. The CLIP text tower is frozen;
the visual tower (at a reduced lr), the decoder and the CER heads train jointly with AdamW.

Differences from the official run, forced by training from scratch on two cores (each measured, see the
docstrings): no pretrained CLIP, so two short stand-ins for its pretraining come first (`pretrain_text`, then
`pretrain_visual`); a class-balanced softmax cross-entropy on the final logits beside the BCE terms
(`sed_loss`); batch 1; pooling (1, 1) in training too; generated scenes instead of COCO-Stuff crops.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sed_runtime.backends.base import InputSpec
from sed_runtime.errors import SedUserError
from sed_runtime.scenes import IGNORE_INDEX, SHAPES_CLASSES, STUFF, generate_scene
from sed_runtime.vocab import Vocabulary

from .checkpoint import file_sha256, load_checkpoint_into, save_official_checkpoint
from .config import ModelConfig
from .model import OFFICIAL_PREFIX, SedModel, build_model, official_state_dict

__all__ = ["TrainSettings", "train", "trainable_parameters"]

RESUME_FILE = "last.pth"
FINAL_CHECKPOINT = "model_final.pth"
LOSS_LOG = "loss_log.csv"
CARD = "model_card.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1400
    lr: float = 8e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0  # model initialisation
    data_seed: int = 0  # generate_scene(data_seed, step); evaluation uses other seeds
    checkpoint_every: int = 200
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    text_steps: int = 300  # stand-in for CLIP's text pretraining, before the tower is frozen (see pretrain_text)
    visual_steps: int = 4500  # stand-in for CLIP's image-text alignment of the visual tower (see pretrain_visual)
    visual_lr: float = 2e-3  # peak lr of that pretraining
    backbone_lr_scale: float = 0.1  # the visual tower's lr multiplier in the SED recipe (official: 0.01 on CLIP)
    ce_weight: float = 1.0  # softmax cross-entropy on the final logits beside the four BCE terms (see sed_loss)
    ce_balanced: bool = False  # that cross-entropy balanced between thing and stuff pixels (see sed_loss)
    init_sha256: str | None = None  # fine-tuning: the weights the run starts from (no pretraining then)
    data_offset: int = 0  # step i sees generate_scene(data_seed, data_offset + i): a fine-tune sees new scenes


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


VISUAL_INDEX_OFFSET = 1_000_000  # visual pretraining sees generate_scene(data_seed, offset + i), not the SED steps'


def _class_prototypes(text: torch.Tensor) -> torch.Tensor:
    """(N, P, E) template embeddings -> (N, E) unit class embeddings (the prompt ensemble's mean)."""
    return F.normalize(F.normalize(text, dim=-1).mean(1), dim=-1)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(h, w) softmax cross-entropy over the class axis of (N, h, w) logits against (N, h, w) class fractions."""
    return -(target * F.log_softmax(logits, 0)).sum(0)


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the class axis of (N, h, w) logits against (N, h, w) class fractions, averaged
    separately over the labelled positions that are mostly a thing and those that are mostly stuff, then summed.

    Things cover about a tenth of a scene; a plain mean lets the backgrounds drown them (measured: after 2000
    visual-pretraining steps 15% of thing cells named right, against 43% after 1000 steps of this balance).
    """
    ce = pixel_cross_entropy(logits, target)
    things = target[len(STUFF):].sum(0) >= 0.5
    parts = [ce[labelled & part].mean() for part in (things, ~things) if bool((labelled & part).any())]
    return sum(parts) if parts else logits.sum() * 0  # type: ignore[return-value]


def cell_cosine(model: SedModel, image: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(N, h, w) cosine of every dense image feature with the (N, E) unit class embeddings: the cost volume's
    signal per class, with the prompt ensemble averaged."""
    dense = F.normalize(model.encode_image(image).dense, dim=1)[0]  # (E, h, w)
    return torch.einsum("ne,ehw->nhw", protos, dense)


def cell_targets(onehot: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) one-hot labels -> per-cell class fractions (N, h, w) and the cells at least half labelled."""
    frac = F.adaptive_avg_pool2d(onehot[None], size)[0]
    labelled = frac.sum(0)
    return frac / labelled.clamp_min(1e-6), labelled >= 0.5


def pretrain_visual(model: SedModel, text: torch.Tensor, spec: InputSpec, settings: TrainSettings,
                    progress: bool = True) -> None:
    """Stand-in for CLIP's image-text pretraining of the visual tower, run once before the SED recipe.

    SED starts from a CLIP whose dense image features already point towards the text embeddings of what they
    show, so its cost volume carries signal from the first step. Ours starts random, and the SED recipe alone
    (four BCE terms, batch 1, 2000 steps) learned the backgrounds but not one thing class (0-16% IoU). So the
    visual tower first learns that alignment directly: each cost-volume cell (cosine to the frozen class
    embeddings / 0.07) is classified with a softmax cross-entropy against the label's class fractions in that
    cell. Softmax makes the rare thing classes compete with the backgrounds at every cell, which the per-class
    BCE does not. Only the visual tower changes; the text tower stays frozen.
    """
    from tqdm import tqdm

    visual = model.clip_model.visual
    opt = torch.optim.AdamW(visual.parameters(), lr=settings.visual_lr, weight_decay=settings.weight_decay)
    protos = _class_prototypes(text)
    warmup = max(1, settings.visual_steps // 40)
    n, steps = len(protos), settings.visual_steps
    gen = _pairs(spec, settings.data_seed, range(VISUAL_INDEX_OFFSET, VISUAL_INDEX_OFFSET + steps), n)
    visual.train()
    for step, (image, target) in enumerate(tqdm(gen, total=settings.visual_steps, desc="visual pretraining",
                                                unit="step", disable=not progress)):
        t = step / settings.visual_steps
        lr = settings.visual_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t))
        for group in opt.param_groups:
            group["lr"] = lr
        cosine = cell_cosine(model, image, protos)
        frac, cells = cell_targets(target, tuple(cosine.shape[-2:]))
        loss = balanced_cross_entropy(cosine / 0.07, frac, cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


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


def sed_loss(final: torch.Tensor, aux: list[torch.Tensor], target: torch.Tensor, ce_weight: float = 0.0,
             balanced: bool = False) -> tuple[torch.Tensor, list[float]]:
    """The four BCE terms, each on logits upsampled (bilinear) to the target's size, plus `ce_weight` times the
    softmax cross-entropy of the final logits over the labelled pixels (0: the official loss exactly).

    Why the extra term: the per-class BCE averages over 24 classes and all pixels, so the things' positives
    weigh little; trained from scratch, three runs of the BCE terms alone learned the backgrounds (78-96% IoU)
    and not one thing class (0-16%).

    Why a plain mean over pixels (`balanced=False`) once the visual tower is pretrained: the thing/stuff balance
    that pretraining needs made the SED phase over-predict things on backgrounds (white ring on sky, pink circle
    on wall: more false-positive pixels than true ones). Measured from the shipped 1400-step model, 200 more
    steps at lr 2e-4, mIoU on 40 held-out scenes: balanced 69.5, things weighted half 72.1, plain 75.0.

    Returns the total and the terms [final, aux0, aux1, aux2, ce].
    """
    size = target.shape[-2:]
    terms = []
    for logits in [final, *aux]:
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        terms.append(F.binary_cross_entropy_with_logits(up, target))
        if logits is final:
            final_up = up
    labelled = target.sum(0) > 0
    if balanced:
        ce = balanced_cross_entropy(final_up, target, labelled)
    else:
        ce = pixel_cross_entropy(final_up, target)[labelled].mean()
    total = sum(terms) + ce_weight * ce
    return total, [float(t.detach()) for t in [*terms, ce]]  # type: ignore[return-value]


def _text_embeddings(model: SedModel, vocab: Vocabulary) -> torch.Tensor:
    import open_clip

    from .text import encode_vocabulary

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.config.clip["text_cfg"]["context_length"]))
    emb = encode_vocabulary(model.clip_model, tokenizer, vocab, model.templates, progress=False)
    return torch.from_numpy(emb)


def _recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that change the result (threads and checkpoint spacing do not)."""
    return {k: v for k, v in settings.items() if k not in ("threads", "checkpoint_every")}


def _sed_optimizer(model: SedModel, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the visual tower's group runs at `backbone_lr_scale` of the lr."""
    visual = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip_model.visual.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip_model.visual.")]
    groups = [{"params": visual, "lr_scale": s.backbone_lr_scale}, {"params": rest, "lr_scale": 1.0}]
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)


def _save_resume(path: Path, model: SedModel, opt: torch.optim.Optimizer, step: int, s: TrainSettings) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": official_state_dict(model), "optimizer": opt.state_dict(), "step": step,
                "settings": asdict(s)}, tmp)
    os.replace(tmp, path)


def _pairs(spec: InputSpec, data_seed: int, indices: range, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training pairs for scene `indices`, drawn inline. Not on a helper thread: beside torch's two threads on two
    cores it made steps slower, not faster (measured: visual pretraining 2.7 instead of 4.3 steps/s; SED steps
    about 1.3 s instead of 0.93 s of compute plus 0.11 s to draw a scene)."""
    for i in indices:
        yield sample(spec, data_seed, i, n)


def train(
    config: ModelConfig, out: Path, settings: TrainSettings, *, resume: bool = True, progress: bool = True,
    init: Path | None = None,
) -> Path:
    """Train `config` on generated shapes scenes into `out`; returns the final official checkpoint's path.

    `init`: fine-tune these weights (their sha256 must be `settings.init_sha256`) instead of training from
    random weights; the text and visual pretraining are skipped then. `out` holds `last.pth` (resume state,
    every `checkpoint_every` steps), `loss_log.csv`, and at the end `model_final.pth` (official format) and
    `<model>.safetensors` (fp16) with `model_card.json`.
    """
    from tqdm import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary("shapes", SHAPES_CLASSES)
    model = build_model(config, seed=settings.seed)
    spec = InputSpec.from_settings(config.sed)
    start = 0
    resume_path = out / RESUME_FILE
    resuming = resume and resume_path.exists()
    state = torch.load(resume_path, map_location="cpu", weights_only=True) if resuming else None
    if (init is None) != (settings.init_sha256 is None):
        raise ValueError("init and settings.init_sha256 go together")
    if init is not None and state is None:
        _, sha = load_checkpoint_into(model, init)
        if sha != settings.init_sha256:
            raise SedUserError(f"{init} changed since this run was set up (sha256 {sha[:12]}...); start it again")
    if state is not None:
        if _recipe(state.get("settings", {})) != _recipe(asdict(settings)):
            raise SedUserError(f"{resume_path} was written with other settings ({_recipe(state.get('settings', {}))}); "
                               "pass the same options to resume, or --restart to start over")
        model.load_state_dict({k.removeprefix(OFFICIAL_PREFIX): v for k, v in state["model"].items()})
        start = int(state["step"])
    elif settings.text_steps and init is None:
        pretrain_text(model, vocab.classes, settings.text_steps, settings.seed)
    trainable_parameters(model)  # freezes the text tower
    text = _text_embeddings(model, vocab)  # the frozen tower's embeddings: computed once
    if state is None and settings.visual_steps and init is None:
        pretrain_visual(model, text, spec, settings, progress)
    opt = _sed_optimizer(model, settings)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    log_path = out / LOSS_LOG
    header = "step,loss,loss_final,loss_aux0,loss_aux1,loss_aux2,loss_ce,lr,seconds\n"
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
        offset = settings.data_offset
        pairs = _pairs(spec, settings.data_seed, range(offset + start, offset + settings.steps), len(vocab))
        for step, (image, target) in enumerate(pairs, start=start):
            lr = lr_at(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            feats = model.encode_image(image)
            final, aux = model.transformer.training_logits(feats.dense, text, (feats.res4, feats.res3, feats.res2))
            loss, terms = sed_loss(final, aux, target, settings.ce_weight, settings.ce_balanced)
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
    text_steps: int, visual_steps: int, eval_images: int, threads: int | None, restart: bool, force: bool,
    progress: bool, init: Path | None = None, warmup_steps: int = 100, data_offset: int = 0,
) -> None:
    """`sed-export train`: train (or resume), then write fp16 weights, held-out metrics and the model card.

    With `init` the run fine-tunes those weights (no pretraining); the card records them and, when a model card
    sits beside them, the recipe that made them, so the whole chain stays reproducible."""
    import platform

    from .config import load_model_config

    config = load_model_config(model)
    weights = out / f"{config.name}.safetensors"
    if weights.exists() and not force:
        raise SedUserError(f"{out} already holds a finished run ({weights.name}); pass --force to train again into it")
    init_card = init_sha256 = None
    if init is not None:
        if not init.is_file():
            raise SedUserError(f"--init {init} is not a file; pass the weights (.safetensors or .pth) to fine-tune")
        text_steps = visual_steps = 0  # the towers come from the init weights
        init_sha256 = file_sha256(init)
        init_card = _card_beside(init, init_sha256)
    settings = TrainSettings(steps=steps, lr=lr, seed=seed, data_seed=data_seed, warmup_steps=warmup_steps,
                             checkpoint_every=checkpoint_every, threads=threads, text_steps=text_steps,
                             visual_steps=visual_steps, data_offset=data_offset,
                             init_sha256=init_sha256)
    if restart and (out / RESUME_FILE).exists():
        (out / RESUME_FILE).unlink()
    t0 = time.perf_counter()
    final = train(config, out, settings, resume=not restart, progress=progress, init=init)
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
            "loss": "sum of 4 BCE terms (final + 3 aux heads on detached features), logits upsampled to the label "
                    "size, plus ce_weight x softmax cross-entropy of the final logits on labelled pixels (a plain "
                    "mean, or thing/stuff balanced when ce_balanced)",
            "frozen": "CLIP text tower (after text_steps of prompt-classification pretraining, a stand-in for "
                      "CLIP's)",
            "init": "random (no pretrained CLIP); visual tower pretrained for visual_steps on cost-volume "
                    "cross-entropy (a stand-in for CLIP's image-text alignment)" if init is None else
                    f"fine-tuned from {init.name} (sha256 {settings.init_sha256}); see init_card",
        },
        **({"init_card": init_card} if init is not None else {}),
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


def _card_beside(weights: Path, sha256: str) -> dict[str, Any] | None:
    """The model card written with `weights` (shipped `<name>.card.json`, or a run folder's model_card.json),
    reduced to what reproduces them; None when there is none or it describes other weights than `sha256`."""
    for card_path in (weights.with_suffix(".card.json"), weights.parent / CARD):
        if card_path.is_file():
            card = json.loads(card_path.read_text())
            if card.get("sha256") == sha256:
                keep = ("weights", "sha256", "data", "recipe", "init_card", "train_seconds", "eval")
                return {k: card[k] for k in keep if k in card}
    return None


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
    return {f"{h}_mean_last_{len(tail)}": round(float(v), 5) for h, v in zip(header[1:7], values[:, 1:7].mean(0))}
