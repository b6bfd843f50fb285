"""Adapters for Hugging Face and open_clip models (optional extras, imported only when asked for)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from flamingo_data.errors import InputError, import_extra

_LAYER_PATHS = (
    "transformer.h",
    "model.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
)


def _find(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class HFCausalLM(nn.Module):
    """Any Hugging Face decoder whose blocks sit in a ModuleList (GPT-2, Llama, NeoX, OPT, MPT...).

    ``source`` is a local path (weights loaded with local_files_only) or a model instance.
    """

    def __init__(self, source) -> None:
        super().__init__()
        if isinstance(source, str):
            transformers = import_extra("transformers", f"language model {source!r}", "hf")
            source = transformers.AutoModelForCausalLM.from_pretrained(
                source, local_files_only=True
            )
        self.model = source
        self.dim = (
            source.config.hidden_size
            if hasattr(source.config, "hidden_size")
            else source.config.n_embd
        )
        config = source.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )
        for path in _LAYER_PATHS:
            if (layers := _find(source, path)) is not None:
                self.layers, self.layers_path = layers, path
                break
        else:
            raise InputError(f"cannot find the decoder layers of {type(source).__name__}")
        self.takes_positions = "position_ids" in inspect.signature(source.forward).parameters

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_embeddings(self) -> nn.Module | None:
        """The output projection, or None where the model computes logits from its input table."""
        return self.model.get_output_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        """Logits come from the input table (GPT-2, MPT, OPT), so added tokens share one row too."""
        out = self.output_embeddings()
        return out is None or out.weight is self.input_embeddings().weight

    def run(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Positions count only unmasked tokens, so a left-padded prompt reads as the prompt alone:
        HF models number positions 0..l-1 when given none, which moves GPT-2's absolute ones.
        Masked tokens keep their index, as they have when no positions are given."""
        extra = {}
        if attention_mask is not None and self.takes_positions:
            counted = attention_mask.long().cumsum(-1) - 1
            index = torch.arange(counted.shape[-1], device=counted.device).expand_as(counted)
            extra["position_ids"] = torch.where(attention_mask.bool(), counted, index)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **extra,
        )
        return out.logits, out.hidden_states[-1]


class HFVisionEncoder(nn.Module):
    """A Hugging Face ``CLIPVisionModel`` (path or instance): the last layer's patch tokens, without
    the class token and the final LayerNorm: what open_clip's ``visual(x)[1]`` gives open_flamingo
    under open_clip 2.16-2.22, which OpenFlamingo's released models were trained with."""

    def __init__(self, source) -> None:
        super().__init__()
        if isinstance(source, str):
            transformers = import_extra("transformers", f"vision encoder {source!r}", "hf")
            source = transformers.CLIPVisionModel.from_pretrained(source, local_files_only=True)
        self.model = source
        self.dim = source.config.hidden_size
        self.image_size = source.config.image_size  # its position embeddings fit this size only

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state[:, 1:]


class OpenClipVisionEncoder(nn.Module):
    """An open_clip vision tower's tokens, ``visual(x)[1]`` with ``output_tokens``: open_flamingo's
    own call, so both models get the same features from the same open_clip."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.dim = visual.transformer.width
        size = getattr(visual, "image_size", None)  # open_clip's ViTs keep (h, w)
        self.image_size = size[0] if isinstance(size, tuple | list) else size

    @classmethod
    def load(cls, arch: str, weights: str) -> OpenClipVisionEncoder:
        """``arch`` with weights from a local file (``pip install flamingo-data[openclip]``)."""
        open_clip = import_extra("open_clip", f"vision encoder open_clip:{arch}", "openclip")
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=weights)
        return cls(model.visual)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)[1]
