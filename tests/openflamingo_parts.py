"""open_flamingo's own model, built offline, and the parts both models share in the interop tests.

open_flamingo's package ``__init__`` imports its ``factory``, which imports ``open_clip`` at module
level; only ``create_model_and_transforms`` uses it. ``import_open_flamingo`` imports the model code
with a stub ``open_clip`` in ``sys.modules`` for the import alone, and builds ``Flamingo`` the way
``create_model_and_transforms`` does after open_clip has made the vision tower.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from flamingo_data.model.adapters import HFCausalLM, OpenClipVisionEncoder
from flamingo_data.model.flamingo import Flamingo
from flamingo_data.model.openflamingo import model_config

# the built-in tokenizer: 257 ids of its own, then <image> 257, <|endofchunk|> 258, <PAD> 259
IMAGE_ID, EOC_ID, PAD_ID, VOCAB = 257, 258, 259, 260
IMAGE_SIZE, VISION_WIDTH = 32, 48

# tiny random LMs of the families OpenFlamingo's releases use; NeoX's table is padded past the
# tokenizer as RedPajama-INCITE's is (50432 rows for 50277 tokens)
LM_CONFIGS = {
    "mpt": lambda: transformers.MptConfig(
        d_model=32, n_heads=4, n_layers=4, vocab_size=257, max_seq_len=128
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=4,
        intermediate_size=64,
        vocab_size=300,
        max_position_embeddings=128,
    ),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=64,
        vocab_size=257,
        max_position_embeddings=128,
    ),
}
LAYERS_ATTR = {"mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers", "llama": "model.layers"}


def import_open_flamingo() -> types.SimpleNamespace:
    """open_flamingo 2.0.1's Flamingo, FlamingoLMMixin and extend_instance (no open_clip needed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))
        if importlib.util.find_spec("wandb") is None:  # train_utils imports it, never used here
            patch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
        from open_flamingo.src.flamingo import Flamingo as OFFlamingo
        from open_flamingo.src.flamingo_lm import FlamingoLMMixin
        from open_flamingo.src.utils import extend_instance
        from open_flamingo.train.train_utils import filter_state_dict_to_trainable
    return types.SimpleNamespace(
        Flamingo=OFFlamingo,
        FlamingoLMMixin=FlamingoLMMixin,
        extend_instance=extend_instance,
        filter_state_dict_to_trainable=filter_state_dict_to_trainable,
    )


def make_lm(family: str, seed: int = 0) -> nn.Module:
    """The same random LM for the same seed: each model gets its own copy."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(LM_CONFIGS[family]()).eval()


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenClipShapedViT(nn.Module):
    """open_clip 2.20's ``VisionTransformer`` (class-token pooling, OpenAI's QuickGELU), its forward
    step by step: ``visual(x) -> (pooled, tokens)`` with ``output_tokens``; the tokens are the
    patch tokens of the last block, before ``ln_post`` (which only the pooled token gets)."""

    def __init__(
        self, *, width: int = VISION_WIDTH, layers: int = 2, heads: int = 4, patch: int = 8
    ) -> None:
        super().__init__()
        self.image_size, self.output_tokens = (IMAGE_SIZE, IMAGE_SIZE), False
        grid = IMAGE_SIZE // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.proj = nn.Parameter(torch.randn(width, 16) * 0.1)

    def forward(self, x: torch.Tensor):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x).permute(1, 0, 2)
        pooled, tokens = self.ln_post(x[:, 0]) @ self.proj, x[:, 1:]
        return (pooled, tokens) if self.output_tokens else pooled


def vit_from_hf_clip(clip: nn.Module) -> OpenClipShapedViT:
    """An open_clip-shaped tower holding a Hugging Face CLIPVisionModel's weights (the mapping
    open_clip's and HF's conversion scripts use: q, k, v stacked into ``in_proj``)."""
    config = clip.config
    vit = OpenClipShapedViT(
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        patch=config.patch_size,
    )
    hf = getattr(clip, "vision_model", clip)  # transformers 5 flattens CLIPVisionModel
    with torch.no_grad():
        vit.conv1.weight.copy_(hf.embeddings.patch_embedding.weight)
        vit.class_embedding.copy_(hf.embeddings.class_embedding)
        vit.positional_embedding.copy_(hf.embeddings.position_embedding.weight)
        vit.ln_pre.load_state_dict(hf.pre_layrnorm.state_dict())
        vit.ln_post.load_state_dict(hf.post_layernorm.state_dict())
        for block, layer in zip(vit.transformer.resblocks, hf.encoder.layers, strict=True):
            attn = layer.self_attn
            for part in ("weight", "bias"):
                stacked = [getattr(getattr(attn, p), part) for p in ("q_proj", "k_proj", "v_proj")]
                getattr(block.attn, f"in_proj_{part}").copy_(torch.cat(stacked))
            block.attn.out_proj.load_state_dict(attn.out_proj.state_dict())
            block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
            block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
            block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
            block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
    return vit.eval()


def tiny_hf_clip() -> nn.Module:
    config = transformers.CLIPVisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=VISION_WIDTH * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    return transformers.CLIPVisionModel(config).eval()


def build_open_flamingo(
    of: Any,
    family: str,
    vit: nn.Module,
    every: int,
    seed: int = 0,
    lm: nn.Module | None = None,
    tokens: tuple[int, int, int] = (EOC_ID, IMAGE_ID, VOCAB),
):
    """open_flamingo's Flamingo as ``create_model_and_transforms`` makes it, around ``vit`` and
    ``lm`` (default: ``make_lm(family, seed)``); ``tokens``: the eoc and image ids, the vocabulary."""
    lm = make_lm(family, seed) if lm is None else lm
    eoc_id, image_id, vocab = tokens
    vit.output_tokens = True  # create_model_and_transforms sets it on open_clip's tower
    of.extend_instance(lm, of.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(LAYERS_ATTR[family])
    lm.resize_token_embeddings(vocab)
    model = of.Flamingo(
        types.SimpleNamespace(visual=vit),
        lm,
        eoc_id,
        image_id,
        vis_dim=vit.transformer.width,
        cross_attn_every_n_layers=every,
    )
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model.eval()


def build_ours(family: str, vit: nn.Module, every: int, seed: int = 0) -> Flamingo:
    """Our Flamingo around the same LM weights (its own copy) and the same vision tower."""
    config = model_config(lm=f"hf:{family}", vision="open_clip", cross_attn_every_n_layers=every)
    return Flamingo(
        OpenClipVisionEncoder(vit),
        HFCausalLM(make_lm(family, seed)),
        config=config,
        media_token_id=IMAGE_ID,
        vocab_size=VOCAB,
        base_vocab_size=257,
    ).eval()


def randomize_trainable(model: nn.Module, seed: int) -> None:
    """Every trainable weight random, gates open: nothing matches by being zero or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = 1.0 if name.endswith("_gate") else 0.2
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def published_checkpoint(of_model: nn.Module) -> dict[str, torch.Tensor]:
    """What open_flamingo's checkpoint.pt holds: its own ``filter_state_dict_to_trainable`` over
    its model's state dict (trainable weights and every weight named "embed", without the aliases
    it registers twice or the vision tower)."""
    of = import_open_flamingo()
    state = of.filter_state_dict_to_trainable(of_model, of_model.state_dict())
    return {key: value.clone() for key, value in state.items()}


def batch(seed: int = 0, tokenizer=None) -> dict[str, torch.Tensor]:
    """Three samples with 3, 1 and 2 images, text before the first image, right padding."""
    from flamingo_data.loader import make_tokenizer

    tokenizer = make_tokenizer(None) if tokenizer is None else tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    texts = [
        "Look: <image>a red cat<|endofchunk|>then <image>a dog<|endofchunk|><image>a bird",
        "A long caption before its only image <image>: a boat on the sea<|endofchunk|>",
        "<image>two<|endofchunk|>words <image>and more text here",
    ]
    encoded = tokenizer(
        texts, max_length=96, padding="longest", truncation=True, return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == image_id, -100)
    generator = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(3, 3, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    vision_x[1, 1:] = 0  # padding images of the one-image sample
    vision_x[2, 2:] = 0
    return {"vision_x": vision_x, "lang_x": ids, "attention_mask": mask, "labels": labels}


def few_shot_prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two two-image few-shot prompts of different lengths, left-padded: (vision_x, ids, mask)."""
    from flamingo_data.loader import make_tokenizer

    tokenizer = make_tokenizer(None)
    rows = [
        tokenizer.encode("<image>An image of a cat.<|endofchunk|><image>An image of"),
        tokenizer.encode("<image>A dog.<|endofchunk|><image>A"),
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in rows])).long()
    generator = torch.Generator().manual_seed(5)
    vision_x = torch.randn(2, 2, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return vision_x, ids, mask
