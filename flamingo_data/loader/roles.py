"""Which tokens a sample trains on when its record names the turn role of its text.

Converted conversations carry ``text_roles`` (interleaved: one role per sentence) or
``role_spans`` (GPT form: ``[role, start, end]`` over ``example``, in code points). Under
``loss_on="assistant"`` a token keeps its label only when one of its characters is assistant text,
and an ``<|endofchunk|>`` counts as the text it closes (so the model learns to end an answer).
Records without roles train on all their text, as under ``loss_on="all"``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from flamingo_data.loader.gpt import PLACEHOLDER
from flamingo_data.loader.interleaved import InterleavedPlan, Reject
from flamingo_data.loader.tokenizer import EOC_TOKEN, IMAGE_TOKEN

if TYPE_CHECKING:
    import torch

TRAINED_ROLE = "assistant"


class OwnedText:
    """A string and, per character, the role of the turn it came from (None: the loader's own)."""

    def __init__(self, text: str = "", owners: list[str | None] | None = None) -> None:
        self.text = text
        self.owners = owners if owners is not None else [None] * len(text)

    def append(self, piece: str, owner: str | None = None) -> None:
        self.text += piece
        self.owners += [owner] * len(piece)

    def cut(self, end: int) -> None:
        self.text, self.owners = self.text[:end], self.owners[:end]

    def sub(self, pattern: str | re.Pattern[str], new: str, count: int = 0) -> None:
        """``str.replace``/``re.sub`` on the text (leftmost, non-overlapping, ``count`` 0: all);
        where ``new`` is part of the match, those characters keep their owners."""
        found = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        text, owners, at = [], [], 0
        for n, match in enumerate(found.finditer(self.text)):
            if count and n == count:
                break
            text.append(self.text[at : match.start()])
            owners += self.owners[at : match.start()]
            kept = match.group(0).find(new)
            start = match.start() + kept
            text.append(new)
            owners += self.owners[start : start + len(new)] if kept >= 0 else [None] * len(new)
            at = match.end()
        text.append(self.text[at:])
        owners += self.owners[at:]
        self.text, self.owners = "".join(text), owners

    def own_chunk_ends(self) -> None:
        """Each ``<|endofchunk|>`` takes the owner of the last owned character before it."""
        for match in re.finditer(re.escape(EOC_TOKEN), self.text):
            before = (o for o in reversed(self.owners[: match.start()]) if o is not None)
            owner = next(before, None)
            self.owners[match.start() : match.end()] = [owner] * len(EOC_TOKEN)


def sentence_roles(record: dict[str, Any], loss_on: str) -> list[str] | None:
    """The record's ``text_roles`` when they decide its labels, else None; bad ones: Reject."""
    roles = record.get("text_roles")
    if loss_on == "all" or roles is None:
        return None
    if not (
        isinstance(roles, list)
        and len(roles) == len(record["text_list"])
        and all(isinstance(role, str) for role in roles)
    ):
        raise Reject("bad_roles")
    return roles


def is_span(span: Any) -> bool:
    """``[role, start, end]``: a role name and whole-number bounds."""
    return (
        isinstance(span, list)
        and len(span) == 3
        and isinstance(span[0], str)
        and all(isinstance(bound, int) and not isinstance(bound, bool) for bound in span[1:])
    )


def example_spans(record: dict[str, Any], loss_on: str) -> list[tuple[str, int, int]] | None:
    """The record's ``role_spans`` when they decide its labels, else None; bad ones: Reject."""
    spans = record.get("role_spans")
    if loss_on == "all" or spans is None:
        return None
    size = len(record["example"])
    if not (isinstance(spans, list) and all(is_span(span) for span in spans)):
        raise Reject("bad_roles")
    if not all(0 <= start <= end <= size for _, start, end in spans):
        raise Reject("bad_roles")
    return [(role, start, end) for role, start, end in spans]


def shift_spans(
    spans: list[tuple[str, int, int]], inserted_at: list[int]
) -> list[tuple[str, int, int]]:
    """Spans after one character was inserted before each position in ``inserted_at`` (what
    ``as_text`` does to a literal special token): a boundary moves by the insertions at or before it."""

    def moved(boundary: int) -> int:
        return boundary + sum(1 for position in inserted_at if position <= boundary)

    return [(role, moved(start), moved(end)) for role, start, end in spans]


def interleaved_owned_text(plan: InterleavedPlan, roles: list[str], eos_token: str) -> OwnedText:
    """``interleaved_text(plan, eos_token)`` with each character's sentence role."""
    placed = {placement.sentence_index for placement in plan.placements}
    text = OwnedText()
    for i, (sentence, role) in enumerate(zip(plan.sentences, roles, strict=True)):
        if i:
            text.append(" ")
        if i in placed:
            text.append(f"{EOC_TOKEN}{IMAGE_TOKEN}")
        text.append(sentence, role)
    return _joined_as_the_loader_does(text, eos_token)


def _joined_as_the_loader_does(text: OwnedText, eos_token: str) -> OwnedText:
    """The loader's clean-up of a text with its image tokens placed (``interleaved_text`` and
    ``plan_gpt`` do the same to a plain string), then the closing end-of-chunk and eos."""
    text.sub(EOC_TOKEN, "", 1)
    for old, new in ((f" {EOC_TOKEN}", EOC_TOKEN), (f"{IMAGE_TOKEN} ", IMAGE_TOKEN)):
        text.sub(old, new)
    text.sub(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    text.append(f"{EOC_TOKEN}{eos_token}")
    text.own_chunk_ends()
    return text


def owned_example(example: str, spans: list[tuple[str, int, int]]) -> OwnedText:
    owners: list[str | None] = [None] * len(example)
    for role, start, end in spans:
        owners[start:end] = [role] * (end - start)
    return OwnedText(example, owners)


def trained_tokens(offsets: torch.Tensor, text: OwnedText) -> torch.Tensor:
    """[T] bool: tokens (character ``offsets`` [T, 2] into ``text``) holding assistant text."""
    import torch

    trained = torch.tensor([owner == TRAINED_ROLE for owner in text.owners], dtype=torch.long)
    before = torch.cat((torch.zeros(1, dtype=torch.long), trained.cumsum(0)))
    starts = offsets[:, 0].clamp(0, len(text.text))
    ends = offsets[:, 1].clamp(0, len(text.text))
    return (before[ends] - before[starts]) > 0


def gpt_owned_text(
    example: str, spans: list[tuple[str, int, int]], max_images: int, eos_token: str
) -> OwnedText:
    """The text ``plan_gpt`` makes of ``example`` (and the loader tokenizes), with its owners."""
    text = owned_example(example, spans)
    found = list(PLACEHOLDER.finditer(example))
    if len(found) > max_images:
        text.cut(found[max_images].start())
    text.sub(PLACEHOLDER, f"{EOC_TOKEN}{IMAGE_TOKEN}")
    return _joined_as_the_loader_does(text, eos_token)
