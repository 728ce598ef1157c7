"""The reference model against the official code's semantics (shapes, keys, CER, attention, dense head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from needs import need

torch = need("torch")
F = torch.nn.functional

from planted import planted_inputs  # noqa: E402

from sed_export.cer import topk_union  # noqa: E402
from sed_export.config import load_model_config  # noqa: E402
from sed_export.decoder import linear_attention  # noqa: E402
from sed_export.model import build_model, official_state_dict  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="module")
def tiny():
    return build_model(load_model_config("sed-tiny"))


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 768, 768, generator=g)
    text = F.normalize(torch.randn(12, 80, tiny.config.embed_dim, generator=g), dim=-1)
    with torch.inference_mode():
        feats = tiny.encode_image(image)
    return feats, text


def _read_keys(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} not present (the key lists live in ../shared/reference/)")
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model,keys_file", [("sed-b", "keys_B.txt"), ("sed-l", "keys_L.txt")])
def test_state_dict_matches_official_keys(model, keys_file):
    expected = _read_keys(keys_file)
    got = {k: tuple(v.shape) for k, v in official_state_dict(build_model(load_model_config(model))).items()}
    assert set(got) - set(expected) == set()
    assert set(expected) - set(got) == set()
    assert {k: s for k, s in got.items() if expected[k] != s} == {}


def test_encoder_shapes(tiny, tiny_inputs):
    feats, _ = tiny_inputs
    assert tuple(feats.dense.shape) == (1, 64, 24, 24)
    assert tuple(feats.res4.shape) == (1, 160, 48, 48)
    assert tuple(feats.res3.shape) == (1, 80, 96, 96)
    assert tuple(feats.res2.shape) == (1, 40, 192, 192)


def test_dense_head_equals_official_fake_batch_path(tiny):
    """Official: reshape the last stage to (H*W, C, 1, 1) and run trunk.head then visual.head."""
    x = torch.randn(1, 320, 5, 7)
    visual = tiny.clip_model.visual
    with torch.inference_mode():
        ref = visual.head(visual.trunk.head(x.permute(0, 2, 3, 1).reshape(35, 320, 1, 1)))
        ref = ref.reshape(1, 5, 7, -1).permute(0, 3, 1, 2)
        norm = visual.trunk.head.norm
        ours = visual.head(
            F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        ).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_equals_official_einsums():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 11, 4, 8, generator=g) for _ in range(3))  # (n, L, h, d) official layout
    Q, K = F.elu(q) + 1, F.elu(k) + 1
    S = v.shape[1]
    KV = torch.einsum("nshd,nshv->nhdv", K, v / S)
    Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + 1e-6)
    ref = torch.einsum("nlhd,nhdv,nlh->nlhv", Q, KV, Z) * S
    ours = linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_class_transformer_keeps_double_residual(tiny):
    layer = tiny.transformer.decoder1.attention
    zeroed = {k: torch.zeros_like(v) for k, v in layer.state_dict().items()}
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(zeroed)
    try:
        x = torch.randn(3, 128, 4, 4)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), 2 * x)
    finally:
        layer.load_state_dict(saved)


def test_topk_union_matches_bruteforce():
    rng = np.random.default_rng(0)
    for classes, pixels, k in [(1, 5, 1), (5, 1, 2), (40, 30, 3), (200, 64, 8), (6, 10, 6), (6, 10, 99)]:
        logits = rng.standard_normal((classes, pixels)).astype(np.float32)
        want = sorted({int(c) for p in range(pixels) for c in np.argsort(-logits[:, p], kind="stable")[:k]})
        got = topk_union(torch.from_numpy(logits), k).tolist()
        assert got == want


def test_topk_union_rejects_bad_k():
    with pytest.raises(ValueError):
        topk_union(torch.zeros(3, 4), 0)


def test_topk_at_least_n_equals_full_model(tiny, tiny_inputs):
    feats, text = tiny_inputs
    with torch.inference_mode():
        full = tiny.decode(feats, text, topk=None)
        for k in (12, 13, 1000):
            fast = tiny.decode(feats, text, topk=k)
            assert torch.equal(fast.scores, full.scores)
            assert all(kept.tolist() == list(range(12)) for kept in fast.kept)
    assert full.kept is None
    assert tuple(full.scores.shape) == (12, 192, 192)
    assert float(full.scores.min()) > 0.0  # sigmoid, not softmax: every class scored independently


def _planted_model():
    """A sed-tiny whose conv1/head0 act per pixel: with a constant image map every pixel ranks classes alike."""
    model = build_model(load_model_config("sed-tiny"), seed=3)
    dec = model.transformer
    with torch.no_grad():
        dec.conv1.weight.zero_()
        dec.conv1.bias.zero_()
        dec.conv1.weight[0, :, 3, 3] = 1.0 / 80  # channel 0 = mean cosine over templates
        dec.head0.weight.zero_()
        dec.head0.bias.zero_()
        dec.head0.weight[0, 0, 1, 1] = 1.0
    return model


def test_cer_keeps_exactly_the_planted_topk():
    model = _planted_model()
    g = torch.Generator().manual_seed(5)
    e = model.config.embed_dim
    direction = F.normalize(torch.randn(e, generator=g), dim=0)
    dense = direction.reshape(1, e, 1, 1).expand(1, e, 24, 24).contiguous()
    n = 30
    sims = torch.linspace(-0.9, 0.9, n)[torch.randperm(n, generator=g)]  # distinct class similarities
    other = F.normalize(
        torch.randn(n, e, generator=g) - (torch.randn(n, e, generator=g) @ direction)[:, None] * direction, dim=-1
    )
    other = F.normalize(other - (other @ direction)[:, None] * direction, dim=-1)
    text = (sims[:, None] * direction + (1 - sims[:, None] ** 2).sqrt() * other)[:, None, :].expand(n, 80, e)
    feats = model.encode_image(torch.zeros(1, 3, 768, 768))._replace(dense=dense)
    with torch.inference_mode():
        previous: set[int] = set()
        for k in (1, 2, 4, 8, 16):
            out = model.decode(feats, text, topk=k)
            want = sorted(torch.argsort(sims, descending=True)[:k].tolist())
            assert out.kept[0].tolist() == want
            assert previous <= set(want)  # kept sets grow with k
            previous = set(want)
            for a, b in zip(out.kept, out.kept[1:]):
                assert set(b.tolist()) <= set(a.tolist())  # and shrink from one CER point to the next
            alive = set(out.kept[2].tolist())
            nonzero = {int(c) for c in range(n) if float(out.scores[c].abs().max()) > 0}
            assert nonzero == alive  # rejected classes score exactly 0


def _official_fast_decoder(dec, dense, text, guidance, k):
    """The official `fast_conv_decoder`, literally: cost guidance for all N, boolean masks, argsort+bincount."""
    img = F.normalize(dense, dim=1)
    corr = torch.einsum("bchw,btpc->bpthw", img, F.normalize(text, dim=-1)[None])
    corr = corr.permute(0, 2, 1, 3, 4).reshape(-1, corr.shape[1], 24, 24)  # (B T) P H W
    x = dec.conv1(corr)
    skips = [p(g_) for p, g_ in zip(dec.decoder_guidance_projection, guidance)]
    cg, c = [], corr
    for p in dec.decoder_corr_guidance_projection:
        c = p(c)
        cg.append(c)

    def valid(mask):
        t = mask.size(1)
        idx = torch.argsort(mask, dim=1, descending=True)[:, :k].reshape(-1)
        return torch.bincount(idx, minlength=t) > 0

    v0 = valid(dec.head0(x).permute(1, 0, 2, 3))
    x = dec.decoder1(x[v0], skips[0], cg[0][v0])
    v1 = valid(dec.head1(x).permute(1, 0, 2, 3))
    x = dec.decoder2(x[v1], skips[1], cg[1][v0][v1])
    v2 = valid(dec.head2(x).permute(1, 0, 2, 3))
    x = dec.decoder3(x[v2], skips[2], cg[2][v0][v1][v2])
    logits = dec.head(x)[:, 0]
    vi1 = v1.clone()
    vi1[v1] = v2
    vi = v0.clone()
    vi[v0] = vi1
    out = torch.zeros(v0.numel(), 192, 192)
    out[vi] = logits.sigmoid()
    return out, [torch.nonzero(v0)[:, 0], torch.nonzero(v0)[:, 0][v1], torch.nonzero(v0)[:, 0][v1][v2]]


def test_cer_matches_official_fast_decoder():
    model = build_model(load_model_config("sed-tiny"), seed=9)
    dec = model.transformer
    with torch.no_grad():
        dec.head1.bias.zero_()
        dec.head2.bias.zero_()
    feats, text = planted_inputs(model)
    rejected_later = False
    for k in (1, 2, 3, 5):
        with torch.inference_mode():
            ref_scores, ref_kept = _official_fast_decoder(
                dec, feats.dense, text, (feats.res4, feats.res3, feats.res2), k
            )
            out = model.decode(feats, text, topk=k)
        for a, b in zip(out.kept, ref_kept):
            assert a.tolist() == b.tolist()
        torch.testing.assert_close(out.scores, ref_scores, rtol=1e-4, atol=1e-5)
        assert len(out.kept[0]) < 25 or k == 5
        rejected_later |= len(out.kept[1]) < len(out.kept[0])
    assert rejected_later, "the planted inputs should make a later CER point reject too"
