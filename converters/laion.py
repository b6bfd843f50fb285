"""LAION-style parquet -> image-text pair shards, downloaded by img2dataset and then checked by us.

img2dataset downloads into ``<out>/_work/_download`` (its incremental mode is the resume). Every finished
shard is then checked sample by sample (image sniffs as JPEG/PNG/WebP and decodes within the pixel
cap, caption is UTF-8, metadata passes the pair schema) and placed in ``<out>`` unchanged — hard-linked
from our own download folder (no second copy on disk), copied (or with ``link``, hard-linked) from an
adopted output — or, if any sample fails, rewritten without it. ``sizes.json``/``stats.json``/
``rejects.jsonl`` go beside the shards; every input row ends up written or counted with a reason.
Once the run succeeds the work folder (downloads, input copies) is removed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flamingo_data.converters.laion_shards import place_shard
from flamingo_data.core.extras import require_extra
from flamingo_data.core.stats import Stats
from flamingo_data.fetch.i2d_output import (
    check_finished,
    finished_shards,
    require_output,
    shard_rows,
)
from flamingo_data.fetch.i2d_run import DownloadOptions, run_img2dataset
from flamingo_data.images.stage import ImagePolicy
from flamingo_data.run.driver import ConversionPlan, run_conversion
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import (
    SETTINGS_FILE,
    OutputExistsError,
    RunOptions,
    Unit,
    UnitContext,
    all_done,
    drop_work,
    earlier_work,
    local_out,
    record_settings,
    upload_files,
    work_dir,
)
from flamingo_data.storage import remote
from flamingo_data.storage.atomic import write_atomic
from flamingo_data.storage.specs import SpecError, expand_specs

URL_NAMES = ("url", "image_url", "link", "img_url")
CAPTION_NAMES = ("text", "caption", "title", "alt", "alt_text")
WEB_ONLY_DIR = "_web_only"  # input copies: non-http(s) urls unfetchable, dates etc. as text
FETCHED_DIR = "_fetched"  # local copies of remote parquet inputs
LINKS_DIR = "_inputs"  # what img2dataset reads when there are several inputs: links, in order
# Names img2dataset itself writes into <key>.json: an extra column with one of them would clash.
I2D_META_KEYS = {"key", "url", "caption", "status", "error_message", "width", "height", "exif"}
I2D_META_KEYS |= {"original_width", "original_height", "sha256", "md5"}


# The longer side LAION images are brought down to when no resize option is given.
LAION_MAX_SIDE = 256


@dataclass(frozen=True)
class LaionOptions:
    url_col: str | None = None
    caption_col: str | None = None
    download: DownloadOptions = field(default_factory=DownloadOptions)
    # every image goes through the image stage: caps, keep or convert, resize
    policy: ImagePolicy = field(default_factory=lambda: ImagePolicy(max_side=LAION_MAX_SIDE))
    keep_columns: bool = True  # other parquet columns (similarity, punsafe, ...) go into <key>.json
    link: bool = False  # adopted output: hard-link good shards instead of copying them


def _output_settings(options: LaionOptions) -> dict[str, Any]:
    """What decides the shards: columns, the image policy, shard size, opt-outs. Not the
    parallelism or the fetch limits (timeouts, retries, size cap), which may change between an
    interrupted run and its resume."""
    download = asdict(options.download)
    for name in ("processes", "threads", "timeout", "retries", "max_bytes"):
        download.pop(name)
    return {
        "url_col": options.url_col,
        "caption_col": options.caption_col,
        "download": download,
        "policy": options.policy.as_settings(),
        "keep_columns": options.keep_columns,
    }


def column_names(parquet: str) -> list[str]:
    """The file's columns; a file that is not parquet is bad input (one line, exit 2), not a crash."""
    try:
        return pq.read_schema(parquet).names
    except (pa.ArrowException, OSError) as exc:
        raise SpecError(f"{parquet} is not a readable parquet file: {exc}") from exc


def detect_columns(parquet: str, url_col: str | None, caption_col: str | None) -> tuple[str, str]:
    """The url and caption columns: as given, or by common names (case-insensitive)."""
    columns = column_names(parquet)
    lower = {c.lower(): c for c in columns}
    url = url_col or next((lower[n] for n in URL_NAMES if n in lower), None)
    caption = caption_col or next((lower[n] for n in CAPTION_NAMES if n in lower), None)
    missing = [
        name
        for name, col in (("url", url), ("caption", caption))
        if col is None or col not in columns
    ]
    if missing:
        raise SpecError(
            f"cannot find the {' and '.join(missing)} column in {parquet}; its columns are: "
            f"{', '.join(columns)} (name them with `url_col` / `caption_col`)"
        )
    return url, caption


def input_columns(sources: list[str], options: LaionOptions) -> tuple[str, str, list[str]]:
    """(url, caption, extra columns to keep), the same for every file: img2dataset reads them all alike."""
    first = column_names(sources[0])
    for source in sources[1:]:
        if (columns := column_names(source)) != first:
            raise SpecError(
                f"{source} has other columns than {sources[0]}: "
                f"{', '.join(columns)} vs {', '.join(first)}"
            )
    url, caption = detect_columns(sources[0], options.url_col, options.caption_col)
    keep = options.keep_columns
    extra = [c for c in first if keep and c not in (url, caption) and c not in I2D_META_KEYS]
    schema = pq.read_schema(sources[0])
    if binary := [c for c in extra if _is_binary(schema.field(c).type)]:
        print(
            f"laion: bytes columns are not kept in <key>.json: {', '.join(binary)}", file=sys.stderr
        )
    return url, caption, [c for c in extra if c not in binary]


def _is_binary(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


def _needs_text(kind: pa.DataType) -> bool:
    """Values img2dataset's ``json.dumps`` of ``<key>.json`` cannot encode (dates, times,
    decimals): it would drop every downloaded row of the file, so they are kept as text."""
    return pa.types.is_temporal(kind) or pa.types.is_decimal(kind)


def convert_laion(
    parquet: str | list[str] | None,
    options: LaionOptions,
    run: RunOptions,
    *,
    from_img2dataset: str | None = None,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Download (or adopt) then check every sample; returns the stats also written to stats.json.
    Raises ``NothingWritten`` when no sample was written (see ``flamingo_data.run.outcome``).
    Downloading (no ``from_img2dataset``) needs the [download] extra: without it MissingExtra is
    raised before anything is written."""
    plan = plan_laion(parquet, options, run, from_img2dataset, overwrite)
    local = replace(run, out_dir=str(local_out(run.out_dir)))  # a remote out is filled at the end
    return run_conversion(plan, local, overwrite=overwrite, execution=execution)


def plan_laion(
    parquet: str | list[str] | None,
    options: LaionOptions,
    run: RunOptions,
    from_img2dataset: str | None,
    overwrite: bool,
) -> ConversionPlan:
    """One unit per finished img2dataset shard: checked, then placed in the output folder under
    its own name. The download (``before``) runs once the folder is ready, unless a --resume
    finds every shard it would give done (the run finished, and its downloads are gone); a remote
    out receives the shards and sidecars at the end (``after``)."""
    if from_img2dataset is None:
        require_extra("download", "convert_laion without from_img2dataset")
    out, folder, root = run.out_dir, local_out(run.out_dir), work_dir(run.out_dir)
    _check_earlier_run(out, folder, run.resume or overwrite)
    staging = Path(from_img2dataset) if from_img2dataset else root / "_download"
    if from_img2dataset is not None:
        require_output(staging, "from_img2dataset")

    def download(local: RunOptions, overwrite: bool) -> None:
        if overwrite:
            _clear_earlier_run(out, folder)
        if from_img2dataset is None:
            if local.resume:
                _fetch_remote_settings(out, folder)
            record_settings(folder, _output_settings(options), local.resume)
            sources = _local_inputs(parquet, root)
            columns = input_columns(sources, options)  # every file readable, alike
            expected = _shard_count(sources, options.download.samples_per_shard)
            if local.resume and all_done(local.out_dir, (f"{n:05d}" for n in range(expected))):
                return
            _download(sources, columns, root, staging, options)
            check_finished(staging, expected)

    def units(local: RunOptions) -> list[Unit]:
        return [Unit(t.stem, str(t), i) for i, t in enumerate(finished_shards(staging))]

    def publish(local: RunOptions) -> None:
        if remote.is_remote(out):
            sizes = json.loads((folder / "sizes.json").read_bytes())
            upload_files(folder, out, _published(folder, sizes))
            drop_work(out)

    adopted = from_img2dataset is not None
    return ConversionPlan(
        converter="laion",
        settings=_output_settings(options),
        units=units,
        convert_unit=partial(
            check_unit,
            policy=options.policy,
            how="copy" if adopted and not options.link else "link",
            samples_per_shard=None if adopted else options.download.samples_per_shard,
        ),
        before=download,
        after=publish,
        records="samples",
        read_from="rows",
    )


def check_unit(
    unit: Unit, ctx: UnitContext, policy: ImagePolicy, how: str, samples_per_shard: int | None
) -> None:
    """Count one img2dataset shard's rows, check its samples and place it (``place_shard``)."""
    tar = Path(unit.source)
    ctx.rejects.extend(shard_rows(tar, ctx.stats, samples_per_shard))
    result = place_shard(tar, ctx.out_dir, policy, how)
    ctx.stats.merge(Stats.from_json(result.stats))
    ctx.rejects.extend(result.rejects)
    if result.written:
        ctx.place(result.name, result.written)


def _check_earlier_run(out: str, folder: Path, allowed: bool) -> None:
    """An earlier run (its download folder or sizes.json, here or in a remote out) is only reused
    with resume or overwrite."""
    earlier = earlier_work(out, "_download") or (folder / "sizes.json").exists()
    if remote.is_remote(out):
        earlier = earlier or remote.exists(remote.join(out, "sizes.json"))
    if earlier and not allowed:
        raise OutputExistsError(f"{out} holds an earlier run: pass `resume` or `overwrite`")


def _clear_earlier_run(out: str, folder: Path) -> None:
    """What an earlier run left besides the unit outputs and the work folder (which the driver
    clears): img2dataset's sidecars, the settings file; in a remote out, its shards and sidecars."""
    for pattern in ("*.parquet", "*_stats.json", SETTINGS_FILE):
        for path in folder.glob(pattern):
            path.unlink()
    if remote.is_remote(out):
        for pattern in ("*.tar", "*.parquet", "*_stats.json", "*.json", "*.jsonl"):
            for path in remote.glob(remote.join(out, pattern)):
                remote.remove(path)


def _fetch_remote_settings(out: str, folder: Path) -> None:
    """A remote --out keeps its run's settings: the local work folder is removed once a run
    succeeds (or was on another machine), yet --resume must still refuse other options, or
    shards of two kinds (and stale ones, when the shard count changes) would mix in the bucket."""
    local = folder / SETTINGS_FILE
    if not remote.is_remote(out) or local.exists():
        return
    if (data := remote.read_if_exists(remote.join(out, SETTINGS_FILE))) is not None:
        write_atomic(local, data)


def _published(folder: Path, sizes: dict[str, int]) -> list[str]:
    """What a remote --out receives, in upload order: each shard with its img2dataset sidecars,
    then rejects, stats and settings, and sizes.json last (the file that says the set is complete)."""
    names = []
    for shard in sorted(sizes):
        stem = shard.removesuffix(".tar")
        names += [
            n for n in (shard, f"{stem}.parquet", f"{stem}_stats.json") if (folder / n).exists()
        ]
    sidecars = ("rejects.jsonl", "stats.json", SETTINGS_FILE, "sizes.json")
    return names + [n for n in sidecars if (folder / n).exists()]


def web_urls_only(source: str, url_col: str, target: Path, extra: Iterable[str] = ()) -> str:
    """``source`` when every url is http(s) (or empty); else a copy at ``target`` in which the other
    urls (``file://``, ``ftp://``, ``data:``) are prefixed with ``refused:``. img2dataset's urllib
    would read a ``file://`` url from this machine's disk into the shards; now it cannot open it,
    and the row is counted ``bad_url`` in its place, keys unchanged. The copy also holds the
    ``extra`` columns that need it as text (see ``_needs_text``) and float columns with NaN or
    ±Infinity as null (see ``_non_finite``)."""
    schema = pq.read_schema(source)
    text = [c for c in extra if _needs_text(schema.field(c).type)]
    floats = [c for c in extra if pa.types.is_floating(schema.field(c).type)]
    refused = _refused_urls(pq.read_table(source, columns=[url_col])[url_col])
    non_finite = _non_finite(pq.read_table(source, columns=floats)) if floats else {}
    if refused is None and not text and not non_finite:
        return source
    table = pq.read_table(source)
    if refused is not None:
        urls = _as_text(table[url_col])
        column = pc.if_else(refused, pc.binary_join_element_wise("refused:", urls, ""), urls)
        table = table.set_column(table.schema.get_field_index(url_col), url_col, column)
    for name in text:
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.cast(table[name], pa.string()))
    for name, mask in non_finite.items():
        index = table.schema.get_field_index(name)
        column = pc.if_else(mask, pa.scalar(None, table[name].type), table[name])
        table = table.set_column(index, name, column)
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target)
    return str(target)


def _non_finite(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    """Where float columns hold NaN or ±Infinity (LAION's ``punsafe``/``pwatermark`` can): JSON
    has no such values, yet img2dataset's ``json.dumps`` writes them into ``<key>.json``, which
    ``validate`` (and any strict JSON reader) refuses. They become null."""
    masks = {}
    for name in table.column_names:
        mask = pc.fill_null(pc.invert(pc.is_finite(table[name])), False)
        if pc.any(mask).as_py():
            masks[name] = mask
    return masks


def _refused_urls(urls: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Which non-empty urls are not http(s) (``is_web_url``'s rule); None when there are none or
    the column cannot be read as text (the fetch itself refuses those values)."""
    text = _as_text(urls)
    if text is None:
        return None
    lowered = pc.utf8_lower(text)
    web = pc.or_(pc.starts_with(lowered, "http://"), pc.starts_with(lowered, "https://"))
    refused = pc.fill_null(pc.and_(pc.greater(pc.utf8_length(text), 0), pc.invert(web)), False)
    return refused if pc.any(refused).as_py() else None


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """``column`` as UTF-8 strings whatever its arrow type (dictionary, large_string,
    string_view, binary, numbers), or None when it holds bytes that are not UTF-8."""
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _fetch_inputs(sources: list[str], folder: Path) -> list[str]:
    """Local copies of remote parquet files (url lists are small), named so their order is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    local = []
    for i, source in enumerate(sources):
        path = folder / f"{i:05d}.parquet"
        if remote.is_remote(source):
            write_atomic(path, remote.read_bytes(source))
            local.append(str(path))
        else:
            local.append(source)
    return local


def _local_inputs(parquet: Any, root: Path) -> list[str]:
    """The parquet inputs as local files (remote ones copied into the work folder ``root``)."""
    sources = expand_specs(parquet, folder_suffix=".parquet") if parquet else []
    if not sources:
        raise SpecError(f"no parquet file matches {parquet!r}")
    if any(remote.is_remote(s) for s in sources):  # pyarrow and img2dataset read them locally
        sources = _fetch_inputs(sources, root / FETCHED_DIR)
    return sources


def _shard_count(sources: list[str], per_shard: int) -> int:
    """How many shards img2dataset gives these inputs: each file's rows, ``per_shard`` a shard."""
    return sum(math.ceil(pq.ParquetFile(s).metadata.num_rows / per_shard) for s in sources)


def _download(
    sources: list[str],
    columns: tuple[str, str, list[str]],
    root: Path,
    staging: Path,
    options: LaionOptions,
) -> None:
    """Run img2dataset over the local ``sources`` (``columns`` as ``input_columns`` gives them),
    its input copies in the work folder ``root``."""
    url_col, caption_col, extra = columns
    sources = [
        web_urls_only(source, url_col, root / WEB_ONLY_DIR / f"{i:05d}.parquet", extra)
        for i, source in enumerate(sources)
    ]
    url_list = sources[0]
    if len(sources) > 1:  # img2dataset takes one file or one folder: link the inputs, in order
        inputs = root / LINKS_DIR
        inputs.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(sources):
            link = inputs / f"{i:05d}.parquet"
            link.unlink(missing_ok=True)  # an earlier run's link may point elsewhere
            link.symlink_to(Path(source).resolve())
        url_list = str(inputs)
    run_img2dataset(
        url_list,
        str(staging),
        url_col=url_col,
        caption_col=caption_col,
        extra_columns=extra,
        options=options.download,
    )
