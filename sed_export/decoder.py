"""SED's gradual-fusion decoder (the official `Aggregator`), with category early rejection.

Module and parameter names follow the official code so that the checkpoint's
`sem_seg_head.predictor.transformer.*` keys load as they are. Layouts are explicit reshapes/permutes
(no einops, no 3-input einsum) and the class axis rides the batch axis, as in the official code.
Only batch size 1 is supported, as in the official CER path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cer import topk_union
from .config import SedSettings

StageTimer = Callable[[str], ContextManager[object]]
CerSelect = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _no_timer(_: str) -> ContextManager[object]:
    return contextlib.nullcontext()


class ConvNextBlock(nn.Module):
    """FAM part 1: depthwise k x k conv -> LayerNorm (channels-last, eps 1e-6) -> MLP -> layer scale -> residual."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))  # official layer_scale_init_value = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear attention with the elu(x)+1 kernel, as batched matmuls.

    q, k, v: (n, heads, L, d). Same arithmetic as the official einsums, including the v / S ... * S
    rescaling (a no-op in exact arithmetic that the official code uses against fp16 overflow).
    The sums over classes run in fp32 even in a half-precision model (they reach thousands at N = 847).
    """
    dtype = q.dtype
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):  # autocast would run these matmuls in fp16 again
        with torch.autocast(device_type, enabled=False):
            return linear_attention(q.float(), k.float(), v.float(), eps).to(dtype)
    q, k, v = q.float(), k.float(), v.float()
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    length = v.shape[2]
    v = v / length
    kv = torch.matmul(k.transpose(-1, -2), v)  # (n, h, d, d_v)
    z = 1.0 / (torch.matmul(q, k.sum(dim=2, keepdim=True).transpose(-1, -2)) + eps)  # (n, h, L, 1)
    return (torch.matmul(q, kv) * z * length).to(dtype)


class ClassAttention(nn.Module):
    """Multi-head linear attention across classes (official `AttentionLayer`, no text guidance, no out-proj)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, h, dim // h).transpose(1, 2)

        out = linear_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return out.transpose(1, 2).reshape(n, length, dim)


class ClassTransformerLayer(nn.Module):
    """FAM part 2: a pre-norm transformer layer whose sequence is the class axis, one sequence per pixel.

    Keeps the official double residual: the block returns x + (x + attn + mlp).
    """

    def __init__(self, dim: int, num_heads: int, pooling_size: tuple[int, int]) -> None:
        super().__init__()
        self.pooling_size = tuple(pooling_size)
        self.attention = ClassAttention(dim, num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, C, H, W), classes on the batch axis."""
        t, c, h, w = x.shape
        pooled = self.pooling_size != (1, 1)
        xp = F.avg_pool2d(x, self.pooling_size) if pooled else x  # eval uses (1, 1): identity, skipped
        hp, wp = xp.shape[-2:]
        seq = xp.permute(2, 3, 0, 1).reshape(hp * wp, t, c)  # (pixels, classes, C)
        seq = seq + self.attention(self.norm1(seq))
        seq = seq + self.MLP(self.norm2(seq))
        xp = seq.reshape(hp, wp, t, c).permute(2, 3, 0, 1)
        if pooled:
            xp = F.interpolate(xp, size=(h, w), mode="bilinear", align_corners=True)
        return x + xp


class DoubleConv(nn.Module):
    """(3x3 conv, no bias -> GroupNorm(out // 16) -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = out_channels // 16
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """One decoder layer: FAM (ConvNeXt block + class attention), then SFM (2x up, fuse skips, DoubleConv)."""

    def __init__(
        self, in_dim: int, out_dim: int, guidance_dim: int, num_heads: int, kernel_size: int,
        pooling_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_dim, in_dim - guidance_dim, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_dim + guidance_dim, out_dim)
        self.cnext = ConvNextBlock(in_dim, kernel_size)
        self.attention = ClassTransformerLayer(in_dim, num_heads, pooling_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, corr_guidance: torch.Tensor) -> torch.Tensor:
        """x: (T, C, H, W); skip: (1, g, 2H, 2W) per image; corr_guidance: (T, g, 2H, 2W) per class."""
        x = self.attention(self.cnext(x))
        x = self.up(x)
        skip = skip.expand(x.shape[0], -1, -1, -1)
        return self.conv(torch.cat([x, skip, corr_guidance], dim=1))


def _class_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(pixels, classes, C) -> (pixels, heads, classes, C / heads), the layout of `ClassAttention`."""
    p, n, c = t.shape
    return t.reshape(p, n, num_heads, c // num_heads).transpose(1, 2)


def _put_rows(rows: torch.Tensor | None, total: int, start: int, part: torch.Tensor) -> torch.Tensor:
    """Write `part` at `start` into a (total, ...) tensor, allocating it at the first part's shape."""
    if rows is None:
        rows = part.new_empty((total, *part.shape[1:]))
    rows[start : start + len(part)] = part
    return rows


def _map_chunks(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over `rows` a class chunk at a time, gathered into one tensor allocated once."""
    out = None
    for s in range(0, rows.shape[0], chunk):
        out = _put_rows(out, rows.shape[0], s, fn(rows[s : s + chunk]))
    assert out is not None
    return out


class ChunkedUp:
    """One `Up` layer run over class chunks, equal to `Up.forward` on all classes (up to float summation order).

    Only the class attention mixes classes, and only through two sums over the class axis per pixel and head:
    sum_c phi(k_c)^T v_c / T and sum_c phi(k_c). So a stats pass over chunks accumulates those (fp32), and an
    apply pass recomputes each chunk's ConvNeXt block and finishes the layer with the global sums. The working
    set is one chunk's FAM/SFM tensors plus the two sums, whatever the class count.
    The first DoubleConv convolution over cat([up, skip, guidance]) is a sum of three convolutions (it has no
    bias), so the per-image skip part is computed once instead of once per class.
    """

    def __init__(self, layer: Up) -> None:
        if layer.attention.pooling_size != (1, 1):
            raise ValueError("the class-chunked decoder runs the eval layout (pooling 1x1) only")
        self.layer = layer
        att = layer.attention.attention
        self.heads = att.num_heads
        guidance = layer.conv.double_conv[0].in_channels - layer.cnext.dwconv.in_channels  # skip and cost guidance
        self.split = (layer.up.out_channels, guidance)  # channels of [up, skip, cost guidance] in the concat

    def _attention_input(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ConvNeXt block's output y (t, C, H, W) as the attention's sequence (pixels, t, C) and norm1 of it."""
        t, c, h, w = y.shape
        seq = y.permute(2, 3, 0, 1).reshape(h * w, t, c)
        return seq, self.layer.attention.norm1(seq)

    def partial_stats_from_block(self, y: torch.Tensor, total: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's share of the class sums (fp32) from its ConvNeXt output y: kv (pixels, h, d, d), ksum
        (pixels, h, 1, d); `total` is the number of alive classes (v is divided by it, as the one-pass attention
        does)."""
        att = self.layer.attention.attention
        _, normed = self._attention_input(y)
        k = F.elu(_class_heads(att.k(normed), self.heads).float()) + 1.0
        v = _class_heads(att.v(normed), self.heads).float() / total
        return torch.matmul(k.transpose(-1, -2), v), k.sum(dim=2, keepdim=True)

    def partial_stats(self, xc: torch.Tensor, total: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`partial_stats_from_block` of the chunk's layer input."""
        return self.partial_stats_from_block(self.layer.cnext(xc), total)

    def stats(self, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The class sums of the linear attention over all T rows of x: kv (pixels, h, d, d), ksum (pixels, h, 1, d)."""
        total = x.shape[0]
        kv: torch.Tensor | None = None
        ksum: torch.Tensor | None = None
        for start in range(0, total, chunk):
            part_kv, part_k = self.partial_stats(x[start : start + chunk], total)
            kv = part_kv if kv is None else kv + part_kv
            ksum = part_k if ksum is None else ksum + part_k
        assert kv is not None and ksum is not None
        return kv, ksum

    def apply_from_block(self, y: torch.Tensor, skip_part: torch.Tensor, cg: torch.Tensor, kv: torch.Tensor,
                         ksum: torch.Tensor, total: int | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """The rest of the layer for one chunk, from its ConvNeXt output y: attention with the global sums, MLP,
        double residual, 2x up, then the DoubleConv with the skip's share of its first convolution precomputed
        (`skip_part`)."""
        layer, attn_layer = self.layer, self.layer.attention
        att = attn_layer.attention
        seq, normed = self._attention_input(y)
        t, c, h, w = y.shape
        q = F.elu(_class_heads(att.q(normed), self.heads).float()) + 1.0
        z = 1.0 / (torch.matmul(q, ksum.transpose(-1, -2)) + eps)
        a = (torch.matmul(q, kv) * z * total).to(seq.dtype)
        seq = seq + a.transpose(1, 2).reshape(h * w, t, c)
        seq = seq + attn_layer.MLP(attn_layer.norm2(seq))
        out = y + seq.reshape(h, w, t, c).permute(2, 3, 0, 1)
        up = layer.up(out)
        first = layer.conv.double_conv[0]
        c_up, c_skip = self.split
        w_up, w_cg = first.weight[:, :c_up], first.weight[:, c_up + c_skip :]
        pad = first.padding
        x = F.conv2d(up, w_up, padding=pad) + skip_part + F.conv2d(cg, w_cg, padding=pad)
        return layer.conv.double_conv[1:](x)

    def apply(self, xc: torch.Tensor, skip_part: torch.Tensor, cg: torch.Tensor, kv: torch.Tensor,
              ksum: torch.Tensor, total: int | torch.Tensor) -> torch.Tensor:
        """`apply_from_block` of the chunk's layer input (the torch path recomputes the block: less memory)."""
        return self.apply_from_block(self.layer.cnext(xc), skip_part, cg, kv, ksum, total)

    def skip_part(self, skip: torch.Tensor) -> torch.Tensor:
        """The per-image skip's share of the first DoubleConv convolution (1, out, 2H, 2W): computed once."""
        first = self.layer.conv.double_conv[0]
        c_up, c_skip = self.split
        return F.conv2d(skip, first.weight[:, c_up : c_up + c_skip], padding=first.padding)


@dataclass
class DecoderOutput:
    """scores: (N, 192, 192) sigmoid probabilities, 0 for rejected classes.
    kept: the sorted original class indices alive after each CER point (None in full mode).
    """

    scores: torch.Tensor
    kept: list[torch.Tensor] | None
    rows: torch.Tensor | None = None  # kept_only: the class of each row of scores (sorted), else None


def _decoder_output(probs: torch.Tensor, alive: torch.Tensor, kept: list[torch.Tensor] | None, num_classes: int,
                    kept_only: bool) -> DecoderOutput:
    """The survivors' (T, h, w) probabilities as the decoder hands them over: all N rows in full mode (kept None),
    else kept-only rows, or scattered into an N x h x w block with 0 for rejected classes."""
    if kept is None:
        return DecoderOutput(scores=probs, kept=None)
    if kept_only:  # the survivors' rows only: no N x h x w block of zeros
        return DecoderOutput(scores=probs, kept=kept, rows=alive)
    scores = probs.new_zeros((num_classes,) + probs.shape[1:])
    scores[alive] = probs
    return DecoderOutput(scores=scores, kept=kept)


class SedDecoder(nn.Module):
    """The official `Aggregator` for inference: cost volume -> conv1 -> three Up layers -> head."""

    def __init__(self, s: SedSettings, num_templates: int) -> None:
        super().__init__()
        hidden = s.hidden_dims
        d1, d2, d3 = s.decoder_dims
        g1, g2, g3 = s.decoder_guidance_proj_dims
        self.conv1 = nn.Conv2d(num_templates, hidden, kernel_size=7, stride=1, padding=3)
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, p, kernel_size=3, stride=1, padding=1), nn.ReLU())
            for d, p in zip(s.decoder_guidance_dims, s.decoder_guidance_proj_dims)
        )
        corr_in = (num_templates, g1, g2)  # the official hard-coded (80, 32, 16)
        self.decoder_corr_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(d, p, kernel_size=2, stride=2), nn.ReLU())
            for d, p in zip(corr_in, s.decoder_guidance_proj_dims)
        )
        pool = (s.pooling_sizes[0], s.pooling_sizes[1])
        self.decoder1 = Up(hidden, d1, g1, s.num_heads, s.kernel_size[0], pool)
        self.decoder2 = Up(d1, d2, g2, s.num_heads, s.kernel_size[1], pool)
        self.decoder3 = Up(d2, d3, g3, s.num_heads, s.kernel_size[2], pool)
        self.head0 = nn.Conv2d(hidden, 1, kernel_size=3, stride=1, padding=1)
        self.head1 = nn.Conv2d(d1, 1, kernel_size=3, stride=1, padding=1)
        self.head2 = nn.Conv2d(d2, 1, kernel_size=3, stride=1, padding=1)
        self.head = nn.Conv2d(d3, 1, kernel_size=3, stride=1, padding=1)
        # CER's ranking: torch.topk here; the torch backend swaps in the CUDA kernel (`cuda_ops.topk_union_cuda`)
        # on a GPU. Same contract: (T, H, W) logits, k -> sorted int64 indices of the kept rows.
        self.select_classes: Callable[[torch.Tensor, int], torch.Tensor] = topk_union

    @staticmethod
    def cost_volume(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel with every (class, template) embedding: (N, P, H, W).

        dense: (1, E, H, W); text: (N, P, E). No temperature (the official multiply is commented out).
        """
        img = F.normalize(dense, dim=1)[0]  # (E, H, W)
        txt = F.normalize(text, dim=-1)
        n, p, e = txt.shape
        _, h, w = img.shape
        return torch.matmul(txt.reshape(n * p, e), img.reshape(e, h * w)).reshape(n, p, h, w)

    def training_logits(
        self, dense: torch.Tensor, text: torch.Tensor, guidance: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The official training forward: final logits (N, h, w) and the three aux heads' logits (N, h_i, w_i).

        No CER (every class goes through). The aux heads see detached features, as in the official code, so
        they learn to rank classes for CER without steering the main path.
        """
        corr = self.cost_volume(dense, text)
        x = self.conv1(corr)
        skips = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance)]
        layers = (self.decoder1, self.decoder2, self.decoder3)
        aux_heads = (self.head0, self.head1, self.head2)
        aux: list[torch.Tensor] = []
        cg = corr
        for i in range(3):
            aux.append(aux_heads[i](x.detach())[:, 0])
            cg = self.decoder_corr_guidance_projection[i](cg)
            x = layers[i](x, skips[i], cg)
        return self.head(x)[:, 0], aux

    def forward(
        self,
        dense: torch.Tensor,
        text: torch.Tensor,
        guidance: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        topk: int | None = None,
        timer: StageTimer = _no_timer,
        cer_select: CerSelect | None = None,
        kept_only: bool = False,
    ) -> DecoderOutput:
        """dense: (1, E, 24, 24); text: (N, P, E); guidance: (res4, res3, res2). topk None = full mode.

        cer_select (benchmarks only, e.g. `sed-bench --kept`): called at CER point i as
        `cer_select(i, aux_logits, keep)` with the (T, H, W) aux logits of the alive classes and CER's sorted
        row indices; returns the sorted row indices to keep instead. None = CER as in the paper.
        """
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        with timer("cost_volume"):
            corr = self.cost_volume(dense, text)
            x = self.conv1(corr)  # (N, hidden, 24, 24)
            skips = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance)]
        layers = (self.decoder1, self.decoder2, self.decoder3)
        aux_heads = (self.head0, self.head1, self.head2)
        corr_proj = self.decoder_corr_guidance_projection
        num_classes = x.shape[0]
        alive = torch.arange(num_classes, device=x.device)  # original indices of the rows of x
        kept: list[torch.Tensor] = []
        cg = corr  # per-class input of the next cost-guidance projection
        for i in range(3):
            if topk is not None:
                with timer(f"cer{i}"):
                    aux = aux_heads[i](x)[:, 0]
                    keep = self.select_classes(aux, topk)
                    if cer_select is not None:  # benchmark hook (sed-bench --kept): force the survivors
                        keep = cer_select(i, aux, keep)
                    if keep.numel() < x.shape[0]:
                        x, cg, alive = x[keep], cg[keep], alive[keep]
                    kept.append(alive)
            with timer(f"decoder{i + 1}"):
                # Classes are independent on the batch axis, so projecting only the survivors is exact.
                cg = corr_proj[i](cg)
                x = layers[i](x, skips[i], cg)
        with timer("head"):
            probs = torch.sigmoid(self.head(x)[:, 0])
            return _decoder_output(probs, alive, kept if topk is not None else None, num_classes, kept_only)

    def forward_chunked(
        self,
        dense: torch.Tensor,
        text: torch.Tensor,
        guidance: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        topk: int | None = None,
        chunk: int = 64,
        timer: StageTimer = _no_timer,
        kept_only: bool = False,
        cer_select: CerSelect | None = None,
    ) -> DecoderOutput:
        """`forward` with a bounded working set: every per-class stage runs `chunk` classes at a time.

        Held for all alive classes: the cost volume's projection input, each layer's input and the aux map (the
        CER points need every class); the ConvNeXt/attention hiddens, the up-sampled maps, the concat and the
        cost guidance at the larger grids exist for one chunk only, and the last layer writes sigmoid scores
        chunk by chunk. Equal to `forward` up to float summation order (tested <= 1e-5 on the scores, same kept
        sets) for any chunk >= 1. `cer_select`: the benchmark hook of `forward`.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        layers = [ChunkedUp(layer) for layer in (self.decoder1, self.decoder2, self.decoder3)]
        aux_heads = (self.head0, self.head1, self.head2)
        corr_proj = self.decoder_corr_guidance_projection
        with timer("cost_volume"):
            corr = self.cost_volume(dense, text)
            num_classes = corr.shape[0]
            x = _map_chunks(self.conv1, corr, chunk)
            skips = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance)]
        alive = torch.arange(num_classes, device=x.device)
        kept: list[torch.Tensor] = []
        cg = corr  # per-class input of the next cost-guidance projection, at the previous grid
        scores_alive: torch.Tensor | None = None
        for i, layer in enumerate(layers):
            if topk is not None:
                with timer(f"cer{i}"):
                    aux = _map_chunks(aux_heads[i], x, chunk)[:, 0]
                    keep = self.select_classes(aux, topk)
                    if cer_select is not None:
                        keep = cer_select(i, aux, keep)
                    if keep.numel() < x.shape[0]:
                        x, cg, alive = x[keep], cg[keep], alive[keep]
                    kept.append(alive)
            with timer(f"decoder{i + 1}"):
                total = x.shape[0]
                kv, ksum = layer.stats(x, chunk)
                skip_part = layer.skip_part(skips[i])
                next_x: torch.Tensor | None = None
                next_cg: torch.Tensor | None = None
                for s in range(0, total, chunk):
                    cg_chunk = corr_proj[i](cg[s : s + chunk])
                    out = layer.apply(x[s : s + chunk], skip_part, cg_chunk, kv, ksum, total)
                    if i == 2:  # the last layer writes scores: its 192 x 192 maps never exist for every class
                        scores_alive = _put_rows(scores_alive, total, s, torch.sigmoid(self.head(out)[:, 0]))
                    else:  # written into arrays allocated once (a list of chunks and its concatenation: twice)
                        next_x = _put_rows(next_x, total, s, out)
                        next_cg = _put_rows(next_cg, total, s, cg_chunk)
                if i < 2:
                    assert next_x is not None and next_cg is not None
                    x, cg = next_x, next_cg
        assert scores_alive is not None
        return _decoder_output(scores_alive, alive, kept if topk is not None else None, num_classes, kept_only)
