"""LLaVA-style conversation JSON + an image folder -> interleaved (default) or GPT-form shards.

Each ``<image>`` tag places the next image at that point of its turn; a sample with images and no
tag gets them before the first turn; any other mismatch between tags and images is a counted
reject, never a guess. Interleaved form splits turns at tags so every image owns one sentence,
and its similarity row is 1.0 there and 0.0 elsewhere: the loader's one-to-one matching with the
usual threshold reproduces the placement exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from flamingo_data.converters.mmc4 import unit_stem
from flamingo_data.executors import run_units
from flamingo_data.images import ImagePolicy, process_image
from flamingo_data.records import GptImage, GptSequence, ImageInfo, InterleavedDoc
from flamingo_data.schema import schema_errors
from flamingo_data.specs import SpecError, expand_specs
from flamingo_data.stats import Stats
from flamingo_data.units import RunOptions, Unit, UnitContext, finalize, prepare_out_dir, unit_names

TAG = "<image>"
MARK = "\x00IMG\x00"
GPT_PLACEHOLDER = re.compile(r"_!_IMAGE\d+_!_")
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


class ItemError(ValueError):
    """An item that cannot become a record; ``args[0]`` is the reason, ``args[1:]`` a detail."""


@dataclass(frozen=True, slots=True)
class ConversationOptions:
    images: str
    as_: str = "interleaved"
    template: tuple[str, str] = ("User: {value}", "Assistant: {value}")
    policy: ImagePolicy = field(default_factory=ImagePolicy)


@dataclass
class Turn:
    """A rendered turn: text with MARK where each image goes."""

    text: str
    images: int


def iter_items(path: str) -> Iterator[tuple[int, Any]]:
    """(index, item) from a JSON array or JSONL file; an undecodable JSONL line yields an ItemError."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from enumerate(json.loads(text))
        return
    for index, line in enumerate(row for row in text.splitlines() if row.strip()):
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, ItemError("bad_json", str(exc))


def render_turns(item: dict[str, Any], template: tuple[str, str], n_images: int) -> list[Turn]:
    """Turns through the role template, tags -> MARK; with no tag at all, images go before the first turn."""
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ItemError("no_conversations")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ItemError("bad_turn")
        value = turn["value"]
        role = ROLES.get(str(turn.get("from", "")).lower())
        text = (
            template[role].replace("{value}", value.replace(TAG, MARK))
            if role is not None
            else value.replace(TAG, MARK)
        )
        turns.append(Turn(text, value.count(TAG)))
    tags = sum(t.images for t in turns)
    if tags == 0 and n_images:
        turns[0] = Turn(MARK * n_images + turns[0].text, n_images)
    elif tags != n_images:
        raise ItemError("tag_count_mismatch", f"{tags} <image> tags, {n_images} images")
    return turns


def image_paths(item: dict[str, Any]) -> list[str]:
    image = item.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return image
    raise ItemError("bad_image_field")


def load_image(root: Path, relative: str, policy: ImagePolicy) -> bytes:
    """Bytes through the image stage; refuses paths that leave the image folder."""
    if "\0" in relative or Path(relative).is_absolute():
        raise ItemError("unsafe_image_path", relative[:200])
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ItemError("unsafe_image_path", relative[:200])
    try:
        data = path.read_bytes()
    except OSError as exc:  # missing, a folder, a name too long...
        raise ItemError("missing_image", relative[:200]) from exc
    result = process_image(data, policy)
    if not result.ok:
        raise ItemError(f"image_{result.reason}", relative)
    return result.data


def interleaved_record(
    turns: list[Turn], names: list[str], blobs: list[bytes], item_id: str
) -> dict[str, Any]:
    """One sentence per image segment (plus text before a turn's first image); matrix 1.0 at the match."""
    sentences, owners = [], []
    for turn in turns:
        parts = turn.text.split(MARK)
        if parts[0].strip() or len(parts) == 1:
            sentences.append(parts[0].strip())
            owners.append(None)
        for part in parts[1:]:
            owners.append(len([o for o in owners if o is not None]))
            sentences.append(part.strip())
    infos, matrix = [], []
    for image_index, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        sentence = owners.index(image_index)
        infos.append(
            ImageInfo(
                image_name=name, matched_text_index=sentence, matched_sim=1.0, image_bytes=blob
            )
        )
        matrix.append([1.0 if s == sentence else 0.0 for s in range(len(sentences))])
    doc = InterleavedDoc(
        text_list=sentences,
        image_info=infos,
        similarity_matrix=matrix,
        extra={"conversation_id": item_id},
    )
    return doc.to_json()


def gpt_record(
    turns: list[Turn], names: list[str], blobs: list[bytes], item_id: str
) -> dict[str, Any]:
    text = "\n".join(t.text for t in turns)
    counter = iter(range(1, len(names) + 1))
    example = re.sub(re.escape(MARK), lambda _: f"_!_IMAGE{next(counter)}_!_", text)
    image_map = {
        f"_!_IMAGE{k}_!_": GptImage(image_bytes=blob, extra={"image_name": name})
        for k, (name, blob) in enumerate(zip(names, blobs, strict=True), start=1)
    }
    return GptSequence(
        example=example, image_map=image_map, extra={"conversation_id": item_id}
    ).to_json()


def convert_item(item: Any, options: ConversationOptions) -> dict[str, Any]:
    """One item -> one record; raises ItemError(reason)."""
    if isinstance(item, ItemError):
        raise item
    if not isinstance(item, dict):
        raise ItemError("not_an_object")
    names = image_paths(item)
    if not names:
        raise ItemError("no_images")
    turns = render_turns(item, options.template, len(names))
    if options.as_ == "gpt" and any(GPT_PLACEHOLDER.search(t.text) for t in turns):
        raise ItemError("placeholder_in_text")  # the loader would bind an image to it
    blobs = [load_image(Path(options.images), name, options.policy) for name in names]
    build = gpt_record if options.as_ == "gpt" else interleaved_record
    record = build(turns, names, blobs, str(item.get("id", "")))
    kind = "gpt" if options.as_ == "gpt" else "interleaved"
    if errors := schema_errors(kind, record):
        raise ItemError("schema", "; ".join(errors))
    return record


def item_key(unit: Unit, index: int, item: Any, used: set[str], stats: Stats) -> str:
    """``<unit>-<id>`` when the id is safe and unused, else ``<unit>-<index>`` (counted)."""
    item_id = item.get("id") if isinstance(item, dict) else None
    key = (
        f"{unit.name}-{item_id}"
        if isinstance(item_id, str | int) and SAFE_ID.match(str(item_id))
        else None
    )
    if key is None or key in used:
        stats.add("keys", "duplicate_id" if key else "derived")
        key = f"{unit.name}-{index:07d}"
        while key in used:
            key += "_"
    used.add(key)
    return key


def convert_unit(unit: Unit, ctx: UnitContext, options: ConversationOptions) -> None:
    used: set[str] = set()
    try:
        items = list(iter_items(unit.source))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        ctx.reject("units", unit.name, "unreadable_json", str(exc))
        return
    for index, item in items:
        key = item_key(unit, index, item, used, ctx.stats)
        ctx.stats.add("documents", "in")
        try:
            record = convert_item(item, options)
        except ItemError as exc:
            ctx.reject("documents", key, exc.args[0], " ".join(map(str, exc.args[1:])))
            continue
        ctx.write(key, {"json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
        ctx.stats.add("documents", "written")
        ctx.stats.add("images", "written", len(image_paths(item)))


def convert_conversations(
    json_specs: str | list[str],
    options: ConversationOptions,
    run: RunOptions,
    *,
    overwrite: bool = False,
    processes: int | None = None,
    executor: str = "local",
    master: str | None = None,
    progress: bool = True,
) -> Stats:
    """Convert conversation files (one unit each) into shards in ``run.out_dir``."""
    if options.as_ not in ("interleaved", "gpt"):
        raise ValueError("--as must be interleaved or gpt")
    sources = expand_specs(json_specs, folder_suffix=".json")
    if not sources:
        raise SpecError(f"no conversation file matches {json_specs!r}")
    if not Path(options.images).is_dir():
        raise SpecError(f"image folder {options.images} does not exist")
    prepare_out_dir(run.out_dir, run.resume, overwrite)
    units = unit_names(sources, unit_stem)
    run_units(
        units,
        partial(convert_unit, options=options),
        run,
        executor=executor,
        processes=processes,
        progress=progress,
        master=master,
    )
    return finalize(run.out_dir, "conversations")
