"""Flamingo's building blocks: Perceiver resampler and gated cross-attention (tanh gates start at 0)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [visual features; latents] (the paper's resampler attention)."""

    def __init__(self, *, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: [b, n, d] features; latents: [b, m, d]
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """Any number of visual features -> ``num_latents`` tokens per image; open_flamingo's resampler
    (no frame or media-time embeddings: open_flamingo builds it without them)."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 2,
        heads: int = 4,
        dim_head: int = 32,
        num_latents: int = 16,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim=dim, heads=heads, dim_head=dim_head), feed_forward(dim)]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, t, f, n, d] -> [b, t, num_latents, d]
        b, t, f, n, d = x.shape
        x = x.reshape(b * t, f * n, d)
        latents = self.latents.unsqueeze(0).expand(b * t, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents.reshape(b, t, -1, d))


class MaskedCrossAttention(nn.Module):
    """Text attends to the latents of the most recent preceding image only; before any image, to none."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor
    ) -> torch.Tensor:
        # x: [b, l, dim]; media: [b, t, m, dv]; media_locations: [b, l] bool (True at <image> tokens)
        b, t, m, _ = media.shape
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        text_time = media_locations.long().cumsum(
            dim=-1
        )  # [b, l]: 1-based index of the current image
        media_time = torch.arange(1, t + 1, device=x.device).repeat_interleave(m)  # [t * m]
        allowed = text_time.unsqueeze(-1) == media_time.view(1, 1, -1)  # [b, l, t*m]
        has_media = ((text_time > 0) & (text_time <= t)).unsqueeze(1).unsqueeze(-1)  # [b, 1, l, 1]
        # Rows with no image get one dummy allowed key, then are zeroed: no NaN from an all-masked softmax.
        allowed = allowed | ~has_media.squeeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        out = out * has_media
        return self.to_out(out.transpose(1, 2).flatten(2))


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention + feed-forward, each behind tanh(gate) with gate = 0 at init: the LM is unchanged."""

    def __init__(
        self, *, dim: int, dim_visual: int, heads: int = 4, dim_head: int = 32, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim, dim_visual=dim_visual, heads=heads, dim_head=dim_head
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor
    ) -> torch.Tensor:
        x = self.attn(x, media, media_locations) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x
