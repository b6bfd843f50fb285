"""Build a Flamingo from named encoders: tiny built-ins, Hugging Face, or open_clip (optional extras)."""

from __future__ import annotations

from torch import nn

from flamingo_data.errors import InputError
from flamingo_data.loader.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from flamingo_data.model.flamingo import Flamingo, FlamingoConfig
from flamingo_data.model.tiny import TinyCausalLM, TinyVisionEncoder


def build_flamingo(config: FlamingoConfig, tokenizer) -> Flamingo:
    """Encoders by name; weights come only from the user's disk (``local_files_only``)."""
    vision = build_vision(config)
    lm = build_lm(config, tokenizer)
    return Flamingo(
        vision,
        lm,
        config=config,
        media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vocab_size=len(tokenizer),
        base_vocab_size=min(base_vocab_size(tokenizer), lm.input_embeddings().num_embeddings),
    )


def base_vocab_size(tokenizer) -> int:
    """The LM's own vocabulary: ids below the first token Flamingo added (they are appended last)."""
    return min(tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, EOC_TOKEN))


def build_vision(config: FlamingoConfig) -> nn.Module:
    if config.vision == "tiny":
        return TinyVisionEncoder(
            dim=config.vision_dim, image_size=config.image_size, heads=config.heads
        )
    if config.vision.startswith("hf:"):
        from flamingo_data.model.adapters import HFVisionEncoder

        return HFVisionEncoder(config.vision[3:])
    if config.vision.startswith("open_clip:"):
        from flamingo_data.model.adapters import OpenClipVisionEncoder

        _, arch, weights = config.vision.split(":", 2)
        return OpenClipVisionEncoder.load(arch, weights)
    raise InputError(
        f"unknown vision encoder {config.vision!r}: use tiny, hf:<path> or open_clip:<arch>:<weights>"
    )


def build_lm(config: FlamingoConfig, tokenizer) -> nn.Module:
    if config.lm == "tiny":
        return TinyCausalLM(
            vocab_size=base_vocab_size(tokenizer),
            dim=config.lm_dim,
            depth=config.lm_depth,
            heads=config.heads,
        )
    if config.lm.startswith("hf:"):
        from flamingo_data.model.adapters import HFCausalLM

        return HFCausalLM(config.lm[3:])
    raise InputError(f"unknown language model {config.lm!r}: use tiny or hf:<path>")
