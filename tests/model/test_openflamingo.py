"""OpenFlamingo interop, proven against open_flamingo 2.0.1's own model code: its weights in ours give
the same logits, loss and greedy tokens, and ours exported give the same again in its model."""

from __future__ import annotations

import pytest
import torch

from flamingo_data.errors import InputError
from flamingo_data.model.adapters import HFVisionEncoder
from flamingo_data.model.openflamingo import (
    load_openflamingo_checkpoint,
    load_openflamingo_state,
    save_openflamingo_checkpoint,
)
from tests.openflamingo_parts import (
    EOC_ID,
    IMAGE_ID,
    PAD_ID,
    OpenClipShapedViT,
    batch,
    build_open_flamingo,
    build_ours,
    few_shot_prompts,
    import_open_flamingo,
    published_checkpoint,
    randomize_trainable,
    tiny_hf_clip,
    vit_from_hf_clip,
)

FAMILIES = ("mpt", "gpt_neox", "llama")
TOLERANCE = 1e-5
EVERY = 2  # cross-attention before layers 1 and 3 of the four


@pytest.fixture(scope="module")
def of():
    return import_open_flamingo()


def vision_tower(seed: int = 1) -> OpenClipShapedViT:
    torch.manual_seed(seed)
    return OpenClipShapedViT().eval()


def open_flamingo_with_weights(of, family: str, vit, seed: int = 7):
    model = build_open_flamingo(of, family, vit, EVERY)
    randomize_trainable(model, seed)
    return model


def full_checkpoint(of_model) -> dict[str, torch.Tensor]:
    """The published keys plus the LM's output table where open_flamingo leaves it out (Llama's
    frozen lm_head): every weight that decides open_flamingo's logits outside the LM's layers."""
    state = published_checkpoint(of_model)
    out = of_model.lang_encoder.get_output_embeddings()
    name = next(n for n, m in of_model.lang_encoder.named_modules() if m is out)
    state.setdefault(f"lang_encoder.{name}.weight", out.weight.detach().clone())
    return state


def compare(ours, theirs, data) -> tuple[float, float]:
    """(max |logit difference| over every position, |loss difference|) on one batch."""
    with torch.no_grad():
        mine = ours(data["vision_x"], data["lang_x"], data["attention_mask"], data["labels"])
        other = theirs(
            data["vision_x"], data["lang_x"], data["attention_mask"], labels=data["labels"]
        )
    assert mine.logits.shape == other.logits.shape
    return (
        (mine.logits - other.logits).abs().max().item(),
        (mine.loss - other.loss).abs().item(),
    )


def until_eos(row: list[int]) -> list[int]:
    return row[: row.index(EOC_ID) + 1] if EOC_ID in row else row


@pytest.mark.parametrize("family", FAMILIES)
def test_open_flamingo_weights_in_our_model_give_the_same_logits_loss_and_tokens(
    of, family: str, tmp_path
) -> None:
    vit = vision_tower()
    theirs = open_flamingo_with_weights(of, family, vit)
    torch.save(full_checkpoint(theirs), tmp_path / "checkpoint.pt")
    ours = build_ours(family, vit, EVERY)
    assert load_openflamingo_checkpoint(ours, tmp_path / "checkpoint.pt") == []
    data = batch()
    logits_diff, loss_diff = compare(ours, theirs, data)
    print(f"{family} import: max |logit diff| {logits_diff:.2e}, |loss diff| {loss_diff:.2e}")
    assert logits_diff <= TOLERANCE and loss_diff <= TOLERANCE
    # the images matter: other pictures move the logits far past the tolerance
    moved = dict(data, vision_x=data["vision_x"].flip(0))
    with torch.no_grad():
        assert (ours(**moved).logits - theirs(**moved).logits).abs().max() <= TOLERANCE
        assert (ours(**moved).logits - ours(**data).logits).abs().max() > 100 * TOLERANCE

    vision_x, ids, mask = few_shot_prompts()
    mine = ours.generate(vision_x, ids, mask, max_new_tokens=12, eos_token_id=EOC_ID)
    other = theirs.generate(
        vision_x,
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        eos_token_id=EOC_ID,
        pad_token_id=PAD_ID,
    )
    width = ids.shape[1]
    for row_mine, row_other in zip(mine.tolist(), other.tolist(), strict=True):
        new = until_eos(row_mine[width:])
        assert new and new == until_eos(row_other[width:]), (row_mine, row_other)
        assert IMAGE_ID not in new  # an <image> mid-generation is a case the models treat apart


@pytest.mark.parametrize("family", FAMILIES)
def test_our_weights_exported_give_open_flamingo_the_same_logits(of, family, tmp_path) -> None:
    vit = vision_tower()
    ours = build_ours(family, vit, EVERY)
    randomize_trainable(ours, seed=11)
    with torch.no_grad():  # the LM's own rows too: they are keys of the checkpoint
        ours.lm.input_embeddings().weight.mul_(1.5)
    save_openflamingo_checkpoint(ours, tmp_path / "checkpoint.pt")
    theirs = build_open_flamingo(of, family, vit, EVERY)
    result = theirs.load_state_dict(torch.load(tmp_path / "checkpoint.pt"), strict=False)
    # NeoX's output table is written under transformers 4's name too, for open_flamingo there
    assert result.unexpected_keys == (
        ["lang_encoder.embed_out.weight"] if family == "gpt_neox" else []
    )
    logits_diff, loss_diff = compare(ours, theirs, batch(seed=3))
    print(f"{family} export: max |logit diff| {logits_diff:.2e}, |loss diff| {loss_diff:.2e}")
    assert logits_diff <= TOLERANCE and loss_diff <= TOLERANCE


def test_a_published_llama_checkpoint_without_its_output_table_loads_with_a_note(
    of, tmp_path
) -> None:
    """open_flamingo saves no frozen lm_head: the added tokens' output rows are not in the file."""
    vit = vision_tower()
    theirs = open_flamingo_with_weights(of, "llama", vit)
    state = published_checkpoint(theirs)
    assert "lang_encoder.lm_head.weight" not in state
    ours = build_ours("llama", vit, EVERY)
    notes = load_openflamingo_state(ours, state)
    assert len(notes) == 1 and "`lang_encoder.lm_head.weight` is not in the checkpoint" in notes[0]
    data = batch()
    with torch.no_grad():
        mine, other = ours(**data).logits, theirs(**data).logits
    assert (mine[..., :257] - other[..., :257]).abs().max() <= TOLERANCE


def test_published_mpt_checkpoint_carries_the_tied_output_table_as_an_alias(of) -> None:
    vit = vision_tower()
    theirs = open_flamingo_with_weights(of, "mpt", vit)
    state = published_checkpoint(theirs)
    assert "lang_encoder.lm_head.weight" in state  # transformers' MPT names its tied table twice
    ours = build_ours("mpt", vit, EVERY)
    assert load_openflamingo_state(ours, state) == []
    state["lang_encoder.lm_head.weight"] = state["lang_encoder.lm_head.weight"] + 1
    with pytest.raises(InputError, match="`lang_encoder.lm_head.weight` differs from"):
        load_openflamingo_state(build_ours("mpt", vit, EVERY), state)


def refusal(of, family: str, state_family: str, every: int, edit=None) -> str:
    vit = vision_tower()
    state = full_checkpoint(open_flamingo_with_weights(of, state_family, vit))
    if edit is not None:
        edit(state)
    ours = build_ours(family, vit, every)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(InputError) as caught:
        load_openflamingo_state(ours, state)
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed weights"
    return str(caught.value)


def test_a_wrong_cross_attention_spacing_is_refused_naming_the_key(of) -> None:
    fewer = refusal(of, "llama", "llama", every=4)
    assert fewer.startswith("`lang_encoder.model.layers.1.gated_cross_attn_layer.")
    assert "`cross_attn_every_n_layers` is 4 here and the checkpoint was trained with 2" in fewer
    more = refusal(of, "llama", "llama", every=1)
    assert "lacks `lang_encoder.model.layers.0.gated_cross_attn_layer." in more
    assert "`cross_attn_every_n_layers` is 1 here and the checkpoint was trained with 2" in more


def test_another_lm_family_is_refused_naming_the_key(of) -> None:
    message = refusal(of, "gpt_neox", "llama", every=EVERY)
    assert message.startswith("`lang_encoder.model.")
    assert "is for a Llama LM (layers `model.layers`) and `lm` is a GPT-NeoX one" in message


def test_unknown_keys_and_other_shapes_are_refused_naming_the_key(of) -> None:
    def extra(state):
        state["perceiver.media_time_embs"] = torch.zeros(4, 1, 48)

    assert refusal(of, "llama", "llama", EVERY, extra).startswith(
        "`perceiver.media_time_embs` maps to no weight of this model"
    )

    def fewer_rows(state):
        key = "lang_encoder.model.embed_tokens.weight"
        state[key] = state[key][:-1]

    message = refusal(of, "llama", "llama", EVERY, fewer_rows)
    assert message.startswith("`lang_encoder.model.embed_tokens.weight` has shape (259, 32)")
    assert "and (260, 32) here" in message

    def missing(state):
        del state["perceiver.latents"]

    assert "lacks `perceiver.latents`" in refusal(of, "llama", "llama", EVERY, missing)


def test_a_file_that_is_no_checkpoint_is_one_error(tmp_path) -> None:
    vit = vision_tower()
    ours = build_ours("llama", vit, EVERY)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="is not a torch checkpoint"):
        load_openflamingo_checkpoint(ours, tmp_path / "notes.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_openflamingo_checkpoint(ours, tmp_path / "missing.pt")
    torch.save({"model_state_dict": {"perceiver.x": 1}}, tmp_path / "odd.pt")
    with pytest.raises(InputError, match="holds no state dict of tensors"):
        load_openflamingo_checkpoint(ours, tmp_path / "odd.pt")


def test_a_model_with_other_sizes_is_not_exported(tmp_path) -> None:
    from flamingo_data.loader import make_tokenizer
    from flamingo_data.model import FlamingoConfig, build_flamingo

    tiny = build_flamingo(FlamingoConfig(), make_tokenizer(None))
    with pytest.raises(InputError, match="OpenFlamingo checkpoints fit a Hugging Face `lm`"):
        save_openflamingo_checkpoint(tiny, tmp_path / "checkpoint.pt")
    vit = vision_tower()
    ours = build_ours("llama", vit, EVERY)
    ours.config.resampler_depth = 2  # as a model built with FlamingoConfig's small defaults
    with pytest.raises(InputError, match="other sizes: `resampler_depth` 2 here, 6 there"):
        save_openflamingo_checkpoint(ours, tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_hugging_face_clip_feeds_the_patch_tokens_open_clip_gives_open_flamingo(tmp_path) -> None:
    """open_flamingo reads ``visual(x)[1]``: the patch tokens (no class token) before ln_post."""
    torch.manual_seed(2)
    tiny_hf_clip().save_pretrained(tmp_path / "clip")
    encoder = HFVisionEncoder(str(tmp_path / "clip")).eval()
    vit = vit_from_hf_clip(encoder.model)
    vit.output_tokens = True
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, (_, theirs) = encoder(images), vit(images)
    assert ours.shape == theirs.shape == (3, 16, 48)
    assert (ours - theirs).abs().max() <= TOLERANCE
    with torch.no_grad():
        assert (vit.ln_post(theirs) - ours).abs().max() > 0.1  # not the normed tokens


def test_open_flamingo_training_checkpoints_and_transformers_4_names_load_too(of, tmp_path) -> None:
    """open_flamingo's training checkpoints wrap the state dict, with DDP's ``module.`` prefixes."""
    vit = vision_tower()
    theirs = open_flamingo_with_weights(of, "gpt_neox", vit)
    state = full_checkpoint(theirs)
    # as OpenFlamingo-4B's checkpoints name NeoX's output table (transformers 4's name)
    state["lang_encoder.embed_out.weight"] = state.pop("lang_encoder.lm_head.weight")
    wrapped = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "checkpoint_3.pt")
    ours = build_ours("gpt_neox", vit, EVERY)
    assert load_openflamingo_checkpoint(ours, tmp_path / "checkpoint_3.pt") == []
    logits_diff, loss_diff = compare(ours, theirs, batch())
    assert logits_diff <= TOLERANCE and loss_diff <= TOLERANCE
