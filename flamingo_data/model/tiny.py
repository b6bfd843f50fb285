"""Tiny built-in vision encoder and causal LM: random init, CPU-fast, for tests and the demo."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """Pre-norm transformer block; ``causal`` for the LM, bidirectional for the vision encoder."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        # x: [b, l, dim]; allowed: optional [b, 1, l, l] bool (replaces the plain causal mask)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        causal = self.causal and allowed is None
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)
        x = x + self.proj(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class TinyVisionEncoder(nn.Module):
    """Patch embedding + a few transformer blocks: [n, 3, H, W] -> [n, patches, dim]."""

    def __init__(
        self, *, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 8, image_size: int = 32
    ) -> None:
        super().__init__()
        self.dim, self.image_size = dim, image_size
        self.patchify = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn((image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)
        x = x + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TinyCausalLM(nn.Module):
    """A small GPT: ``layers`` is the list Flamingo wraps; ``run`` returns (logits, last hidden)."""

    def __init__(
        self, *, vocab_size: int, dim: int = 64, depth: int = 4, heads: int = 4, max_len: int = 512
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_positions = max_len  # longer sequences have no position embedding
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, heads, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed

    def run(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding (mask 0) is never attended to and does not shift positions: left-padded prompts
        give the same outputs as unpadded ones (what batched few-shot generation needs)."""
        length = embeds.shape[1]
        if attention_mask is None or bool(attention_mask.all()):
            x, allowed = embeds + self.pos[:length], None
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [b, l]
            x, allowed = embeds + self.pos[positions], padded_causal_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, allowed)
        hidden = self.norm(x)
        return hidden @ self.embed.weight.T, hidden


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, l] 0/1 -> [b, 1, l, l] bool: causal, no padding keys; each token always sees itself (no NaN)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool().unsqueeze(1)  # [b, l, l]
    return (allowed | torch.eye(length, dtype=torch.bool, device=allowed.device)).unsqueeze(1)
