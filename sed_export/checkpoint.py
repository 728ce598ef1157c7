"""Official SED checkpoints: safe loading, a readable key report, and refusal of a checkpoint that does not fit.

The official files are detectron2 checkpoints, `{"model": state_dict, ...}`, keys prefixed with
`sem_seg_head.predictor.` (see `../shared/reference/keys_B.txt`). They are loaded with
`torch.load(weights_only=True)`; executing pickled code needs an explicit opt-in.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sed_runtime.errors import ModelError

from .config import ModelConfig
from .model import OFFICIAL_PREFIX, SedModel, official_state_dict

# Keys that identify the official model families, to suggest the right --model on a mismatch.
_FAMILY_HINTS = {
    "sed-b": (OFFICIAL_PREFIX + "clip_model.visual.head.proj.weight", (640, 1024)),
    "sed-l": (OFFICIAL_PREFIX + "clip_model.visual.head.mlp.fc2.weight", (768, 1536)),
    "sed-tiny": (OFFICIAL_PREFIX + "clip_model.visual.head.proj.weight", (64, 320)),
    "sed-shapes": (OFFICIAL_PREFIX + "clip_model.visual.head.proj.weight", (32, 256)),
}


@dataclass
class KeyReport:
    """How a checkpoint's keys compare with the model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    matched: int = 0

    @property
    def fits(self) -> bool:
        """Every model tensor is present with the right shape (unexpected extras are tolerated)."""
        return not self.missing and not self.mismatched

    def render(self, title: str = "checkpoint keys") -> str:
        """One readable table (rich), listing every problem key."""
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"{title}: {self.matched} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        )
        table.add_column("status")
        table.add_column("key", overflow="fold")
        table.add_column("checkpoint shape")
        table.add_column("model shape")
        for k, cs, ms in self.mismatched:
            table.add_row("shape", k, str(cs), str(ms))
        for k in self.missing:
            table.add_row("missing", k, "-", "")
        for k in self.unexpected:
            table.add_row("unexpected", k, "", "-")
        console = Console(width=160, file=io.StringIO())
        console.print(table)
        return console.file.getvalue()  # type: ignore[attr-defined]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an official `.pth` (or a `.safetensors`) file into a flat state dict with official key names."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found: pass the path of the official .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises several types for a bad file
            raise ModelError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        # torch wraps the real cause in several lines of advice; report the cause itself.
        cause = e.__context__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        msg = f"{type(cause).__name__}: {first}"[:160] if first else type(cause).__name__
        if not allow_pickle and "Unsupported global" in str(e):
            raise ModelError(
                f"checkpoint {path} holds pickled Python objects that weights_only loading refuses; "
                "if you trust the file, re-run with --allow-pickle"
            ) from None
        raise ModelError(f"checkpoint {path} cannot be read ({msg}); is it a complete PyTorch .pth file?") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"checkpoint {path} is not a state dict (expected {{'model': state_dict}} as the official files)"
        )
    return state


def compare_keys(model: SedModel, state: dict[str, torch.Tensor]) -> KeyReport:
    """Compare official-named checkpoint tensors with the model's."""
    expected = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    report = KeyReport()
    for k, shape in expected.items():
        if k not in state:
            report.missing.append(k)
        elif tuple(state[k].shape) != shape:
            report.mismatched.append((k, tuple(state[k].shape), shape))
        else:
            report.matched += 1
    report.unexpected = [k for k in state if k not in expected]
    return report


def guess_family(state: dict[str, torch.Tensor]) -> str | None:
    """Which built-in model a checkpoint looks like, from a few telltale tensors."""
    for name, (key, shape) in _FAMILY_HINTS.items():
        if key in state and tuple(state[key].shape) == shape:
            return name
    return None


def load_checkpoint_into(model: SedModel, path: str | Path, allow_pickle: bool = False) -> tuple[KeyReport, str]:
    """Load an official checkpoint into `model`; refuse one that does not fit. Returns (report, sha256)."""
    state = read_checkpoint(path, allow_pickle=allow_pickle)
    report = compare_keys(model, state)
    if not report.fits:
        family = guess_family(state)
        hint = f"; it looks like a {family} checkpoint, pass --model {family}" if family else ""
        example = (report.mismatched[0][0] if report.mismatched else report.missing[0]).removeprefix(OFFICIAL_PREFIX)
        raise ModelError(
            f"checkpoint {path} does not fit model {model.config.name}: {len(report.missing)} missing and "
            f"{len(report.mismatched)} shape-mismatched tensors (first: {example}){hint}; "
            "`sed-export keys` prints the full table"
        )
    own = {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
    model.load_state_dict({k: own[k] for k in model.state_dict()}, strict=True)
    return report, file_sha256(path)


def resolve_weights(config: ModelConfig, checkpoint: str | Path | None) -> tuple[Path | None, str]:
    """Which weights to load: `checkpoint` when given, else the weights shipped for `config`, else none.

    Returns (path or None, source) with source "checkpoint", "shipped" or "random". Shipped weights are
    checked against their model card's sha256, so a damaged install fails loudly instead of giving bad masks.
    """
    if checkpoint is not None:
        return Path(checkpoint), "checkpoint"
    shipped = config.shipped_weights
    if shipped is None:
        return None, "random"
    card = shipped.with_suffix(".card.json")
    if not shipped.is_file() or not card.is_file():
        raise ModelError(f"the weights shipped for {config.name} ({shipped}) are missing; reinstall sed-deploy "
                           "or pass --checkpoint")
    expected = json.loads(card.read_text()).get("sha256")
    if file_sha256(shipped) != expected:
        raise ModelError(f"{shipped} does not match the sha256 in {card.name}; the install is damaged, reinstall "
                           "sed-deploy")
    return shipped, "shipped"


def save_official_checkpoint(model: SedModel, path: str | Path) -> None:
    """Write `model` in the official format `{"model": state_dict}` (for tests and round trips)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": {k: v.detach().clone() for k, v in official_state_dict(model).items()}}, tmp)
    tmp.replace(path)
