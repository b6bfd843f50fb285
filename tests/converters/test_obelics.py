"""OBELICS-style documents (parquet in OBELICS's own schema, and the same documents as jsonl and
jsonl.gz) -> interleaved shards: every bad shape counted with its reason, images fetched by a real
img2dataset run from a local server or read from an existing img2dataset output, and every output
passing ``validate --deep``, our loader and open_flamingo's own MMC4 steps with every image placed."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.converters.obelics import ObelicsOptions, convert_obelics
from flamingo_data.errors import SpecError
from flamingo_data.fetch.url_images import UrlImages
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from tests.conftest import LocalServer, Route, serve
from tests.test_upstream_compat import (
    UPSTREAM_MIN_BYTES,
    assert_upstream_reads_what_we_plan,
    photo_like,
    read_like_open_flamingo,
    records,
    shards_of,
    write_img2dataset_output,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema(  # OBELICS's parquet schema, columns in its order
    [
        ("images", pa.list_(pa.string())),
        ("metadata", pa.string()),
        ("general_metadata", pa.string()),
        ("texts", pa.list_(pa.string())),
    ]
)
ONE = Execution(processes=1, progress=False)
IMAGES = {"a.jpg": ("JPEG", 1), "b.png": ("PNG", 2), "c.jpg": ("JPEG", 3), "d.jpg": ("JPEG", 4)}


def image_meta(url: str) -> dict[str, Any]:
    return {"src": url, "alt_text": "a picture", "original_width": 200, "original_height": 160}


def document(page: str, parts: list[tuple[str, str]]) -> dict[str, Any]:
    """An OBELICS document from ("image", url) / ("text", text) parts, metadata as objects."""
    return {
        "images": [value if kind == "image" else None for kind, value in parts],
        "metadata": [image_meta(value) if kind == "image" else None for kind, value in parts],
        "general_metadata": {
            "url": page,
            "warc_filename": "crawl.warc.gz",
            "warc_record_offset": 7,
        },
        "texts": [value if kind == "text" else None for kind, value in parts],
    }


def documents(url: dict[str, str]) -> list[dict[str, Any]]:
    """Good documents and every bad shape OBELICS's schema can hold, in row order."""
    good = document(
        "https://example.org/cats",
        [
            ("image", url["a.jpg"]),
            ("text", "A cat on a mat."),
            ("image", url["b.png"]),
            ("image", url["c.jpg"]),
            ("text", "Two more cats."),
        ],
    )
    ends = document("https://example.org/end", [("text", "Look:"), ("image", url["d.jpg"])])
    lost = document(
        "https://example.org/lost",
        [("text", "Before."), ("image", url["gone"]), ("text", "After."), ("image", url["a.jpg"])],
    )
    local = document("https://example.org/local", [("text", "x"), ("image", "file:///etc/passwd")])
    both = document("https://example.org/both", [("text", "t"), ("image", url["a.jpg"])])
    both["texts"][1] = "also text"
    empty = document("https://example.org/empty", [("text", "t"), ("image", url["a.jpg"])])
    empty["images"][1] = None
    mismatch = document("https://example.org/mismatch", [("text", "t"), ("image", url["a.jpg"])])
    mismatch["texts"].append("one more")
    bad_meta = document("https://example.org/meta", [("text", "t"), ("image", url["a.jpg"])])
    bad_meta["metadata"] = "[{not json"
    return [
        good,
        ends,
        lost,
        local,
        document("https://example.org/no-text", [("image", url["a.jpg"])]),
        document("https://example.org/blank", [("text", "  "), ("image", url["b.png"])]),
        document("https://example.org/no-image", [("text", "Only words.")]),
        both,
        empty,
        mismatch,
        bad_meta,
    ]


SHAPE_REASONS = {  # documents reasons of every file, in documents() order after the good three
    "no_images": 2,  # the file:// url (bad_url), and the text-only one
    "no_text": 2,
    "position_both": 1,
    "position_empty": 1,
    "length_mismatch": 1,
    "bad_metadata": 1,
}
JSONL_ONLY = ["{not json", "[1, 2]", json.dumps({"images": "x", "texts": ["t"]})]
JSONL_REASONS = {"bad_json": 1, "not_an_object": 1, "bad_fields": 1}


def as_strings(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as OBELICS's parquet holds it: metadata fields as JSON strings."""
    out = dict(doc)
    for name in ("metadata", "general_metadata"):
        if not isinstance(out[name], str):
            out[name] = json.dumps(out[name])
    return out


def write_inputs(root: Path, url: dict[str, str]) -> Path:
    """docs/obelics.parquet (row groups of 4), docs/lines.jsonl (metadata as objects, plus bad
    lines and a blank one) and docs/packed.jsonl.gz (metadata as JSON strings)."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    rows = [as_strings(d) for d in documents(url)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, docs / "obelics.parquet", row_group_size=4)
    lines = [json.dumps(d) for d in documents(url)] + ["", *JSONL_ONLY]
    (docs / "lines.jsonl").write_text("\n".join(lines) + "\n")
    packed = "\n".join(json.dumps(r) for r in rows) + "\n"
    (docs / "packed.jsonl.gz").write_bytes(gzip.compress(packed.encode()))
    return docs


def serve_images(server: LocalServer) -> tuple[dict[str, str], dict[str, bytes]]:
    """url and bytes of each picture (all over upstream's 11,000 bytes), and a 404 url."""
    url, data = {}, {}
    for name, (fmt, seed) in IMAGES.items():
        data[name] = photo_like(seed, 200, 160, fmt)
        assert len(data[name]) > UPSTREAM_MIN_BYTES
        server.routes[f"/{name}"] = Route(data[name], f"image/{fmt.lower()}")
        url[name] = server.url(name)
    server.routes["/gone.jpg"] = Route(b"not here", "text/html", status=404)
    url["gone"] = server.url("gone.jpg")
    return url, data


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "flamingo_data", "convert", "obelics", *args, "--no-progress"]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    generator = serve()
    yield next(generator)
    generator.close()


def existing_output(folder: Path, url: dict[str, str], data: dict[str, bytes]) -> None:
    """An img2dataset output of the pictures written directly (what a download of ``url`` gives,
    the dead url failed with img2dataset's 404 message), so most tests need no download."""
    rows = [(url[name], "", data[name], name.rsplit(".", 1)[1]) for name in IMAGES]
    write_img2dataset_output(folder, [*rows, (url["gone"], "", None, "jpg")])
    table = pq.read_table(folder / "00000.parquet").to_pandas()
    table.loc[table["url"] == url["gone"], "error_message"] = "HTTP Error 404: Not Found"
    table.to_parquet(folder / "00000.parquet")


@pytest.fixture(scope="module")
def sources(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three document files, their pictures served, and an img2dataset output of them."""
    root = tmp_path_factory.mktemp("obelics")
    url, data = serve_images(server)
    existing_output(root / "i2d", url, data)
    return {"root": root, "docs": write_inputs(root, url), "url": url, "data": data}


@pytest.fixture(scope="module")
def converted(sources: dict[str, Any]) -> dict[str, Any]:
    """One run over the three files, images read by url from the existing output, --rejects."""
    out = sources["root"] / "out"
    stats = convert_obelics(
        str(sources["docs"]),
        ObelicsOptions(images=UrlImages(str(sources["root"] / "i2d"))),
        RunOptions(out_dir=str(out), converter="obelics", write_rejects=True),
        execution=ONE,
    ).to_json()
    return {**sources, "out": out, "stats": stats}


def test_every_bad_shape_is_counted_with_its_reason(converted) -> None:
    stats = converted["stats"]
    reasons = stats["reasons"]["documents"]
    want = {r: 3 * n for r, n in SHAPE_REASONS.items()} | JSONL_REASONS
    assert reasons == want
    assert stats["counts"]["documents"] == {"in": 3 * 11 + 3, "written": 3 * 3, "rejected": 27}
    # per file: a, b, c | d | gone, a | file:// ; only shapes whose images are looked at count
    assert stats["reasons"]["images"] == {"http_404": 3, "bad_url": 3}
    images = stats["counts"]["images"]
    assert images["in"] == 3 * (3 + 1 + 2 + 1)  # documents rejected for their shape: none looked at
    assert images["found"] == images["kept"] == 3 * (3 + 1 + 1)
    assert stats["counts"]["units"]["done"] == 3
    # each distinct http(s) url once, whatever the number of files and documents naming it
    assert (stats["counts"]["urls"], stats["reasons"]["urls"]) == (
        {"in": 5, "fetched": 4, "rejected": 1},
        {"http_404": 1},
    )


def test_each_image_owns_the_sentence_after_it_and_metadata_is_kept(converted) -> None:
    out = converted["out"]
    written = records(out)
    assert sorted(written) == sorted(
        f"{unit}-{row:07d}" for unit in ("obelics", "lines", "packed") for row in (1, 2, 3)
    )
    url, data = converted["url"], converted["data"]
    for unit in ("obelics", "lines", "packed"):
        good = written[f"{unit}-0000001"]
        assert good["text_list"] == ["A cat on a mat.", "\n", "Two more cats."]
        assert [i["matched_text_index"] for i in good["image_info"]] == [0, 1, 2]
        assert [i["raw_url"] for i in good["image_info"]] == [url[n] for n in IMAGES if n < "d"]
        assert good["similarity_matrix"] == [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
        assert good["url"] == "https://example.org/cats"
        assert good["general_metadata"]["warc_record_offset"] == 7
        assert good["image_info"][1]["metadata"] == image_meta(url["b.png"])
        assert [i["image_name"] for i in good["image_info"]] == [
            "image-00000",
            "image-00002",
            "image-00003",
        ]
        ends = written[f"{unit}-0000002"]
        assert ends["text_list"] == ["Look:", "\n"]
        assert ends["image_info"][0]["matched_text_index"] == 1
        lost = written[f"{unit}-0000003"]  # its 404 image is left out, with no sentence of its own
        assert lost["text_list"] == ["Before.", "After.", "\n"]
        assert [(i["raw_url"], i["matched_text_index"]) for i in lost["image_info"]] == [
            (url["a.jpg"], 2)
        ]
    first = written["obelics-0000001"]["image_info"][0]["image_base64"]
    assert base64.b64decode(first) == data["a.jpg"]  # the fetched bytes, kept as they are


def test_outputs_pass_validate_deep_and_open_flamingo_keeps_every_image(converted) -> None:
    out = converted["out"]
    report = validate_shards(str(out), deep=True)
    assert report.ok, report.to_json()
    read, drops = read_like_open_flamingo(shards_of(out))
    assert not drops
    written = records(out)
    assert read == {
        key: {(i, info["matched_text_index"]) for i, info in enumerate(r["image_info"])}
        for key, r in written.items()
    }
    assert sum(len(pairs) for pairs in read.values()) == 3 * 5
    assert (
        assert_upstream_reads_what_we_plan(out) == read
    )  # our loader's plan agrees, pair for pair


def test_our_loader_places_every_image(converted) -> None:
    pytest.importorskip("torch")
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    out = converted["out"]
    tokenizer = make_tokenizer(None)
    config = LoaderConfig(batch_size=9, image_size=32, shuffle_shards=False, max_images=4)
    [batch] = list(build_loader([DatasetSpec("o", str(out))], tokenizer, config))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    placed = {
        key: int((batch["lang_x"][i] == image_id).sum()) for i, key in enumerate(batch["keys"])
    }
    written = records(out)
    assert placed == {key: len(r["image_info"]) for key, r in written.items()}


def test_rejects_list_the_images_not_embedded_with_their_document_fate(converted) -> None:
    url = converted["url"]
    lines = [json.loads(x) for x in (converted["out"] / "rejects.jsonl").read_text().splitlines()]
    images = sorted((r["key"], r["reason"], r["document"]) for r in lines if r["kind"] == "images")
    assert images == sorted(
        [(f"{u}-0000003/1", "http_404", "written") for u in ("obelics", "lines", "packed")]
        + [(f"{u}-0000004/1", "bad_url", "rejected") for u in ("obelics", "lines", "packed")]
    )
    assert {r["url"] for r in lines if r.get("reason") == "http_404"} == {url["gone"]}


@pytest.mark.slow  # img2dataset's processes take seconds to start
def test_cli_download_images_fetches_each_url_and_gives_the_same_records(
    converted, server: LocalServer, tmp_path: Path
) -> None:
    """A real CLI run with --download-images from the local server: each distinct url fetched once
    into --images (an img2dataset output), then the same records and reasons as from an existing
    output; a --resume of the finished run fetches nothing."""
    before = dict(server.hits)
    args = [
        "--docs",
        str(converted["docs"]),
        "--images",
        str(tmp_path / "i2d"),
        "--download-images",
    ]
    args += ["--threads", "2", "--timeout", "5", "--retries", "0", "--processes", "1"]
    result = cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "obelics: 9 of 36 documents written into 3 shards" in result.stdout
    fetched = {path: n - before.get(path, 0) for path, n in server.hits.items()}
    assert fetched == {f"/{name}": 1 for name in [*IMAGES, "gone.jpg", "robots.txt"]}
    assert records(tmp_path / "out") == records(converted["out"])
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == converted["stats"]
    again = cli(*args, "--out", str(tmp_path / "out"), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(server.hits.values()) == sum(before.values()) + len(fetched)


def local_images(folder: Path) -> dict[str, str]:
    """An img2dataset output written directly (no download): two pictures and a failed url."""
    url = {name: f"http://127.0.0.1:9/{name}" for name in ("a.jpg", "b.png", "gone")}
    rows = [
        (url["a.jpg"], "", photo_like(1, 200, 160), "jpg"),
        (url["b.png"], "", photo_like(2, 200, 160, "PNG"), "png"),
        (url["gone"], "", None, "jpg"),
    ]
    write_img2dataset_output(folder, rows)
    return url


def convert(tmp_path: Path, docs: Path, images: Path, **options: Any) -> dict[str, Any]:
    return convert_obelics(
        str(docs),
        ObelicsOptions(images=UrlImages(str(images)), **options),
        RunOptions(out_dir=str(tmp_path / "out"), converter="obelics", write_rejects=True),
        execution=ONE,
    ).to_json()


def test_unreadable_files_are_unit_rejects_and_the_rest_converts(tmp_path: Path) -> None:
    url = local_images(tmp_path / "i2d")
    docs = tmp_path / "docs"
    docs.mkdir()
    good = as_strings(document("https://e.org", [("text", "t"), ("image", url["a.jpg"])]))
    pq.write_table(pa.Table.from_pylist([good], schema=SCHEMA), docs / "good.parquet")
    (docs / "html.parquet").write_text("<html>not parquet</html>")
    pq.write_table(pa.table({"texts": [["t"]]}), docs / "textonly.parquet")
    line = (json.dumps(good) + "\n").encode()
    (docs / "cut.jsonl.gz").write_bytes(gzip.compress(line * 3)[:-12])
    stats = convert(tmp_path, docs, tmp_path / "i2d")
    assert stats["reasons"]["units"] == {
        "unreadable_parquet": 1,
        "missing_columns": 1,
        "truncated_stream": 1,
    }
    assert stats["counts"]["documents"] == {
        "in": 1 + 2,
        "written": 1 + 2,
    }  # the cut file's whole lines


def test_missing_images_keep_and_drop_options(tmp_path: Path) -> None:
    url = local_images(tmp_path / "i2d")
    docs = [
        document(
            "https://e.org/1", [("text", "t"), ("image", url["a.jpg"]), ("image", url["gone"])]
        ),
        document("https://e.org/2", [("text", "t"), ("image", url["gone"])]),
        document("https://e.org/3", [("text", "t"), ("image", url["b.png"])]),
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    plain = convert(tmp_path / "plain", tmp_path / "d.jsonl", tmp_path / "i2d")
    assert plain["reasons"]["documents"] == {"no_images": 1}
    assert plain["reasons"]["images"] == {"failed_to_download": 2}
    dropping = convert(
        tmp_path / "drop",
        tmp_path / "d.jsonl",
        tmp_path / "i2d",
        drop_docs_with_missing_images=True,
    )
    assert dropping["reasons"]["documents"] == {"missing_images": 1, "no_images": 1}
    keeping = convert(
        tmp_path / "keep", tmp_path / "d.jsonl", tmp_path / "i2d", keep_docs_without_images=True
    )
    assert keeping["counts"]["documents"]["written"] == 3
    text_only = records(tmp_path / "keep" / "out")["d-0000002"]
    assert (text_only["text_list"], text_only["image_info"]) == (["t"], [])


def test_an_image_folder_without_a_finished_shard_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps(document("u", [("text", "t")])) + "\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no finished img2dataset shard"):
        convert(tmp_path, tmp_path / "d.jsonl", tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_cli_names_a_missing_input_in_one_line(tmp_path: Path) -> None:
    local_images(tmp_path / "i2d")
    args = ["--docs", str(tmp_path / "absent.parquet"), "--images", str(tmp_path / "i2d")]
    result = cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "absent.parquet names no document file (--docs)" in result.stderr
    assert list((tmp_path / "out").rglob("*")) == []  # the CLI's writable check made it only


def test_text_metadata_is_kept_one_entry_per_sentence() -> None:
    """A text position's metadata entry, when not null, is kept aligned with ``text_list`` (null
    for the sentences images own); without any, the record has no ``text_metadata``."""
    from flamingo_data.converters.obelics_docs import check_document, interleaved_record

    doc = {
        "images": ["http://x/1", "http://x/2", None],
        "texts": [None, None, "words"],
        "metadata": json.dumps([None, {"src": "http://x/2"}, {"lang": "en"}]),
        "general_metadata": json.dumps({"url": 7}),  # not a string: the record has no url
    }
    checked = check_document(doc)
    record = interleaved_record(checked, {0: b"one", 1: b"two"})
    assert record["text_list"] == ["\n", "words"]
    assert record["text_metadata"] == [None, {"lang": "en"}]
    assert [i["matched_text_index"] for i in record["image_info"]] == [0, 1]
    assert "metadata" not in record["image_info"][0]
    assert "url" not in record and record["general_metadata"] == {"url": 7}
    plain = dict(doc, metadata=None)
    assert "text_metadata" not in interleaved_record(check_document(plain), {0: b"one"})
