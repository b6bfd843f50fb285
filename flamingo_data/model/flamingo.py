"""Flamingo: frozen vision encoder -> Perceiver resampler -> gated cross-attention inside a frozen LM.

Only the resampler, the cross-attention blocks and the embeddings/logits of the tokens Flamingo adds
(``<image>``, ``<|endofchunk|>``, pad) train. With every gate at 0 the model is exactly the bare LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from flamingo_data.errors import InputError
from flamingo_data.model.blocks import GatedCrossAttentionBlock, PerceiverResampler


@dataclass
class FlamingoConfig:
    """Architecture; ``vision``/``lm`` name the encoders: "tiny", "hf:<path>", "open_clip:<arch>:<weights>"."""

    vision: str = "tiny"
    lm: str = "tiny"
    image_size: int = 32
    vision_dim: int = 64
    lm_dim: int = 64
    lm_depth: int = 4
    heads: int = 4
    cross_attn_every_n_layers: int = 1
    resampler_depth: int = 2
    num_latents: int = 8
    xattn_heads: int = 4
    dim_head: int = 16
    gradient_checkpointing: bool = False


@dataclass
class FlamingoOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class FlamingoLayer(nn.Module):
    """Wraps one LM decoder layer: gated cross-attention first (if any), then the frozen layer."""

    def __init__(self, decoder_layer: nn.Module, xattn: GatedCrossAttentionBlock | None) -> None:
        super().__init__()
        self.decoder_layer, self.xattn = decoder_layer, xattn
        self.media: torch.Tensor | None = None
        self.media_locations: torch.Tensor | None = None
        self.checkpointing = False

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        if self.checkpointing and self.training:
            return checkpoint(
                self._inner,
                hidden,
                self.media,
                self.media_locations,
                *args,
                use_reentrant=False,
                **kwargs,
            )
        return self._inner(hidden, self.media, self.media_locations, *args, **kwargs)

    def _inner(self, hidden, media, media_locations, *args, **kwargs):
        if self.xattn is not None and media is not None:
            hidden = self.xattn(hidden, media, media_locations)
        return self.decoder_layer(hidden, *args, **kwargs)


class AddedTokens(nn.Module):
    """Trainable embeddings and output logits for the tokens added after the LM's own vocabulary.

    ``base_size`` is the LM's vocabulary, not its embedding rows: many LMs pad the table (NeoX: 50304
    rows for 50277 tokens) and Flamingo's tokens must get their own trainable rows, not a padding row.
    With ``tied`` (an LM whose logits come from its input table) a token's output row is its input
    row, as in open_flamingo's resized table; otherwise ``head`` holds the output rows.
    """

    def __init__(self, base: nn.Embedding, base_size: int, n_new: int, tied: bool = False) -> None:
        super().__init__()
        if not 0 < base_size <= base.num_embeddings or n_new < 0:
            raise InputError(
                f"vocabulary of {base_size} + {n_new} new tokens does not fit an LM embedding"
                f" of {base.num_embeddings} rows"
            )
        self.base_size = base_size
        self.base = base
        self.embed = nn.Parameter(
            base.weight.detach()[:base_size].mean(0, keepdim=True).repeat(n_new, 1).clone()
        )
        self.head = None if tied else nn.Parameter(torch.randn(n_new, base.embedding_dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_size
        out = self.base(ids.clamp(max=self.base_size - 1))
        new = self.embed[(ids - self.base_size).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.embed if self.head is None else self.head
        return hidden @ rows.to(hidden.dtype).T


class Flamingo(nn.Module):
    """``forward(vision_x [b,t,f,3,h,w], lang_x [b,l], attention_mask, labels)`` -> logits (+ loss)."""

    def __init__(
        self,
        vision: nn.Module,
        lm: nn.Module,
        *,
        config: FlamingoConfig,
        media_token_id: int,
        vocab_size: int,
        base_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config, self.media_token_id = config, media_token_id
        self.vision, self.lm = vision, lm
        for param in [*vision.parameters(), *lm.parameters()]:
            param.requires_grad_(False)
        base = lm.input_embeddings()
        base_size = base.num_embeddings if base_vocab_size is None else base_vocab_size
        tied = getattr(lm, "tied_embeddings", False)
        self.tokens = AddedTokens(base, base_size, vocab_size - base_size, tied)
        self.resampler = PerceiverResampler(
            dim=vision.dim,
            depth=config.resampler_depth,
            heads=config.xattn_heads,
            dim_head=config.dim_head,
            num_latents=config.num_latents,
        )
        self.flamingo_layers = self._wrap_layers(lm)
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    def _wrap_layers(self, lm: nn.Module) -> list[FlamingoLayer]:
        """Cross-attention before LM blocks n-1, 2n-1, ... (open_flamingo's placement: with n = 4,
        OpenFlamingo-9B's, the last block gets one, the first does not)."""
        wrapped = []
        for i, layer in enumerate(lm.layers):
            xattn = None
            if (i + 1) % self.config.cross_attn_every_n_layers == 0:
                xattn = GatedCrossAttentionBlock(
                    dim=self.lm.dim,
                    dim_visual=self.vision.dim,
                    heads=self.config.xattn_heads,
                    dim_head=self.config.dim_head,
                )
            lm.layers[i] = FlamingoLayer(layer, xattn)
            wrapped.append(lm.layers[i])
        return wrapped

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for layer in self.flamingo_layers:
            layer.checkpointing = enabled

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def encode_vision(self, vision_x: torch.Tensor) -> torch.Tensor:
        b, t, f = vision_x.shape[:3]
        with torch.no_grad():
            features = self.vision(vision_x.flatten(0, 2))  # [b*t*f, n, dv]
        return self.resampler(features.view(b, t, f, *features.shape[1:]))

    def forward(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> FlamingoOutput:
        media = self.encode_vision(vision_x)
        for layer in self.flamingo_layers:
            layer.media, layer.media_locations = media, lang_x == self.media_token_id
        try:
            base_logits, hidden = self.lm.run(self.tokens(lang_x), attention_mask)
        finally:
            for layer in self.flamingo_layers:
                layer.media = layer.media_locations = None
        base_logits = base_logits[..., : self.tokens.base_size]  # drop padded embedding rows
        logits = torch.cat((base_logits, self.tokens.logits(hidden)), dim=-1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return FlamingoOutput(logits, loss)

    @torch.no_grad()
    def generate(
        self,
        vision_x: torch.Tensor,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of few-shot prompts; returns prompt + new tokens.

        Prompts of different lengths must be left-padded (mask 0 on the padding) so that every row's
        next token is read at the last position.
        """
        ids = lang_x
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
        if not bool(mask[:, -1].all()):
            raise InputError(
                "generate needs left-padded prompts (mask 0 before each prompt, never after it):"
                " a right-padded row would be continued after its padding"
            )
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self(vision_x, ids, mask).logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_id = logits.argmax(-1)
            if eos_token_id is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos_token_id), next_id)
                done |= next_id == eos_token_id
            ids = torch.cat((ids, next_id.unsqueeze(-1)), dim=-1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=-1)
            if eos_token_id is not None and bool(done.all()):
                break
        return ids
