"""``preview``: a self-contained HTML page of documents exactly as the loader will train on them.

Offline (images inline as data URLs, inline CSS, no script at all) and safe with untrusted web text:
every string is HTML-escaped, and only bytes that sniff as JPEG/PNG/WebP become data URLs.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from flamingo_data.check.docview import DocView, ImageView, iter_docs
from flamingo_data.core.records import encode_base64
from flamingo_data.errors import EmptyDataset, InputError
from flamingo_data.images.stage import sniff_format
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.storage import remote
from flamingo_data.storage.shard_reader import ReadIssue

MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
CSS = """
body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f6f4f1;color:#222}
header{padding:16px 28px;background:#2d2a32;color:#fff}header p{margin:4px 0 0;color:#cfc8d8}
main{max-width:920px;margin:0 auto;padding:16px}
article{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;margin:18px 0;padding:16px 22px}
article h2{font-size:13px;font-weight:600;color:#666;margin:0 0 10px;font-family:monospace}
.kind{display:inline-block;background:#f3d6e4;color:#7a2953;border-radius:4px;padding:0 6px;margin-left:6px}
.rejected{background:#fde8e8;color:#9b1c1c;border-radius:6px;padding:6px 10px;margin-bottom:10px}
p.s{margin:6px 0}
figure{display:inline-block;margin:6px 8px 6px 0;vertical-align:top;text-align:center}
figure img{max-width:220px;max-height:180px;border-radius:6px;display:block}
figcaption{font-size:12px;color:#555}
figure.dropped img{filter:grayscale(1);opacity:.35}figure.dropped figcaption{color:#a33}
.missing{width:120px;height:80px;border:1px dashed #bbb;border-radius:6px;display:flex;align-items:center;justify-content:center;color:#999;font-size:12px}
"""


@dataclass
class PreviewResult:
    path: str
    documents: int
    images_shown: int
    # shard-level read problems (a shard that is not a regular file, a refused header): the
    # page cannot show them, the command prints them
    shard_issues: list[ReadIssue] = field(default_factory=list)


def write_preview(
    specs: str | list[str],
    out: str,
    *,
    n: int = 20,
    keys: list[str] | None = None,
    config: LoaderConfig | None = None,
) -> PreviewResult:
    """Render the first ``n`` documents (or those with ``keys``) of the shards into ``out``."""
    config = config or LoaderConfig()
    docs = []
    issues: list[ReadIssue] = []
    for doc in iter_docs(specs, config, issues):
        if keys and doc.key not in keys:
            continue
        docs.append(doc)
        if len(docs) >= n:
            break
    shard_issues = [issue for issue in issues if not issue.key]
    if not docs and shard_issues:  # a page of nothing would read as an empty dataset
        first = shard_issues[0]
        raise EmptyDataset(f"no document to preview: {first.shard}: {first.reason} {first.detail}")
    missing = sorted(set(keys or ()) - {doc.key for doc in docs})
    if missing and len(docs) < n:  # every shard was read: a mistyped key, not a page cut at n
        raise InputError(f"keys: no sample has the key {', '.join(missing)} in {specs}")
    body = "\n".join(render_doc(doc) for doc in docs)
    title = f"flamingo-data preview: {len(docs)} documents"
    intro = (
        f"threshold {config.sim_threshold}, at most {config.max_images} images; greyed images are dropped "
        "by the loader, with the reason"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
        f"</head><body><header><h1>{_e(title)}</h1><p>{_e(intro)}</p></header><main>{body}</main></body></html>"
    )
    write_page(out, page)
    shown = sum(1 for d in docs for i in d.images if i.data)
    return PreviewResult(out, len(docs), shown, shard_issues)


def write_page(out: str, page: str) -> None:
    """To a local path or a url (never a local file named ``s3:/...``). An unwritable ``out`` is
    the caller's input error (RuntimeError: one line, exit 2); preview has no --resume to advise."""
    try:
        if remote.is_remote(out):
            remote.write_bytes(out, page.encode("utf-8"))
        else:
            Path(out).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_doc(doc: DocView) -> str:
    head = f"<h2>{_e(doc.key)} <span class='kind'>{_e(doc.kind)}</span> <small>{_e(Path(doc.shard).name)}</small></h2>"
    banner = (
        f"<div class='rejected'>the loader rejects this sample: {_e(doc.rejected)}</div>"
        if doc.rejected
        else ""
    )
    parts = []
    for position, text in enumerate(doc.texts):
        figures = "".join(render_image(img) for img in doc.images if img.where == position)
        parts.append(
            f"{figures}<p class='s'>{_e(text)}</p>" if figures else f"<p class='s'>{_e(text)}</p>"
        )
    return (
        f"<article class='doc' data-key='{_e(doc.key)}' data-kind='{_e(doc.kind)}'"
        f" data-rejected='{_e(doc.rejected or '')}'>{head}{banner}{''.join(parts)}</article>"
    )


def render_image(image: ImageView) -> str:
    state = "kept" if image.kept else "dropped"
    label = f"sim {image.similarity:.2f}" if image.similarity is not None else str(image.name)
    if not image.kept:
        label += f" · {image.reason}"
    if image.best is not None:  # the drop was decided on the assigned sentence, not the best one
        sentence, similarity, other = image.best
        went = f", given to image {other}" if other is not None else ""
        label += f" (best {similarity:.2f} at sentence {sentence}{went})"
    fmt = sniff_format(image.data) if image.data else None
    if fmt in MIME:
        src = f"data:{MIME[fmt]};base64,{encode_base64(image.data)}"
        visual = f"<img src='{src}' alt='{_e(image.name)}'>"
    else:
        visual = "<div class='missing'>no image</div>"
    return (
        f"<figure class='img {state}' data-image-index='{image.index}' data-reason='{_e(image.reason or '')}'>"
        f"{visual}<figcaption>{_e(label)}</figcaption></figure>"
    )
