"""Model configs as data: built-ins load, user JSON files are validated with one-line errors."""

from __future__ import annotations

import json

import pytest

from sed_export.config import builtin_models, load_model_config, model_config_from_dict
from sed_runtime.errors import SedUserError


def test_builtins():
    assert builtin_models() == ["sed-b", "sed-l", "sed-shapes", "sed-tiny"]
    b, l_ = load_model_config("sed-b"), load_model_config("sed-l")
    assert b.clip["vision_cfg"]["timm_model_name"] == "convnext_base" and b.embed_dim == 640
    assert l_.clip["vision_cfg"]["timm_proj"] == "mlp" and l_.embed_dim == 768
    assert b.sed.decoder_guidance_dims == (512, 256, 128) and l_.sed.decoder_guidance_dims == (768, 384, 192)
    assert b.sed.pooling_sizes == (1, 1)  # the eval override, not the yaml's training [2, 2]
    assert b.sed.pixel_mean == pytest.approx((122.7709383, 116.7460125, 104.09373615))


def test_user_file_round_trip(tmp_path):
    raw = load_model_config("sed-tiny").to_dict()
    raw["name"] = "mine"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    assert load_model_config(path).name == "mine"
    assert load_model_config(str(path)).sed == load_model_config("sed-tiny").sed


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.pop("sed"), "missing 'sed'"),
        (lambda c: c["sed"].pop("hidden_dims"), "missing hidden_dims"),
        (lambda c: c["sed"].update(colour="red"), "unknown colour"),
        (lambda c: c["sed"].update(decoder_dims=[64, 32]), "decoder_dims must be a list of 3"),
        (lambda c: c["sed"].update(hidden_dims=12.5), "hidden_dims must be a int"),
        (lambda c: c["sed"].update(hidden_dims=True), "hidden_dims must be a int"),
        (lambda c: c["sed"].update(prompt_ensemble="vild"), "prompt_ensemble"),
        (lambda c: c["sed"].update(text_guidance_dim=512), "text_guidance_dim must be 0"),
        (lambda c: c["sed"].update(decoder_dims=[64, 32, 8]), "multiples of 16"),
        (lambda c: c["clip"]["vision_cfg"].update(timm_model_name="vit_base_patch16_224"), "not a ConvNeXt"),
        (lambda c: c["clip"].pop("text_cfg"), "open_clip model config"),
    ],
)
def test_bad_configs_are_one_line_errors(mutate, message):
    raw = load_model_config("sed-b").to_dict()
    mutate(raw)
    with pytest.raises(SedUserError, match=message) as err:
        model_config_from_dict(raw, where="x.json")
    assert "\n" not in str(err.value)


def test_unknown_name_and_bad_json(tmp_path):
    with pytest.raises(SedUserError, match="unknown model 'sed-xl'.*sed-b, sed-l, sed-shapes, sed-tiny"):
        load_model_config("sed-xl")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SedUserError, match="cannot read model config"):
        load_model_config(bad)
