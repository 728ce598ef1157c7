"""Official-format checkpoints: round trip, key report, refusal of misfits, pickle opt-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need

torch = need("torch")

from sed_export.checkpoint import (  # noqa: E402
    compare_keys,
    guess_family,
    load_checkpoint_into,
    read_checkpoint,
    save_official_checkpoint,
)
from sed_export.config import load_model_config  # noqa: E402
from sed_export.model import OFFICIAL_PREFIX, build_model, official_state_dict  # noqa: E402
from sed_runtime.errors import SedUserError  # noqa: E402


class NotAllowed:  # a pickled object that weights_only loading must refuse
    pass


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    model = build_model(load_model_config("sed-tiny"), seed=123)
    save_official_checkpoint(model, path)
    return path, model


def test_round_trip_gives_same_outputs(tiny_ckpt):
    path, source = tiny_ckpt
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"} and all(k.startswith(OFFICIAL_PREFIX) for k in raw["model"])
    target = build_model(load_model_config("sed-tiny"), seed=0)
    report, sha = load_checkpoint_into(target, path)
    assert report.fits and report.matched == len(raw["model"]) and len(sha) == 64
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 768, 768, generator=g)
    text = torch.nn.functional.normalize(torch.randn(5, 80, 64, generator=g), dim=-1)
    with torch.inference_mode():
        a, b = source(image, text, topk=2), target(image, text, topk=2)
    assert torch.equal(a.scores, b.scores)
    assert [x.tolist() for x in a.kept] == [x.tolist() for x in b.kept]


def test_plain_state_dict_and_extra_keys_are_accepted(tmp_path, tiny_ckpt):
    _, source = tiny_ckpt
    state = official_state_dict(source)
    state["sem_seg_head.predictor.something_new"] = torch.zeros(2)
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    report, _ = load_checkpoint_into(build_model(load_model_config("sed-tiny")), path)
    assert report.unexpected == ["sem_seg_head.predictor.something_new"]
    assert "unexpected" in report.render()


def test_wrong_model_is_refused_with_a_readable_report(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    cfg = json.loads((Path(__file__).parents[1] / "sed_export" / "configs" / "sed-tiny.json").read_text())
    cfg["name"] = "tiny-variant"
    cfg["sed"]["decoder_guidance_proj_dims"] = [16, 16, 8]
    variant = tmp_path / "variant.json"
    variant.write_text(json.dumps(cfg))
    model = build_model(load_model_config(variant))
    with pytest.raises(SedUserError, match="does not fit model tiny-variant") as err:
        load_checkpoint_into(model, path)
    assert "\n" not in str(err.value)
    report = compare_keys(model, read_checkpoint(path))
    assert report.mismatched and not report.fits
    assert "shape" in report.render()


def test_missing_keys_are_refused(tmp_path, tiny_ckpt):
    _, source = tiny_ckpt
    state = official_state_dict(source)
    del state[OFFICIAL_PREFIX + "transformer.head.weight"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SedUserError, match="1 missing"):
        load_checkpoint_into(build_model(load_model_config("sed-tiny")), path)


def test_family_guess():
    b = {OFFICIAL_PREFIX + "clip_model.visual.head.proj.weight": torch.zeros(640, 1024)}
    l_ = {OFFICIAL_PREFIX + "clip_model.visual.head.mlp.fc2.weight": torch.zeros(768, 1536)}
    assert guess_family(b) == "sed-b" and guess_family(l_) == "sed-l" and guess_family({}) is None
    for name in ("sed-tiny", "sed-shapes"):  # the small built-ins are recognised from their real state dicts
        assert guess_family(official_state_dict(build_model(load_model_config(name)))) == name


def test_wrong_small_model_checkpoint_names_the_right_model(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    with pytest.raises(SedUserError, match="pass --model sed-tiny"):
        load_checkpoint_into(build_model(load_model_config("sed-shapes")), path)


def test_pickle_needs_opt_in(tmp_path, tiny_ckpt):
    _, source = tiny_ckpt
    path = tmp_path / "pickled.pth"
    torch.save({"model": official_state_dict(source), "extra": NotAllowed()}, path)
    with pytest.raises(SedUserError, match="--allow-pickle"):
        read_checkpoint(path)
    assert len(read_checkpoint(path, allow_pickle=True)) == len(official_state_dict(source))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files(tmp_path, tiny_ckpt, content):
    path = tmp_path / "bad.pth"
    if content is None:  # truncated copy of a real checkpoint
        content = tiny_ckpt[0].read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(SedUserError, match="cannot be read"):
        read_checkpoint(path)


def test_missing_file():
    with pytest.raises(SedUserError, match="not found"):
        read_checkpoint("/nonexistent/model.pth")


def test_non_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(SedUserError, match="not a state dict"):
        read_checkpoint(path)
