"""LLaVA-style conversation JSON + an image folder -> interleaved (default) or GPT-form shards.

Each ``<image>`` tag places the next image at that point of its turn; a sample with images and no
tag gets them before the first turn; any other mismatch between tags and images is a counted
reject, never a guess. A turn is kept as its text *segments* between tags, so the placement is
exact in both forms. Interleaved form makes each segment after a tag its own sentence, so every
image owns one sentence (one-to-one matching cannot put two images on one sentence), and its
similarity row is 1.0 there and 0.0 elsewhere: the loader's matching with the usual threshold
reproduces the placement exactly. An image with no text before the next tag or the end of its turn
owns the sentence ``IMAGE_ONLY_SENTENCE`` (a newline), because only text standing between two images
keeps both exactly where they were, and a newline is what LLaVA writes there (``<image>\n``).
GPT form puts ``_!_IMAGEk_!_`` exactly where the k-th tag was. Every record says which turn each
piece of text came from (``text_roles`` per sentence, ``role_spans`` over the GPT example), so the
loader can train on the assistant's turns only.
"""

from __future__ import annotations

import itertools
import posixpath
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from flamingo_data.converters.jsonchunks import (
    DEFAULT_CHUNK_SIZE,
    chunk_units,
    read_chunk,
    record_chunk_size,
)
from flamingo_data.converters.mmc4 import unit_stem
from flamingo_data.core.records import (
    EncodedRecord,
    GptImage,
    GptSequence,
    ImageInfo,
    InterleavedDoc,
    RecordEncodingError,
    encode_record,
)
from flamingo_data.core.schema import schema_errors
from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError, SettingsMismatch
from flamingo_data.images.stage import ImagePolicy, ImageResult, process_image
from flamingo_data.run.driver import ConversionPlan, run_conversion
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import (
    RunOptions,
    Unit,
    UnitContext,
    duplicate_inputs,
    list_markers,
    read_marker,
)
from flamingo_data.storage import remote
from flamingo_data.storage.specs import SpecError, expand_specs, missing_folder

TAG = "<image>"
SPECIAL_TOKENS = ("<|endofchunk|>", "<|endoftext|>")  # would be read as the loader's own tokens
GPT_PLACEHOLDER = re.compile(r"_!_IMAGE\d+_!_")
ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1, "system": 2}
ROLE_NAMES = ("user", "assistant", "system")  # by ROLES number: the names records carry
DEFAULT_TEMPLATE = ("User: {value}", "Assistant: {value}")
DEFAULT_SYSTEM_TEMPLATE = "{value}"  # the system prompt as plain text, as LLaVA renders it
REJECT_SYSTEM = "reject"  # the --system-template that makes a system turn reject its item
ROLES_SETTING = "turn_roles"  # in every marker of a run whose records name their turns' roles
IMAGE_ONLY_SENTENCE = "\n"  # the sentence of an image followed by no text in its turn

Segments = list[str]  # a turn's text between its <image> tags: n tags -> n + 1 segments


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # one of ROLE_NAMES
    segments: Segments


class ItemError(ValueError):
    """An item that cannot become a record; ``args[0]`` is the reason, ``args[1:]`` a detail."""


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around ``{value}``; a template that would drop or duplicate text is refused."""
    if template.count("{value}") != 1:
        raise InputError(f"template {template!r} must contain {{value}} exactly once")
    if any(token in template for token in (TAG, *SPECIAL_TOKENS)):
        raise InputError(f"template {template!r} must not contain <image> or special tokens")
    prefix, suffix = template.split("{value}")
    return prefix, suffix


@dataclass(frozen=True, slots=True)
class ConversationOptions:
    images: str
    as_: str = "interleaved"
    template: tuple[str, str] = DEFAULT_TEMPLATE
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    system_template: str | None = DEFAULT_SYSTEM_TEMPLATE  # None: an unknown_role reject

    def __post_init__(self) -> None:
        if self.system_template == REJECT_SYSTEM:
            object.__setattr__(self, "system_template", None)
        if self.as_ not in ("interleaved", "gpt"):
            raise InputError(f"as_ must be interleaved or gpt, not {self.as_!r}")
        for template in self.role_templates():
            split_template(template)

    def role_templates(self) -> tuple[str, ...]:
        """By role number (``ROLES``): user, assistant, and system when one is given."""
        system = () if self.system_template is None else (self.system_template,)
        return (*self.template, *system)


def image_paths(item: dict[str, Any]) -> list[str]:
    """``image`` (LLaVA) or ``images`` (Mantis, LLaMA-Factory) as a list: absent -> [], one path ->
    [path], a list of paths as is; both keys at once is ambiguous and refused."""
    if "image" in item and "images" in item:
        raise ItemError("bad_image_field", "both image and images")
    image = item.get("image", item.get("images"))
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return image
    raise ItemError("bad_image_field")


def render_turns(item: dict[str, Any], template: tuple[str, ...]) -> list[Turn]:
    """Each turn's segments between ``<image>`` tags, wrapped in its role's template."""
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ItemError("no_conversations")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ItemError("bad_turn")
        role = ROLES.get(str(turn.get("from", "")).strip().lower())
        if role is None or role >= len(template):
            raise ItemError("unknown_role", str(turn.get("from"))[:100])
        if any(token in turn["value"] for token in SPECIAL_TOKENS):
            raise ItemError("special_token_in_text")
        prefix, suffix = split_template(template[role])
        segments = turn["value"].split(TAG)
        segments[0] = prefix + segments[0]
        segments[-1] += suffix
        if any(token in s for s in segments for token in (TAG, *SPECIAL_TOKENS)):
            raise ItemError("special_token_in_text")  # formed by the template and the text together
        turns.append(Turn(ROLE_NAMES[role], segments))
    return turns


def place_images(turns: list[Turn], n_images: int) -> list[Turn]:
    """Tags must match images one for one; with no tag at all, the images go before the first turn."""
    tags = sum(len(turn.segments) - 1 for turn in turns)
    if tags == 0 and n_images:
        return [Turn(turns[0].role, [""] * n_images + turns[0].segments), *turns[1:]]
    if tags != n_images:
        raise ItemError("tag_count_mismatch", f"{tags} <image> tags, {n_images} images")
    return turns


def load_image(root: str, relative: str, policy: ImagePolicy) -> ImageResult:
    """Bytes through the image stage (an accepted result); refuses paths that leave the image folder."""
    try:
        path = remote.join(root, safe_relative(relative))
        data = remote.read_bytes(
            path, policy.max_bytes + 1
        )  # more: too_many_bytes, read no further
    except UnicodeEncodeError as exc:  # a lone surrogate (a \ud800 escape) names no file
        raise ItemError("invalid_unicode", ascii(relative)[:200]) from exc
    except OSError as exc:  # missing, a folder, a symlink loop, a name too long...
        raise ItemError("missing_image", relative[:200]) from exc
    result = process_image(data, policy)
    if not result.ok:
        raise ItemError(f"image_{result.reason}", relative[:200])
    return result


def safe_relative(relative: str) -> str:
    """The path normalized, or an unsafe_image_path error when it is absolute or climbs out.

    Judged on the text, which is what the (possibly untrusted) JSON controls; symlinks inside the
    image folder are the user's own and are followed (LLaVA's ``coco -> /datasets/coco``). A
    backslash separates folders too (a JSON written on Windows), and a drive (``C:``) is refused.
    """
    normal = posixpath.normpath(relative.replace("\\", "/"))
    climbs = normal in (".", "..") or normal.startswith(("../", "/")) or _DRIVE.match(normal)
    if "\0" in relative or climbs:
        raise ItemError("unsafe_image_path", relative[:200])
    return normal


_DRIVE = re.compile(r"^[A-Za-z]:")  # C:\x is a folder here, but another drive joined on Windows


def interleaved_record(
    turns: list[Turn], names: list[str], blobs: list[bytes], provenance: dict[str, Any]
) -> dict[str, Any]:
    """A turn's text before its first tag is one sentence; each tag starts the next image's
    sentence (``IMAGE_ONLY_SENTENCE`` when no text follows it); ``text_roles`` names each
    sentence's turn."""
    sentences: list[str] = []
    roles: list[str] = []
    image_sentence: list[int] = []
    for turn in turns:
        first, *after_tags = turn.segments
        if first.strip() or not after_tags:
            sentences.append(first.strip())
            roles.append(turn.role)
        for segment in after_tags:
            image_sentence.append(len(sentences))
            sentences.append(segment.strip() or IMAGE_ONLY_SENTENCE)
            roles.append(turn.role)
    infos = [
        ImageInfo(image_name=name, matched_text_index=s, matched_sim=1.0, image_bytes=blob)
        for name, blob, s in zip(names, blobs, image_sentence, strict=True)
    ]
    matrix = [[1.0 if j == s else 0.0 for j in range(len(sentences))] for s in image_sentence]
    doc = InterleavedDoc(
        text_list=sentences,
        image_info=infos,
        similarity_matrix=matrix,
        extra={**provenance, "text_roles": roles},
    )
    return doc.to_json()


def gpt_record(
    turns: list[Turn], names: list[str], blobs: list[bytes], provenance: dict[str, Any]
) -> dict[str, Any]:
    """The conversation as one text, turns joined by newlines, ``_!_IMAGEk_!_`` at the k-th tag;
    ``role_spans`` holds ``[role, start, end]`` of each turn in ``example`` (code points, end
    excluded; the newlines between turns are in none)."""
    example, spans = gpt_example(turns)
    image_map = {
        f"_!_IMAGE{k}_!_": GptImage(image_bytes=blob, extra={"image_name": name})
        for k, (name, blob) in enumerate(zip(names, blobs, strict=True), start=1)
    }
    extra = {**provenance, "role_spans": spans}
    return GptSequence(example=example, image_map=image_map, extra=extra).to_json()


def gpt_example(turns: list[Turn]) -> tuple[str, list[list[Any]]]:
    """The turns joined by newlines, ``_!_IMAGEk_!_`` at the k-th tag, and each turn's
    ``[role, start, end]`` in that text."""
    numbers = itertools.count(1)
    texts, spans, start = [], [], 0
    for turn in turns:
        text = "".join(
            s if i == 0 else f"_!_IMAGE{next(numbers)}_!_{s}" for i, s in enumerate(turn.segments)
        )
        texts.append(text)
        spans.append([turn.role, start, start + len(text)])
        start += len(text) + 1
    return "\n".join(texts), spans


def placeholders_exact(example: str, n_images: int) -> bool:
    """The example holds exactly ``_!_IMAGE1_!_`` .. ``_!_IMAGEn_!_`` in order: checked on the text
    itself, since text next to a tag can join with its placeholder (``x_!_IMAGE1<image>``)."""
    placed = [m.group(0) for m in GPT_PLACEHOLDER.finditer(example)]
    return placed == [f"_!_IMAGE{k}_!_" for k in range(1, n_images + 1)]


def convert_item(item: Any, options: ConversationOptions) -> tuple[dict[str, Any], list[str]]:
    """One item -> (one record, its images' outcomes in the image stage); raises ItemError(reason)."""
    if not isinstance(item, dict):
        raise ItemError("not_an_object")
    names = image_paths(item)
    if not names:
        raise ItemError("no_images")
    turns = place_images(render_turns(item, options.role_templates()), len(names))
    if options.as_ == "gpt" and not placeholders_exact(gpt_example(turns)[0], len(names)):
        raise ItemError("placeholder_in_text")  # the loader would bind an image to it
    images = [load_image(options.images, name, options.policy) for name in names]
    build = gpt_record if options.as_ == "gpt" else interleaved_record
    record = build(turns, names, [image.data for image in images], provenance(item))
    if errors := schema_errors(options.as_, record):
        raise ItemError("schema", "; ".join(errors))
    return record, [image.outcome for image in images]


def provenance(item: dict[str, Any]) -> dict[str, Any]:
    """``{"conversation_id": <the item's id, as it was>}``, or nothing when it has no id: an id
    is kept whatever its JSON type (a number stays a number; NaN is counted as written null)."""
    return {"conversation_id": item["id"]} if "id" in item else {}


def encode_item(record: dict[str, Any]) -> EncodedRecord:
    """UTF-8 JSON; text that cannot be UTF-8 (a lone surrogate from a ``\\ud800`` escape) is refused."""
    try:
        return encode_record(record)
    except RecordEncodingError as exc:
        raise ItemError(*exc.args) from exc


def convert_entry(entry: dict[str, Any], ctx: UnitContext, options: ConversationOptions) -> None:
    """One chunk line: written with its key, or counted as a reject with its reason."""
    if "file_error" in entry:
        ctx.reject("units", entry["source"], "unreadable_json", entry["file_error"])
        return
    key = entry["key"]
    if entry["key_note"]:
        ctx.stats.add("keys", entry["key_note"])
    ctx.stats.add("documents", "in")
    try:
        if "error" in entry:
            raise ItemError(*entry["error"])
        record, outcomes = convert_item(entry["item"], options)
        payload = encode_item(record)
    except ItemError as exc:
        ctx.reject("documents", key, exc.args[0], " ".join(map(str, exc.args[1:])))
        return
    ctx.write_record(key, payload)
    ctx.stats.add("documents", "written")
    ctx.stats.add("images", "written", len(outcomes))
    for outcome in outcomes:  # kept, trimmed, converted or resized
        ctx.stats.add("images", outcome)


def convert_unit(unit: Unit, ctx: UnitContext, options: ConversationOptions) -> None:
    for entry in read_chunk(unit.source):
        convert_entry(entry, ctx, options)


def conversation_sources(specs: str | list[str], duplicates: list[str] | None = None) -> list[str]:
    """Files named by specs (globs, brace patterns, folders of .json and .jsonl files), sorted, each
    once (later names of a file go to ``duplicates``, see ``expand_specs``). A spec that names no
    file beside others that do is an error too: a mistyped split is not skipped."""
    nothing: list[str] = []
    found = expand_specs(
        specs, folder_suffix=(".json", ".jsonl"), unmatched=nothing, duplicates=duplicates
    )
    sources = sorted(path for path in found if remote.isfile(path))
    if not sources:
        raise SpecError(f"no conversation file matches {specs!r}")
    if nothing:
        raise SpecError(f"{nothing[0]} names no conversation file (.json or .jsonl)")
    return sources


def check_resume_units(out_dir: str, units: list[Unit]) -> None:
    """Resuming with other inputs would mix two runs' units: refuse."""
    done = {posixpath.basename(p).removesuffix(".json") for p in list_markers(out_dir)}
    if stale := done - {unit.name for unit in units}:
        raise SpecError(
            f"{out_dir} holds units of a run with other inputs "
            f"({sorted(stale)[0]}, ...): resume with the same ones, or pass `overwrite`"
        )


def refuse_units_without_roles(out_dir: str) -> None:
    """Units whose records carry no turn roles (and whose system turns were rejected by default)
    would mix with this run's: resuming them is refused, naming how to go on."""
    for path in list_markers(out_dir):
        settings = (read_marker(path) or {}).get("settings")
        if isinstance(settings, dict) and ROLES_SETTING not in settings:
            raise SettingsMismatch(
                f"{out_dir} holds units converted without turn roles in their records (and with a"
                " system turn rejecting its item by default): convert it again with `overwrite`"
                " or into a new output folder"
            )


def convert_conversations(
    json_specs: str | list[str],
    options: ConversationOptions,
    run: RunOptions,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Convert conversation files, ``chunk_size`` items per unit, into shards in ``run.out_dir``."""
    plan = plan_conversations(json_specs, options, chunk_size)
    if run.resume and not overwrite:
        refuse_units_without_roles(run.out_dir)
    return run_conversion(plan, run, overwrite=overwrite, execution=execution)


def plan_conversations(
    json_specs: str | list[str], options: ConversationOptions, chunk_size: int
) -> ConversionPlan:
    """One unit per chunk of ``chunk_size`` items, chunked once the output folder is ready."""
    duplicates: list[str] = []
    sources = conversation_sources(json_specs, duplicates)
    if not remote.isdir(options.images):
        raise SpecError(missing_folder("images", options.images))

    def units(run: RunOptions) -> list[Unit]:
        record_chunk_size(run.out_dir, chunk_size, run.resume)
        chunked = chunk_units(sources, run.out_dir, chunk_size, unit_stem)
        if run.resume:
            check_resume_units(run.out_dir, chunked)
        return chunked

    return ConversionPlan(
        converter="conversations",
        settings={
            "as_": options.as_,
            "template": options.template,
            "policy": options.policy,
            "system_template": options.system_template or REJECT_SYSTEM,
            ROLES_SETTING: True,
        },
        units=units,
        convert_unit=partial(convert_unit, options=options),
        input_counts=duplicate_inputs(duplicates, "conversations"),
    )
