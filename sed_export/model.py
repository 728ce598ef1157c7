"""The complete SED reference: open_clip ConvNeXt CLIP + gradual-fusion decoder, official key layout.

`SedModel.state_dict()` keys equal the official checkpoint's keys without the
`sem_seg_head.predictor.` prefix (see `official_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn

from sed_runtime.templates import load_templates

from .config import ModelConfig
from .decoder import DecoderOutput, SedDecoder, StageTimer, _no_timer
from .encoder import ImageFeatures, build_clip, check_dense_head, encode_image_dense

OFFICIAL_PREFIX = "sem_seg_head.predictor."


class SedModel(nn.Module):
    """SED for inference, batch size 1. Text embeddings are computed separately and passed in."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.templates = load_templates(config.sed.prompt_ensemble)
        self.clip_model = build_clip(config)
        check_dense_head(self.clip_model)
        self.transformer = SedDecoder(config.sed, num_templates=len(self.templates))

    def encode_image(self, image: torch.Tensor) -> ImageFeatures:
        """image: (1, 3, S, S) normalised CLIP input -> dense CLIP map and skip features."""
        return encode_image_dense(self.clip_model, image)

    def decode(
        self, feats: ImageFeatures, text: torch.Tensor, topk: int | None = None, timer: StageTimer = _no_timer,
        kept_only: bool = False,
    ) -> DecoderOutput:
        """text: (N, P, E) unit-norm template embeddings. topk None = full model, else CER with this k;
        kept_only: return only the surviving classes' score rows (`DecoderOutput.rows`)."""
        guidance = (feats.res4, feats.res3, feats.res2)
        return self.transformer(feats.dense, text, guidance, topk=topk, timer=timer, kept_only=kept_only)

    def forward(self, image: torch.Tensor, text: torch.Tensor, topk: int | None = None) -> DecoderOutput:
        return self.decode(self.encode_image(image), text, topk)


def build_model(config: ModelConfig, seed: int | None = 0) -> SedModel:
    """Build the model in eval mode; random weights come from `seed` so random runs are reproducible."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SedModel(config)
    else:
        model = SedModel(config)
    return model.eval()


def official_state_dict(model: SedModel) -> dict[str, torch.Tensor]:
    """State dict with the official checkpoint key names."""
    return {OFFICIAL_PREFIX + k: v for k, v in model.state_dict().items()}
