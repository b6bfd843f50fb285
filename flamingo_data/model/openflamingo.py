"""OpenFlamingo checkpoints (open_flamingo 2.0.1's ``checkpoint.pt``) into and out of the packaged model.

Such a checkpoint is a state dict of open_flamingo's ``Flamingo``: the perceiver, the gated
cross-attention layers and the LM's resized embedding tables; the vision tower and the LM's own layers
come from local files. Every key maps to exactly one weight here, both ways (``openflamingo_slots``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flamingo_data.errors import InputError
from flamingo_data.model.flamingo import Flamingo, FlamingoConfig

# open_flamingo builds PerceiverResampler(dim=vis_dim) and GatedCrossAttentionBlock(dim, dim_visual)
# with their defaults: these sizes, fixed.
OPEN_FLAMINGO_SIZES = {"resampler_depth": 6, "num_latents": 64, "xattn_heads": 8, "dim_head": 64}

# open_flamingo's decoder-layer attribute per LM family (factory.py's table)
LM_FAMILIES = {
    "transformer.blocks": "MPT",
    "gpt_neox.layers": "GPT-NeoX",
    "model.layers": "Llama",
    "model.decoder.layers": "OPT",
    "transformer.h": "GPT-J",
}
# GPT-NeoX's output table is `embed_out` in transformers 4 (OpenFlamingo-4B's checkpoints) and
# `lm_head` in transformers 5: either name loads, and exports carry both
RENAMED_OUTPUT = {
    "gpt_neox.layers": ("lang_encoder.embed_out.weight", "lang_encoder.lm_head.weight")
}
XATTN_KEY = re.compile(r"lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.(.+)")


def model_config(**fields) -> FlamingoConfig:
    """A FlamingoConfig with open_flamingo's resampler and cross-attention sizes for a Hugging Face
    LM (so its weights export to open_flamingo), the small defaults for the tiny one."""
    sizes = OPEN_FLAMINGO_SIZES if str(fields.get("lm", "tiny")).startswith("hf:") else {}
    return FlamingoConfig(**{**sizes, **fields})


@dataclass(frozen=True)
class Slot:
    """One open_flamingo key and the weight it is here: ``param``, or for an embedding table the
    LM's own rows (``base``, the first ``base_size``) followed by the added tokens' ``param``."""

    key: str
    ours: str
    param: torch.Tensor
    base: torch.Tensor | None = None
    base_size: int = 0
    optional: bool = False
    alias_of: str | None = None  # a tied output table: must equal that key's table, loads nothing

    def shape(self) -> tuple[int, ...]:
        if self.alias_of is not None:
            return ()
        if self.base is None:
            return tuple(self.param.shape)
        return (self.base_size + self.param.shape[0], self.param.shape[1])


def openflamingo_slots(model: Flamingo) -> dict[str, Slot]:
    """open_flamingo key -> Slot, for every weight an OpenFlamingo checkpoint holds."""
    lm = model.lm
    if not hasattr(lm, "layers_path"):
        raise InputError(
            f"OpenFlamingo checkpoints fit a Hugging Face `lm` (hf:<path>), not {model.config.lm!r}"
        )
    slots = {}
    for name, param in model.resampler.named_parameters():
        slots[f"perceiver.{name}"] = Slot(f"perceiver.{name}", f"resampler.{name}", param)
    for i, layer in enumerate(model.flamingo_layers):
        for name, param in layer.xattn.named_parameters() if layer.xattn is not None else ():
            key = f"lang_encoder.{lm.layers_path}.{i}.gated_cross_attn_layer.{name}"
            slots[key] = Slot(key, f"lm.layers.{i}.xattn.{name}", param)
    tokens = model.tokens
    table = lm.input_embeddings()
    key = f"lang_encoder.{module_path(lm.model, table)}.weight"
    slots[key] = Slot(key, "tokens.embed", tokens.embed, table.weight, tokens.base_size)
    input_key, out = key, lm.output_embeddings()
    if out is not None:
        key = f"lang_encoder.{module_path(lm.model, out)}.weight"
        # open_flamingo saves a frozen output table only when its name holds "embed" (NeoX's);
        # a tied one (transformers' MPT) is saved under its second name too
        if tokens.head is None:
            slots[key] = Slot(key, "tokens.embed", tokens.embed, out.weight, 0, True, input_key)
        else:
            slots[key] = Slot(key, "tokens.head", tokens.head, out.weight, tokens.base_size, True)
    return slots


def module_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def load_openflamingo_checkpoint(model: Flamingo, path: str | Path) -> list[str]:
    """Load an OpenFlamingo ``checkpoint.pt`` into ``model`` (built over the same local vision tower,
    LM and tokenizer, with ``model_config``'s sizes); returns notes on what it did not hold.

    Every key must map to a weight here with the same shape, and every required weight must be
    there: anything else is one InputError naming the key, and nothing is loaded."""
    return load_openflamingo_state(model, read_openflamingo_checkpoint(path))


def read_openflamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a published checkpoint, or of open_flamingo's training checkpoints
    (``model_state_dict``, with DDP's ``module.`` prefixes), loaded with ``weights_only``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"OpenFlamingo checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises several kinds for a file that is not a checkpoint
        raise InputError(f"{path} is not a torch checkpoint: {str(exc).splitlines()[0]}") from None
    if isinstance(saved, dict) and "model_state_dict" in saved:
        saved = saved["model_state_dict"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise InputError(f"{path} holds no state dict of tensors")
    return {key.removeprefix("module."): value for key, value in saved.items()}


def load_openflamingo_state(model: Flamingo, state: dict[str, torch.Tensor]) -> list[str]:
    """``load_openflamingo_checkpoint`` for a state dict already read."""
    slots = openflamingo_slots(model)
    state = with_output_name(state, model, slots)
    for key in state:
        if key not in slots:
            raise InputError(unknown_key_message(key, model, state))
    for key, slot in slots.items():
        if key not in state and not slot.optional:
            raise InputError(missing_key_message(key, model, state))
        if key in state and slot.alias_of is not None:
            if not torch.equal(state[key], state.get(slot.alias_of, state[key])):
                raise InputError(
                    f"`{key}` differs from `{slot.alias_of}`, the table the LM ties it to:"
                    " this LM cannot hold both"
                )
        elif key in state and tuple(state[key].shape) != slot.shape():
            raise InputError(
                f"`{key}` has shape {tuple(state[key].shape)} in the checkpoint and {slot.shape()}"
                f" here ({slot.ours}): {shape_hint(slot)}"
            )
    notes = []
    with torch.no_grad():
        for key, slot in slots.items():
            if slot.alias_of is not None:
                continue
            if key not in state:
                notes.append(
                    f"`{key}` is not in the checkpoint (open_flamingo saves no frozen output layer):"
                    f" the added tokens' output rows ({slot.ours}) keep their initial values"
                )
                continue
            value = state[key].to(slot.param.dtype)
            if slot.base is None:
                slot.param.copy_(value)
            else:
                slot.base[: slot.base_size].copy_(value[: slot.base_size])
                slot.param.copy_(value[slot.base_size :])
    return notes


def with_output_name(
    state: dict[str, torch.Tensor], model: Flamingo, slots: dict[str, Slot]
) -> dict[str, torch.Tensor]:
    """``state`` with a renamed output table under this transformers' name for it."""
    names = RENAMED_OUTPUT.get(getattr(model.lm, "layers_path", ""))
    if names is None:
        return state
    theirs, ours = names if names[1] in slots else names[::-1]
    if theirs not in state or ours in state:
        return state
    return {ours if key == theirs else key: value for key, value in state.items()}


def shape_hint(slot: Slot) -> str:
    if slot.base is not None:
        return (
            "the tokenizer (its tokens plus <|endofchunk|>, <image> and a pad token) and the LM"
            " must be the ones the checkpoint was trained with"
        )
    return "the vision tower and the LM must be the ones the checkpoint was trained with"


def xattn_layers(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(2)) for k in state if (m := XATTN_KEY.fullmatch(k))})


def every_n_hint(model: Flamingo, state: dict[str, torch.Tensor]) -> str:
    layers = xattn_layers(state)
    saved = f"{layers[0] + 1}" if layers else "another value"
    every = model.config.cross_attn_every_n_layers
    return (
        f"`cross_attn_every_n_layers` is {every} here and the checkpoint was trained with {saved}"
    )


def unknown_key_message(key: str, model: Flamingo, state: dict[str, torch.Tensor]) -> str:
    ours = model.lm.layers_path
    match = XATTN_KEY.fullmatch(key)
    if match and match.group(1) == ours:
        layer = int(match.group(2))
        if layer >= len(model.flamingo_layers):
            return (
                f"`{key}` is for LM layer {layer} and `lm` has {len(model.flamingo_layers)}"
                " layers: load the checkpoint over the LM it was trained with"
            )
        return f"`{key}` has no gated cross-attention here: {every_n_hint(model, state)}"
    layer_paths = sorted({m.group(1) for k in state if (m := XATTN_KEY.fullmatch(k))})
    if key.startswith("lang_encoder.") and layer_paths and ours not in layer_paths:
        theirs = layer_paths[0]
        return (
            f"`{key}` is for a {LM_FAMILIES.get(theirs, 'other')} LM (layers `{theirs}`) and"
            f" `lm` is a {LM_FAMILIES.get(ours, ours)} one (layers `{ours}`): load the checkpoint"
            " over the LM it was trained with"
        )
    return (
        f"`{key}` maps to no weight of this model (an OpenFlamingo checkpoint holds perceiver.*,"
        " lang_encoder.<layers>.<i>.gated_cross_attn_layer.* and the LM's embedding tables)"
    )


def missing_key_message(key: str, model: Flamingo, state: dict[str, torch.Tensor]) -> str:
    if XATTN_KEY.fullmatch(key) and xattn_layers(state):
        return f"the checkpoint lacks `{key}`: {every_n_hint(model, state)}"
    return f"the checkpoint lacks `{key}`: it is not an OpenFlamingo checkpoint for this LM"


def check_openflamingo_sizes(model: Flamingo) -> None:
    """Refuse a model whose resampler or cross-attention open_flamingo cannot build."""
    differ = {
        name: getattr(model.config, name)
        for name, size in OPEN_FLAMINGO_SIZES.items()
        if getattr(model.config, name) != size
    }
    if differ:
        have = ", ".join(f"`{name}` {value}" for name, value in differ.items())
        want = ", ".join(f"{OPEN_FLAMINGO_SIZES[name]}" for name in differ)
        raise InputError(
            f"open_flamingo builds its model with other sizes: {have} here, {want} there"
            " (models with a Hugging Face `lm` are built with open_flamingo's sizes)"
        )


def openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """This model's weights under open_flamingo's keys: what its ``load_state_dict`` takes."""
    slots = openflamingo_slots(model)
    check_openflamingo_sizes(model)
    state = {}
    for key, slot in slots.items():
        if slot.alias_of is not None:
            continue
        value = slot.param.detach()
        if slot.base is not None:
            value = torch.cat((slot.base.detach()[: slot.base_size], value.to(slot.base.dtype)))
        state[key] = value.clone().cpu()
    names = RENAMED_OUTPUT.get(model.lm.layers_path, ())
    if present := [name for name in names if name in state]:
        state.update((name, state[present[0]]) for name in names)
    return state


def save_openflamingo_checkpoint(model: Flamingo, out: str | Path) -> Path:
    """Write ``openflamingo_state_dict(model)`` as an OpenFlamingo ``checkpoint.pt`` at ``out``."""
    out = Path(out)
    state = openflamingo_state_dict(model)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out
