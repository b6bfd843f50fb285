"""``inspect``: dataset summary — counts, histograms, image sizes/formats, token lengths, and how many
documents survive the loader's filters at a given threshold / max images / max tokens."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from flamingo_data.check.docview import DocView, iter_path_docs
from flamingo_data.core.extras import require_extra
from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError
from flamingo_data.images.stage import DEFAULT_MAX_PIXELS, open_capped, sniff_format
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.gpt import plan_gpt
from flamingo_data.loader.interleaved import InterleavedPlan, Placement, interleaved_text
from flamingo_data.loader.tokenizer import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    as_text,
    literal_specials,
    make_tokenizer,
)
from flamingo_data.storage import remote
from flamingo_data.storage.shard_reader import ReadIssue
from flamingo_data.storage.specs import SpecError, expand_specs


@dataclass
class InspectReport:
    shards: int = 0
    bytes: int = 0
    documents: int = 0
    kinds: Counter = field(default_factory=Counter)
    images: int = 0
    images_per_doc: Counter = field(default_factory=Counter)
    sentences_per_doc: Counter = field(default_factory=Counter)
    image_formats: Counter = field(default_factory=Counter)
    image_short_side: Counter = field(default_factory=Counter)
    tokens: list[int] = field(default_factory=list)
    survive: int = 0
    rejected_by_loader: Counter = field(default_factory=Counter)
    read_issues: Counter = field(default_factory=Counter)
    source_stats: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        tokens = sorted(self.tokens)
        # nearest rank: the smallest count at or above q of the documents (int(q * n) took the
        # next one up: p90 of 10 documents was the maximum, p50 of 2 the larger)
        pct = lambda q: tokens[max(0, math.ceil(q * len(tokens)) - 1)] if tokens else 0  # noqa: E731
        return {
            "shards": self.shards,
            "bytes": self.bytes,
            "documents": self.documents,
            "kinds": dict(self.kinds),
            "images": self.images,
            "images_per_doc": _sorted(self.images_per_doc),
            "sentences_per_doc": _sorted(self.sentences_per_doc),
            "image_formats": dict(self.image_formats),
            "image_short_side": _sorted(self.image_short_side),
            "tokens": {
                "mean": sum(tokens) / len(tokens) if tokens else 0,
                "p50": pct(0.5),
                "p90": pct(0.9),
                "max": tokens[-1] if tokens else 0,
            },
            "loader": {
                **self.filters,
                "survive": self.survive,
                "rejected": dict(self.rejected_by_loader),
            },
            "read_issues": dict(self.read_issues),
            "source_stats": self.source_stats,
        }


SIZE_BUCKET = 128  # px of image short side per histogram bar


def _sorted(counter: Counter) -> dict[str, int]:
    return {str(k): counter[k] for k in sorted(counter)}


def size_bucket(side: int) -> int:
    """Short-side histogram buckets: 0-127, 128-255, ... (lower bound)."""
    return (side // SIZE_BUCKET) * SIZE_BUCKET


def size_label(lower: int | str) -> str:
    """A bucket as the range of sides it holds: ``128-255 px``."""
    return f"{int(lower)}-{int(lower) + SIZE_BUCKET - 1} px"


def size_labels(buckets: dict) -> dict[str, int]:
    return {size_label(lower): count for lower, count in buckets.items()}


def inspect_shards(
    specs: str | list[str],
    *,
    tokenizer=None,
    threshold: float = 0.24,
    max_images: int = 6,
    max_tokens: int = 256,
    min_images: int = 1,
    progress: bool = False,
) -> InspectReport:
    """Walk every sample once; nothing is decoded beyond image headers. ``progress``: a bar of
    shards done on stderr."""
    tokenizer = tokenizer or make_tokenizer(None)
    config = LoaderConfig(
        sim_threshold=threshold, max_images=max_images, max_tokens=max_tokens, min_images=min_images
    )
    report = InspectReport(
        filters={
            "threshold": threshold,
            "max_images": max_images,
            "max_tokens": max_tokens,
            "min_images": min_images,
        }
    )
    named = expand_specs(specs, folder_suffix=".tar", keep_missing=True, unique=False)
    paths = [p for p in named if remote.exists(p)]  # the loader skips the others, with a warning
    if not paths:  # named here: the paths (none) made the message "no shard matches []"
        raise SpecError(f"no shard matches {specs!r}")
    report.shards, report.bytes = len(paths), sum(remote.size(p) for p in paths)
    if len(named) > len(paths):
        report.read_issues["missing_shard"] = len(named) - len(paths)
    issues: list[ReadIssue] = []
    specials = literal_specials(tokenizer)
    with tqdm(total=len(paths), unit="shard", desc="inspect", disable=not progress) as bar:
        for path in paths:
            for doc in iter_path_docs([path], config, issues):
                _count_doc(report, doc, (tokenizer, specials), config)
            bar.update(1)
    report.read_issues.update(issue.reason for issue in issues)
    report.source_stats = merged_stats(paths, report.read_issues)
    return report


def _count_doc(
    report: InspectReport, doc: DocView, text: tuple[Any, re.Pattern], config: LoaderConfig
) -> None:
    """``text``: the tokenizer and its literal special-token pattern (the loader's TextContext)."""
    tokenizer, specials = text
    report.documents += 1
    report.kinds[doc.kind] += 1
    with_bytes = [img for img in doc.images if img.data]
    report.images += len(with_bytes)
    report.images_per_doc[len(with_bytes)] += 1
    report.sentences_per_doc[len(doc.texts)] += 1
    for img in with_bytes:
        _count_image(report, img.data)
    texts = [as_text(t, specials)[0] for t in doc.texts]  # as the loader: literal tokens stay text
    ids = tokenizer.encode(_training_text(doc, texts, text, config))
    report.tokens.append(len(ids))
    limit = config.pair_max_tokens if doc.kind == "pair" else config.max_tokens
    reason = doc.rejected or _truncation_reject(ids[:limit], tokenizer, config)
    if reason:
        report.rejected_by_loader[reason] += 1
    else:
        report.survive += 1


def _count_image(report: InspectReport, data: bytes) -> None:
    """One format per image: an unreadable one was counted twice (its sniffed format and
    ``unreadable``), so the format mix added up to more images than there were."""
    try:
        width, height = open_capped(data, DEFAULT_MAX_PIXELS).size
    except Exception:  # header unreadable or a bomb: counted as a format problem, not a crash
        report.image_formats["unreadable"] += 1
        return
    report.image_formats[sniff_format(data) or "unknown"] += 1
    report.image_short_side[size_bucket(min(width, height))] += 1


def _training_text(
    doc: DocView, texts: list[str], text: tuple[Any, re.Pattern], config: LoaderConfig
) -> str:
    """The string the loader tokenizes. For GPT records it is the loader's own plan text: joining
    the pieces left out each ``<|endofchunk|>`` and the loader's space rules, so the count that
    survives truncation was not the loader's (6 of 11 where the loader keeps 7)."""
    tokenizer, specials = text
    if doc.kind == "gpt" and doc.record is not None and not doc.rejected:
        example = as_text(doc.record["example"], specials)[0]
        plan = plan_gpt({**doc.record, "example": example}, config)
        return f"{plan.text}{EOC_TOKEN}{tokenizer.eos_token}"
    if doc.kind == "interleaved" and doc.record is not None:
        plan = InterleavedPlan(sentences=texts)
        plan.placements = [
            Placement(i.index, i.where, i.similarity or 0.0) for i in doc.images if i.kept
        ]
        return interleaved_text(plan, tokenizer.eos_token)
    if doc.kind == "pair":  # the loader's pair string: the count lacked the two end tokens
        return f"{IMAGE_TOKEN}{texts[0]}{EOC_TOKEN}{tokenizer.eos_token}"
    kept = {i.where for i in doc.images if i.kept}
    return "".join((IMAGE_TOKEN if n in kept else "") + t for n, t in enumerate(texts))


def _truncation_reject(ids: list[int], tokenizer, config: LoaderConfig) -> str | None:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return "too_few_images_after_truncation" if ids.count(image_id) < config.min_images else None


def merged_stats(paths: list[str], issues: Counter | None = None) -> dict[str, Any]:
    """stats.json files beside the shards, merged per converter; a malformed one is left out and
    counted in ``issues`` as ``bad_stats_json``, never a traceback."""
    merged: dict[str, Stats] = {}
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        raw = remote.read_if_exists(remote.join(folder, "stats.json"))
        if raw is not None:
            try:
                stats = Stats.from_json(json.loads(raw))
            except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
                if issues is not None:
                    issues["bad_stats_json"] += 1
                continue
            merged.setdefault(stats.converter or "unknown", Stats(converter=stats.converter)).merge(
                stats
            )
    return {name: s.to_json() for name, s in merged.items()}


def format_report(report: InspectReport) -> str:
    """The terminal table."""
    data = report.to_json()
    rows = [
        ("shards", data["shards"]),
        ("bytes", f"{data['bytes']:,}"),
        ("documents", data["documents"]),
        ("kinds", _inline(data["kinds"])),
        ("images", data["images"]),
        ("images/doc", _inline(data["images_per_doc"])),
        ("sentences/doc", _inline(data["sentences_per_doc"])),
        ("image formats", _inline(data["image_formats"])),
        ("image short side", _inline(size_labels(data["image_short_side"]))),
        ("tokens mean/p50/p90/max", "{mean:.0f} / {p50} / {p90} / {max}".format(**data["tokens"])),
        (
            f"loader keeps (threshold {report.filters['threshold']}, max {report.filters['max_images']} images, "
            f"{report.filters['max_tokens']} tokens)",
            f"{report.survive} of {report.documents}",
        ),
        ("loader rejects", _inline(data["loader"]["rejected"]) or "-"),
        ("read issues", _inline(data["read_issues"]) or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for name, stats in data["source_stats"].items():
        lines.append(f"{'source stats (' + name + ')':<{width}}  {json.dumps(stats['counts'])}")
    return "\n".join(lines)


def _inline(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


def plot_report(report: InspectReport, out: str) -> None:
    """Histograms as a PNG; needs the [plot] extra (else MissingExtra)."""
    require_extra("plot", "plot_report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, counter) in zip(
        axes,
        [
            ("images per document", report.images_per_doc),
            ("sentences per document", report.sentences_per_doc),
            ("image short side (px)", report.image_short_side),
        ],
        strict=False,
    ):
        keys = sorted(counter)
        labels = [size_label(k) if counter is report.image_short_side else str(k) for k in keys]
        ax.bar(labels, [counter[k] for k in keys], color="#c2477f")
        ax.set_title(title)
    axes[3].hist(report.tokens, bins=30, color="#2d2a32")
    axes[3].set_title("tokens per document")
    fig.tight_layout()
    try:
        # always a PNG, at ``out`` exactly, whatever its extension
        fig.savefig(out, dpi=100, format="png")
    except OSError as exc:  # the output path the caller chose: input, not a failed run
        raise InputError(f"cannot write the plot to {out}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
