"""Hostile input on the fetch paths: only http(s) is ever fetched (whatever the url column's type),
Ctrl-C during an img2dataset download exits 130 and resumes, img2dataset sidecars are input
(one line or a counted reject, never a traceback), and a missing caption is counted, never "nan".
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.laion import LaionOptions, convert_laion, web_urls_only
from flamingo_data.converters.laion_shards import check_sample, finite_json
from flamingo_data.demo.sample_data import make_image
from flamingo_data.fetch.i2d_output import failure_reason
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.fetch.i2d_worker import download_image
from flamingo_data.fetch.web import RefusedUrl, fetch, web_only_opener
from flamingo_data.images.stage import ImagePolicy
from flamingo_data.run.units import RunOptions
from tests.conftest import Route, serve

FAST = DownloadOptions(processes=1, threads=4, timeout=5, retries=0, samples_per_shard=8)
SECRET = make_image(4, 40, 30, fmt="PNG")


@pytest.fixture(scope="module")
def server():
    generator = serve()
    state = next(generator)
    yield state
    generator.close()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.png"
    path.write_bytes(SECRET)
    return path


def hostile_urls(secret: Path) -> list[str]:
    """Every way of naming a non-http(s) resource the task lists; the first ones name ``secret``."""
    uri = secret.as_uri()  # file:///.../secret.png
    return [
        uri,
        uri.replace("file://", "FILE://"),
        uri.replace("file://", "File://"),
        " " + uri,
        "\t" + uri,
        "<URL:" + uri + ">",  # urllib unwraps this form
        "file:" + str(secret),
        "file://localhost" + str(secret),
        "data:image/png;base64,iVBORw0KGgo=",
        "ftp://127.0.0.1:9/x.jpg",
        "jar:file://" + str(secret) + "!/x",
        "//127.0.0.1/x.jpg",
        "javascript:alert(1)",
        "",
    ]


# --- 1. only http(s) is ever fetched: at the fetch itself, for every caller --------------------


@pytest.mark.parametrize("index", range(14))
def test_fetch_refuses_every_non_http_url_before_any_request(secret: Path, index: int) -> None:
    url = hostile_urls(secret)[index]
    with pytest.raises(RefusedUrl, match="non-http"):
        fetch(url, timeout=5, max_bytes=1 << 20, headers={})


@pytest.mark.parametrize("value", [b"file:///etc/hostname", None, 3.5, float("nan"), 7])
def test_fetch_refuses_a_url_that_is_not_text(value: object) -> None:
    """img2dataset hands the column's values over as they are: bytes, null, numbers."""
    with pytest.raises(RefusedUrl, match="non-http"):
        fetch(value, timeout=5, max_bytes=1 << 20, headers={})  # type: ignore[arg-type]


@pytest.mark.parametrize("index", range(10))  # the others were refused by urllib already
def test_img2dataset_workers_count_a_refused_url_as_bad_url(secret: Path, index: int) -> None:
    url = hostile_urls(secret)[index]
    key, body, message = download_image((7, url), 5, None, None, max_bytes=1 << 20)
    assert (key, body) == (7, None) and failure_reason(message, "failed_to_download") == "bad_url"


@pytest.mark.parametrize(
    "url", ["file:///etc/hostname", "ftp://127.0.0.1:9/x", "data:text/plain,secret"]
)
def test_the_opener_has_no_handler_for_other_schemes(url: str) -> None:
    """Even a caller that skipped the check could not read a local file through it."""
    from flamingo_data.fetch.web import _Deadline

    with pytest.raises(Exception, match="unknown url type"):
        web_only_opener(_Deadline()).open(url, timeout=5)


# --- the early column check handles every arrow type ------------------------------------------


def _url_columns(urls: list[str]) -> dict[str, pa.ChunkedArray]:
    text = pa.array(urls, pa.string())
    columns = {
        "string": pa.chunked_array([text]),
        "large_string": pa.chunked_array([text.cast(pa.large_string())]),
        "dictionary": pa.chunked_array([text.dictionary_encode()]),
        "chunked_dictionary": pa.chunked_array(
            [text[:2].dictionary_encode(), text[2:].dictionary_encode()]
        ),
        "binary": pa.chunked_array([text.cast(pa.binary())]),
        "large_binary": pa.chunked_array([text.cast(pa.large_binary())]),
    }
    if hasattr(pa, "string_view"):
        columns["string_view"] = pa.chunked_array([text.cast(pa.string_view())])
    return columns


KINDS = (  # plain string columns were checked already
    "large_string",
    "dictionary",
    "chunked_dictionary",
    "binary",
    "large_binary",
    "string_view",
)


@pytest.mark.parametrize("kind", KINDS)
def test_the_input_copy_refuses_non_http_urls_of_any_column_type(
    secret: Path, tmp_path: Path, kind: str
) -> None:
    hostile = [u for u in hostile_urls(secret) if u]
    urls = ["http://127.0.0.1:9/a.jpg", *hostile, "HTTPS://127.0.0.1:9/b.jpg"]
    columns = _url_columns(urls)
    if kind not in columns:
        pytest.skip("this pyarrow has no string_view")
    table = pa.table({"url": columns[kind], "caption": [f"c{i}" for i in range(len(urls))]})
    pq.write_table(table, tmp_path / "in.parquet")
    copy = web_urls_only(str(tmp_path / "in.parquet"), "url", tmp_path / "copy.parquet")
    got = [str(u) for u in pq.read_table(copy)["url"].cast(pa.string()).to_pylist()]
    assert got[0] == urls[0] and got[-1] == urls[-1]  # web urls unchanged, rows in place
    assert all(u.startswith("refused:") for u in got[1:-1])


# --- end to end through img2dataset: dictionary-encoded urls + NaN captions --------------------


def read_tars(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> members over every shard of ``out``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_laion_with_a_category_url_column_and_nan_captions_never_reads_local_files(
    server, secret: Path, tmp_path: Path
) -> None:
    """A pandas ``category`` url column (dictionary-encoded in parquet) carried ``file://`` urls
    past the scheme check: the local image became a training sample. A float caption column
    wrote NaN as the text "nan"."""
    server.add_image("web0.jpg", seed=10)
    server.add_image("web1.jpg", seed=11)
    hostile = [u for u in hostile_urls(secret)[:8]]
    urls = [server.url("web0.jpg"), *hostile, "file:///etc/hostname"]
    frame = pd.DataFrame({"url": pd.Categorical(urls), "caption": [f"c{i}" for i in urls]})
    frame["caption"] = ["web caption", *[f"secret {i}" for i in range(len(urls) - 1)]]
    frame.to_parquet(tmp_path / "part-00000.parquet")
    nan_rows = pd.DataFrame(
        {"url": [server.url("web1.jpg"), server.url("web0.jpg")], "caption": [np.nan, 5.0]}
    )
    nan_rows.to_parquet(tmp_path / "part-00001.parquet")
    stats = convert_laion(
        str(tmp_path / "part-{00000..00001}.parquet"),
        LaionOptions(download=FAST),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion", write_rejects=True),
    ).to_json()
    samples = read_tars(tmp_path / "out")
    assert [m["txt"] for m in samples.values()] == [b"web caption"]
    assert all(SECRET not in b"".join(m.values()) for m in samples.values())
    assert stats["reasons"]["rows"] == {"bad_url": len(urls) - 1}
    assert stats["reasons"]["samples"] == {"missing_caption": 2}
    assert stats["counts"]["samples"] == {"in": 3, "written": 1, "rejected": 2}
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "nan" not in [json.loads(line).get("caption") for line in rejects.splitlines()]
    assert validate_shards(str(tmp_path / "out")).ok


# --- 4. a caption that is not text is counted, never written as "nan" -------------------------


@pytest.mark.parametrize(
    ("caption_json", "txt"),
    [("NaN", b"nan"), ("null", b""), ("null", b"None"), ("1.5", b"1.5"), ("[1]", b"[1]")],
)
def test_a_caption_that_is_not_text_is_missing_caption(caption_json: str, txt: bytes) -> None:
    """As the shard scan sees it: NaN already made null (``finite_json``), then checked."""
    meta = f'{{"url": "http://x/a.jpg", "key": "000000000", "caption": {caption_json}}}'.encode()
    members = {"jpg": make_image(1, 32, 24), "txt": txt, "json": finite_json(meta) or meta}
    assert check_sample(members, ImagePolicy(max_pixels=10**8)).reason == "missing_caption"


# --- 3. sidecars are input too ----------------------------------------------------------------


def make_i2d_output(folder: Path, extra_members: dict[str, bytes] | None = None) -> None:
    """A one-shard img2dataset output as img2dataset writes it (2 good rows, 1 failed)."""
    folder.mkdir(parents=True)
    keys = ["000000000", "000000001", "000000002"]
    urls = [f"http://127.0.0.1:9/{k}.jpg" for k in keys]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, key in enumerate(keys[:2]):
            meta = {"url": urls[i], "caption": f"caption {i}", "key": key, "status": "success"}
            members = {"jpg": make_image(i, 32, 24), "txt": f"caption {i}".encode()}
            members["json"] = json.dumps(meta).encode()
            members.update(extra_members or {})
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pd.DataFrame(
        {
            "url": urls,
            "key": keys,
            "status": ["success", "success", "failed_to_download"],
            "error_message": [None, None, "HTTP Error 404: Not Found"],
        }
    ).to_parquet(folder / "00000.parquet")
    stats = {"count": 3, "successes": 2, "status_dict": {"success": 2, "HTTP Error 404": 1}}
    (folder / "00000_stats.json").write_text(json.dumps(stats))


def break_parquet(path: Path, how: str) -> None:
    frame = pd.read_parquet(path)
    if how.startswith("missing_"):
        frame = frame.drop(columns=[how.removeprefix("missing_")])
    elif how == "int_key":
        frame["key"] = range(len(frame))
    elif how == "list_status":
        frame["status"] = [["success"]] * len(frame)
    if how == "not_parquet":
        path.write_bytes(b"PAR1 this is not a parquet file")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    else:
        frame.to_parquet(path)


def break_stats(path: Path, how: str) -> None:
    text = path.read_text()
    broken = {
        "truncated": text[: len(text) // 2],
        "empty": "",
        "not_json": "count: 3",
        "a_list": "[3, 2]",
        "count_text": json.dumps({"count": "3", "successes": 2, "status_dict": {}}),
        "count_negative": json.dumps({"count": -1, "successes": 2, "status_dict": {}}),
        "successes_float": json.dumps({"count": 3, "successes": 2.5, "status_dict": {}}),
        "status_dict_list": json.dumps({"count": 3, "successes": 2, "status_dict": []}),
        "status_count_text": json.dumps({"count": 3, "successes": 2, "status_dict": {"x": "1"}}),
    }
    if how == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_text(broken[how])


PARQUET_BREAKS = [
    "missing_url",
    "missing_key",
    "missing_status",
    "missing_error_message",
    "int_key",
    "list_status",
    "not_parquet",
    "empty",
    "directory",
]
STATS_BREAKS = [
    "truncated",
    "empty",
    "not_json",
    "a_list",
    "count_text",
    "count_negative",
    "successes_float",
    "status_dict_list",
    "status_count_text",
    "directory",
]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("sidecar", "how"),
    [("parquet", h) for h in PARQUET_BREAKS] + [("stats", h) for h in STATS_BREAKS],
)
def test_laion_adopting_an_output_with_a_broken_sidecar_is_one_line(
    tmp_path: Path, capsys, sidecar: str, how: str
) -> None:
    make_i2d_output(tmp_path / "i2d")
    if sidecar == "parquet":
        break_parquet(tmp_path / "i2d" / "00000.parquet", how)
    else:
        break_stats(tmp_path / "i2d" / "00000_stats.json", how)
    argv = ["convert", "laion", "--from-img2dataset", str(tmp_path / "i2d")]
    code, err = _cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "00000" in err, err


@pytest.mark.parametrize(
    ("sidecar", "how"),
    [("parquet", h) for h in ("missing_url", "int_key", "not_parquet", "directory")]
    + [("stats", h) for h in ("truncated", "a_list", "count_text")],
)
def test_chatgpt_images_from_an_output_with_a_broken_sidecar_is_one_line(
    tmp_path: Path, capsys, sidecar: str, how: str
) -> None:
    make_i2d_output(tmp_path / "i2d")
    if sidecar == "parquet":
        break_parquet(tmp_path / "i2d" / "00000.parquet", how)
    else:
        break_stats(tmp_path / "i2d" / "00000_stats.json", how)
    sequence = {
        "example": "a _!_IMAGE1_!_",
        "image_map": {"_!_IMAGE1_!_": {"url": "http://127.0.0.1:9/000000000.jpg"}},
    }
    (tmp_path / "s.json").write_text(json.dumps([sequence]))
    argv = ["convert", "chatgpt", "--sequences", str(tmp_path / "s.json")]
    argv += ["--images-from", str(tmp_path / "i2d"), "--out", str(tmp_path / "out")]
    code, err = _cli([*argv, "--no-progress"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "00000" in err, err


@pytest.mark.parametrize(
    "extra",
    [
        {"pickle": b"\x80\x04K\x01."},
        {"pickle": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."},
        {"npy": b"\x93NUMPY"},
        {"cls": b"3", "pickle": b"\x80\x04N."},
    ],
)
def test_an_adopted_shard_keeps_only_documented_members(
    tmp_path: Path, capsys, extra: dict[str, bytes]
) -> None:
    """img2dataset outputs can carry ``.pickle`` (and other) members: the placed shard must be
    one ``validate`` passes, and nothing is unpickled."""
    make_i2d_output(tmp_path / "i2d", extra)
    out = tmp_path / "out"
    argv = ["convert", "laion", "--from-img2dataset", str(tmp_path / "i2d"), "--out", str(out)]
    code, err = _cli(argv, capsys)
    assert code == 0, err
    samples = read_tars(out)
    assert sorted(samples) == ["000000000", "000000001"]
    assert all(set(m) == {"jpg", "txt", "json"} for m in samples.values())
    assert validate_shards(str(out)).ok
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["samples"] == {"in": 2, "written": 2}
    assert stats["reasons"]["members"] == {"unexpected_member": 2 * len(extra)}
    assert not Path("/tmp/pwned").exists()


# --- 2. Ctrl-C during an img2dataset download: exit 130, one line, --resume completes ----------


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)


def _interrupt_while_downloading(
    command: list[str], server, slow: str
) -> subprocess.CompletedProcess:
    """Run ``command``; once the server is serving ``slow`` (held open), Ctrl-C the process
    group as a terminal does."""
    server.hits.pop(slow, None)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for(lambda: server.hits.get(slow, 0) > 0 or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _assert_interrupted(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 130, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    flagged = [line for line in lines if line.startswith("flamingo-data:")]
    assert flagged == [
        "flamingo-data: interrupted; committed units are kept, rerun with --resume"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr


def _flamingo(*args: str) -> list[str]:
    return [sys.executable, "-m", "flamingo_data", *args]


DOWNLOAD_FLAGS = ["--threads", "2", "--timeout", "60", "--retries", "0"]


@pytest.mark.slow
def test_ctrl_c_during_convert_laion_exits_130_and_resume_completes(server, tmp_path: Path):
    """img2dataset's own SIGINT handler called ``sys.exit(0)``: exit 0, a traceback, no
    sizes.json. The resumed run holds what an uninterrupted one does: every row, in its place."""
    served = {f"pair {i}": server.add_image(f"laion{i}.jpg", seed=20 + i) for i in range(3)}
    served["pair 3"] = make_image(23)
    server.routes["/laion-slow.jpg"] = Route(served["pair 3"], "image/jpeg", delay_s=600)
    urls = [server.url(f"laion{i}.jpg") for i in range(3)] + [server.url("laion-slow.jpg")]
    pd.DataFrame({"url": urls, "caption": list(served)}).to_parquet(tmp_path / "in.parquet")
    command = ["convert", "laion", "--parquet", str(tmp_path / "in.parquet"), *DOWNLOAD_FLAGS]
    command = _flamingo(*command, "--out", str(tmp_path / "out"))
    _assert_interrupted(_interrupt_while_downloading(command, server, "/laion-slow.jpg"))
    assert not (tmp_path / "out" / "sizes.json").exists()
    server.routes["/laion-slow.jpg"].delay_s = 0
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 4}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["counts"]["rows"] == {"in": 4, "downloaded": 4}
    samples = read_tars(tmp_path / "out")
    assert sorted(samples) == [f"00000{i:04d}" for i in range(4)]  # keys from the rows
    assert [samples[key]["txt"].decode() for key in sorted(samples)] == list(served)
    assert validate_shards(str(tmp_path / "out")).ok


@pytest.mark.slow
def test_ctrl_c_during_convert_chatgpt_exits_130_and_resume_completes(server, tmp_path: Path):
    """The same for the GPT converter: the resumed run embeds every image, original bytes."""
    served = {f"gpt{i}.jpg": server.add_image(f"gpt{i}.jpg", seed=30 + i) for i in range(2)}
    served["gpt-slow.jpg"] = make_image(33)
    server.routes["/gpt-slow.jpg"] = Route(served["gpt-slow.jpg"], "image/jpeg", delay_s=600)
    sequences = [
        {"example": f"{n} _!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {"url": server.url(n)}}}
        for n in served
    ]
    (tmp_path / "s.json").write_text(json.dumps(sequences))
    command = ["convert", "chatgpt", "--sequences", str(tmp_path / "s.json"), *DOWNLOAD_FLAGS]
    command = _flamingo(*command, "--no-progress", "--out", str(tmp_path / "out"))
    _assert_interrupted(_interrupt_while_downloading(command, server, "/gpt-slow.jpg"))
    assert not (tmp_path / "out" / "sizes.json").exists()
    server.routes["/gpt-slow.jpg"].delay_s = 0
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == 3
    records = [json.loads(m["json"]) for m in read_tars(tmp_path / "out").values()]
    embedded = {
        r["example"].split()[0]: base64.b64decode(r["image_map"]["_!_IMAGE1_!_"]["base64_image"])
        for r in records
    }
    assert embedded == served
