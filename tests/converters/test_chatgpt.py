"""ChatGPT sequences -> GPT shards: urls downloaded once by img2dataset from a local server, embedded."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.run import driver
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import OutputExistsError, RunOptions, drop_work
from tests.conftest import Route, serve, work_kept

FAST = DownloadOptions(processes=1, threads=4, timeout=1, retries=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    generator = serve()
    server = next(generator)
    root = tmp_path_factory.mktemp("gpt")
    served = {k: server.add_image(f"{k}.jpg", seed=k) for k in range(1, 5)}
    served[5] = server.add_image("5.png", seed=5, fmt="PNG")
    server.routes["/html.jpg"] = Route(b"<html>no</html>", "text/html")
    server.routes["/cut.jpg"] = Route(served[1][: len(served[1]) // 2], "image/jpeg")
    server.routes["/slow.jpg"] = Route(served[2], "image/jpeg", delay_s=3.0)
    url = lambda k: server.url(f"{k}.jpg") if k != 5 else server.url("5.png")  # noqa: E731
    sequences = [
        {
            "example": "A _!_IMAGE1_!_ cat and _!_IMAGE2_!_ a dog.",
            "image_map": {"_!_IMAGE1_!_": {"url": url(1)}, "_!_IMAGE2_!_": {"url": url(5)}},
        },
        {"example": "Only _!_IMAGE1_!_ here.", "image_map": {"_!_IMAGE1_!_": {"raw_url": url(2)}}},
        {
            "example": "x _!_IMAGE1_!_ y _!_IMAGE2_!_ z _!_IMAGE3_!_ w",
            "image_map": {
                "_!_IMAGE1_!_": {"url": url(3)},
                "_!_IMAGE2_!_": {"url": server.url("missing.jpg")},
                "_!_IMAGE3_!_": {"url": url(4)},
            },
        },
        {
            "example": "bad _!_IMAGE1_!_ _!_IMAGE3_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": url(1)}, "_!_IMAGE3_!_": {"url": url(2)}},
        },
        {
            "example": "html _!_IMAGE1_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": server.url("html.jpg")}},
        },
        {"example": "link _!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {"link": url(1)}}},
        {
            "example": "cut _!_IMAGE1_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": server.url("cut.jpg")}},
        },
        {
            "example": "slow _!_IMAGE1_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": server.url("slow.jpg")}},
        },
    ]
    (root / "seq-000.json").write_text(json.dumps(sequences[:3]))
    (root / "seq-001.json").write_text(
        "\n".join(json.dumps(s) for s in sequences[3:]) + "\n{broken\n"
    )
    out = root / "drop"
    with work_kept():  # img2dataset's output kept for --images-from
        stats = convert_chatgpt(
            str(root / "seq-{000..001}.json"),
            ChatGptOptions(download=FAST),
            RunOptions(out_dir=str(out), converter="chatgpt", write_rejects=True),
            execution=Execution(processes=1, progress=False),
        )
    shutil.copytree(out / "_work" / "_images", root / "images")
    drop_work(out)
    yield root, served, stats.to_json(), server
    generator.close()


def read_records(out: Path) -> dict[str, dict]:
    records = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            records.update(
                {m.name.removesuffix(".json"): json.loads(tar.extractfile(m).read()) for m in tar}
            )
    return records


def image(record: dict, k: int) -> bytes:
    return base64.b64decode(record["image_map"][f"_!_IMAGE{k}_!_"]["base64_image"])


def test_drop_mode_end_to_end(setup) -> None:
    root, served, stats, server = setup
    records = read_records(root / "drop")
    assert sorted(records) == ["seq-000-0000000", "seq-000-0000001"]
    first = records["seq-000-0000000"]
    assert (
        first["is_gpt"] is True and first["example"] == "A _!_IMAGE1_!_ cat and _!_IMAGE2_!_ a dog."
    )
    assert image(first, 1) == served[1] and image(first, 2) == served[5]  # original bytes, PNG kept
    assert image(records["seq-000-0000001"], 1) == served[2]  # raw_url found by auto detection
    assert stats["counts"]["documents"] == {"in": 9, "written": 2, "rejected": 7}
    assert stats["counts"]["images"]["embedded"] == 3  # only images of written records
    assert stats["counts"]["images"]["kept"] == 3  # the image stage's outcome, written images only
    assert stats["reasons"]["documents"] == {
        "image_http_404": 1,
        "image_not_an_image": 1,
        "image_no_url": 1,
        "image_truncated": 1,
        "image_timeout": 1,
        "placeholder_mismatch": 1,
        "bad_json": 1,
    }
    rejects = [json.loads(r) for r in (root / "drop" / "rejects.jsonl").read_text().splitlines()]
    assert {
        "key": "seq-000-0000002/2",
        "url": server.url("missing.jpg"),
        "document": "rejected",
    }.items() <= next(
        r for r in rejects if r["kind"] == "images" and r["reason"] == "http_404"
    ).items()
    assert {r["key"] for r in rejects if r["kind"] == "documents"} == {
        "seq-000-0000002",
        *(f"seq-001-{i:07d}" for i in range(6)),
    }
    assert validate_shards(str(root / "drop")).ok
    assert all(server.hits[f"/{k}.jpg"] == 1 for k in (1, 2))  # each distinct url fetched once


def test_strip_renumbers_and_images_from_joins_by_url(setup) -> None:
    root, served, _, server = setup
    hits_before = dict(server.hits)
    stats = convert_chatgpt(
        str(root / "seq-000.json"),
        ChatGptOptions(missing="strip", images_from=str(root / "images")),
        RunOptions(out_dir=str(root / "strip"), converter="chatgpt", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    assert server.hits == hits_before  # joined against the existing download, nothing fetched
    rejects = [json.loads(r) for r in (root / "strip" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [  # the stripped image of a written sequence: what to fetch again
        {
            "unit": "seq-000",
            "key": "seq-000-0000002/2",
            "kind": "images",
            "reason": "http_404",
            "url": server.url("missing.jpg"),
            "document": "written",
        }
    ]
    record = read_records(root / "strip")["seq-000-0000002"]
    assert record["example"] == "x _!_IMAGE1_!_ y z _!_IMAGE2_!_ w"
    assert image(record, 1) == served[3] and image(record, 2) == served[4]
    assert stats.to_json()["counts"]["documents"] == {"in": 3, "written": 3}
    assert stats.to_json()["counts"]["images"]["embedded"] == 5
    assert stats.to_json()["reasons"]["images"] == {"http_404": 1}  # the reason img2dataset saw
    assert validate_shards(str(root / "strip")).ok


def test_explicit_url_key(setup) -> None:
    root, served, _, _ = setup
    stats = convert_chatgpt(
        str(root / "seq-001.json"),
        ChatGptOptions(url_key="link", images_from=str(root / "images")),
        RunOptions(out_dir=str(root / "link"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    records = read_records(root / "link")
    assert (
        list(records) == ["seq-001-0000002"] and image(records["seq-001-0000002"], 1) == served[1]
    )
    assert stats["counts"]["documents"] == {"in": 6, "written": 1, "rejected": 5}
    assert stats["reasons"]["images"]["no_url"] == 3


def test_placeholders_loader_tokens_and_jsonl_lines(setup) -> None:
    """Every written record passes validate: repeated, zero-padded or non-ASCII-digit placeholders
    and the loader's own tokens are counted rejects; a NUL-digit-NUL text stays text; one bad JSONL
    line is one reject; U+2028 in a string and a byte-order mark lose nothing."""
    root, served, _, server = setup
    one = {"_!_IMAGE1_!_": {"url": server.url("1.jpg")}}
    cases = {
        "repeated _!_IMAGE1_!_ _!_IMAGE1_!_": "placeholder_repeated",
        "padded _!_IMAGE01_!_": "placeholder_mismatch",
        "arabic _!_IMAGE\u0661_!_": "placeholder_mismatch",
        "tag <image> _!_IMAGE1_!_": "special_token_in_text",
        "eoc <|endofchunk|> _!_IMAGE1_!_": "special_token_in_text",
        "nul \x001\x00 _!_IMAGE1_!_": None,
        "two  spaces\t\tkept _!_IMAGE1_!_": None,
        "line\u2028separator _!_IMAGE1_!_": None,
    }
    lines = [json.dumps({"example": text, "image_map": one}, ensure_ascii=False) for text in cases]
    lines += ['{"x": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000]
    (root / "edge.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    stats = convert_chatgpt(
        str(root / "edge.jsonl"),
        ChatGptOptions(images_from=str(root / "images")),
        RunOptions(out_dir=str(root / "edge"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert validate_shards(str(root / "edge"), deep=True).ok
    written = {r["example"] for r in read_records(root / "edge").values()}
    assert written == {text for text, reason in cases.items() if reason is None}
    reasons = [reason for reason in cases.values() if reason] + ["bad_json", "bad_json"]
    assert stats["reasons"]["documents"] == {r: reasons.count(r) for r in reasons}
    assert stats["counts"]["documents"] == {"in": 10, "written": 3, "rejected": 7}


def test_cli_takes_the_unit_converters_options(setup, tmp_path: Path) -> None:
    """--executor, --executor-master, --max-samples-per-shard, --max-bytes-per-shard and
    --no-fsync (the options every unit converter shares, which the library takes) were refused."""
    from flamingo_data.cli.main import main as cli

    root, _, _, _ = setup
    out = tmp_path / "out"
    args = ["convert", "chatgpt", "--sequences", str(root / "seq-000.json"), "--out", str(out)]
    args += ["--images-from", str(root / "images"), "--no-progress", "--no-fsync"]
    args += [
        "--executor",
        "local",
        "--max-samples-per-shard",
        "1",
        "--max-bytes-per-shard",
        "9999999",
    ]
    assert cli(args) == 0
    assert json.loads((out / "sizes.json").read_text()) == {
        "seq-000-00000.tar": 1,
        "seq-000-00001.tar": 1,
    }


@pytest.mark.slow
def test_cli_resume_after_a_killed_run(setup, tmp_path: Path) -> None:
    root, served, _, _ = setup
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flamingo_data", "convert", "chatgpt", "--out", str(out)]
    command += ["--sequences", str(root / "seq-000.json"), "--threads", "4", "--timeout", "1"]
    proc = subprocess.Popen(
        [*command, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "_work" / "_images" / "_tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr
    subprocess.run(
        [*command, "--resume", "--rejects"], check=True, capture_output=True, timeout=180
    )
    records = read_records(out)
    assert sorted(records) == ["seq-000-0000000", "seq-000-0000001"]
    assert image(records["seq-000-0000000"], 2) == served[5]
    assert validate_shards(str(out)).ok
    rejects = (out / "rejects.jsonl").read_text()
    assert '"reason": "image_http_404"' in rejects


def test_remote_sequences_and_remote_out(setup, tmp_path, monkeypatch) -> None:
    """Sequence files read from and shards written to fsspec storage: the same shards and sidecars
    as the local run; the image downloads stay in a local work folder that is removed at the end."""
    import fsspec

    root, _served, stats, _server = setup
    monkeypatch.setenv("FLAMINGO_DATA_WORK", str(tmp_path / "work"))
    fs = fsspec.filesystem("memory")
    for name in ("seq-000.json", "seq-001.json"):
        fs.pipe_file(f"/gpt-in/{name}", (root / name).read_bytes())
    got = convert_chatgpt(
        "memory://gpt-in/seq-{000..001}.json",
        ChatGptOptions(download=FAST),
        RunOptions(out_dir="memory://gpt-out/shards", converter="chatgpt", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    try:
        uploaded = {p.removeprefix("/gpt-out/shards/"): fs.cat_file(p) for p in fs.find("/gpt-out")}
        shards = {n for n in uploaded if n.endswith(".tar")}
        assert shards and all(uploaded[n] == (root / "drop" / n).read_bytes() for n in shards)
        assert uploaded["sizes.json"] == (root / "drop" / "sizes.json").read_bytes()
        assert got.to_json() == stats and not any(n.startswith("_images") for n in uploaded)
        assert not any((tmp_path / "work").iterdir())  # local downloads dropped after success
    finally:
        fs.rm("/gpt-in", recursive=True)
        fs.rm("/gpt-out", recursive=True)


def test_only_http_urls_are_fetched_never_local_files(setup, tmp_path: Path) -> None:
    """A crafted ``file://`` url would copy this machine's files into the shards: bad_url."""
    root, served, _, server = setup
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(served[3])
    sequence = {
        "example": "a _!_IMAGE1_!_ b _!_IMAGE2_!_",
        "image_map": {
            "_!_IMAGE1_!_": {"url": server.url("1.jpg")},
            "_!_IMAGE2_!_": {"url": secret.as_uri()},
        },
    }
    (tmp_path / "s.json").write_text(json.dumps([sequence]))
    out = tmp_path / "out"
    stats = convert_chatgpt(
        str(tmp_path / "s.json"),
        ChatGptOptions(download=FAST, missing="strip"),
        RunOptions(out_dir=str(out), converter="chatgpt", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["reasons"]["images"] == {"bad_url": 1}
    (record,) = read_records(out).values()
    assert list(record["image_map"]) == ["_!_IMAGE1_!_"] and image(record, 1) == served[1]
    assert served[3] not in out.joinpath("rejects.jsonl").read_bytes()


@pytest.mark.slow
def test_a_download_shard_img2dataset_could_not_finish_stops_the_run(tmp_path: Path) -> None:
    """img2dataset only prints "shard failed": the run used to succeed with those urls counted
    ``not_downloaded`` and their sequences dropped, and --resume then skipped the committed unit, so
    they were lost for good. Now the run stops, and --resume downloads the shard and writes them."""
    from flamingo_data.run.units import RunIncomplete

    generator = serve()
    server = next(generator)
    sequences = []
    for k in range(4):
        server.add_image(f"{k}.jpg", seed=30 + k)
        entry = {"_!_IMAGE1_!_": {"url": server.url(f"{k}.jpg")}}
        sequences.append({"example": f"s{k} _!_IMAGE1_!_", "image_map": entry})
    (tmp_path / "seq.json").write_text(json.dumps(sequences))
    blocker = tmp_path / "out" / "_work" / "_images" / "00001.tar"
    blocker.mkdir(parents=True)  # img2dataset cannot open this shard for writing
    options = ChatGptOptions(download=DownloadOptions(**{**FAST.__dict__, "samples_per_shard": 2}))
    run = RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt", resume=True)
    convert = lambda: convert_chatgpt(  # noqa: E731
        str(tmp_path / "seq.json"), options, run, execution=Execution(processes=1, progress=False)
    )
    try:
        with pytest.raises(RunIncomplete, match="did not finish shard.s. 00001"):
            convert()
        assert not list((tmp_path / "out" / "_done").iterdir())  # no unit committed its losses
        blocker.rmdir()
        stats = convert().to_json()
    finally:
        generator.close()
    assert stats["counts"]["documents"] == {"in": 4, "written": 4}
    assert len(read_records(tmp_path / "out")) == 4


def test_a_pretty_printed_sequence_file_is_one_sequence(setup, tmp_path: Path) -> None:
    """One sequence written with ``indent=2`` was read as JSONL: 8 lines, 8 ``bad_json`` rejects,
    and the sequence lost. The conversation converter already read such a file as one item."""
    root, served, _, server = setup
    sequence = {
        "example": "A _!_IMAGE1_!_.",
        "image_map": {"_!_IMAGE1_!_": {"url": server.url("1.jpg")}},
    }
    (tmp_path / "one.json").write_text(json.dumps(sequence, indent=2))
    stats = convert_chatgpt(
        str(tmp_path / "one.json"),
        ChatGptOptions(images_from=str(root / "images")),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["counts"]["documents"] == {"in": 1, "written": 1}
    assert image(read_records(tmp_path / "out")["one-0000000"], 1) == served[1]


def test_strip_leaves_the_rest_of_the_text_as_it_was(setup, tmp_path: Path) -> None:
    """Stripping a placeholder used to collapse every run of spaces or tabs in the whole text and
    strip its ends (code indentation, a poem's layout lost); now only the stripped placeholder's own
    spaces go."""
    root, served, _, server = setup
    text = "Code:\n    x  =  1 _!_IMAGE1_!_ then _!_IMAGE2_!_\tnext\n  _!_IMAGE3_!_  end  "
    urls = {1: server.url("1.jpg"), 2: server.url("missing.jpg"), 3: server.url("3.jpg")}
    image_map = {f"_!_IMAGE{k}_!_": {"url": url} for k, url in urls.items()}
    (tmp_path / "s.json").write_text(json.dumps([{"example": text, "image_map": image_map}]))
    convert_chatgpt(
        str(tmp_path / "s.json"),
        ChatGptOptions(missing="strip", images_from=str(root / "images")),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    )
    record = read_records(tmp_path / "out")["s-0000000"]
    assert record["example"] == "Code:\n    x  =  1 _!_IMAGE1_!_ then next\n  _!_IMAGE2_!_  end  "
    assert image(record, 1) == served[1] and image(record, 2) == served[3]


def test_images_from_without_an_img2dataset_output_is_a_usage_error(setup, tmp_path, capsys):
    """A mistyped --images-from used to exit 0 with every sequence rejected as not_downloaded."""
    from flamingo_data.cli.main import main as cli

    root, _, _, _ = setup
    args = ["convert", "chatgpt", "--sequences", str(root / "seq-000.json"), "--no-progress"]
    args += ["--out", str(tmp_path / "out"), "--images-from", str(tmp_path / "typo")]
    assert cli(args) == 2
    assert "no finished img2dataset shard" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_done").exists()


def test_resume_refuses_sequence_files_whose_urls_changed(
    setup, tmp_path: Path, monkeypatch
) -> None:
    """Changed between a killed run and --resume, new urls sorted into shards img2dataset had
    finished were never fetched: their sequences were dropped as not_downloaded, exit 0."""

    root, _, _, _ = setup
    sequences = json.loads((root / "seq-000.json").read_text())
    source, out = tmp_path / "seq.json", tmp_path / "out"
    source.write_text(json.dumps(sequences[:2]))

    def run(resume: bool) -> dict:
        run_options = RunOptions(out_dir=str(out), converter="chatgpt", resume=resume)
        options = ChatGptOptions(download=DownloadOptions(processes=1, threads=2, timeout=5))
        return convert_chatgpt(
            str(source), options, run_options, execution=Execution(processes=1, progress=False)
        )

    def killed_after_download(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_units", killed_after_download)
    with pytest.raises(KeyboardInterrupt):
        run(resume=False)
    monkeypatch.undo()
    source.write_text(json.dumps(sequences[:3]))  # one more sequence: three more urls
    with pytest.raises(OutputExistsError, match="3 new, 0 gone"):
        run(resume=True)
    source.write_text(json.dumps(sequences[:2]))
    assert run(resume=True).to_json()["counts"]["documents"] == {"in": 2, "written": 2}


def test_a_sequence_file_that_is_not_there_beside_one_that_is_is_a_usage_error(
    setup, tmp_path, capsys
):
    """``--sequences a.json typo.json`` converted a.json alone and exited 0."""
    from flamingo_data.cli.main import main as cli

    root, _, _, _ = setup
    typo = str(tmp_path / "seq-001.json")
    args = ["convert", "chatgpt", "--sequences", str(root / "seq-000.json"), typo]
    assert cli([*args, "--no-progress", "--out", str(tmp_path / "out")]) == 2
    assert f"{typo} names no sequence file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_done").exists()


def test_a_folder_of_jsonl_sequence_files_is_read(setup, tmp_path) -> None:
    """The README takes JSONL input, but a folder gave only its .json files: a folder of .jsonl
    sequence files was "no sequence file matches", exit 2."""
    root, _, stats, _ = setup
    folder = tmp_path / "sequences"
    folder.mkdir()
    (folder / "seq-000.json").write_bytes((root / "seq-000.json").read_bytes())
    (folder / "seq-001.jsonl").write_bytes((root / "seq-001.json").read_bytes())
    (folder / "notes.txt").write_text("not a sequence file")
    got = convert_chatgpt(
        str(folder),
        ChatGptOptions(images_from=str(root / "images")),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert got["counts"]["units"] == {"done": 2}
    assert got["counts"]["documents"] == stats["counts"]["documents"]


def test_images_from_reads_no_more_of_an_image_than_the_byte_cap(setup, monkeypatch) -> None:
    """An img2dataset output from elsewhere may hold an image member of any size: it was read
    whole into memory only for the image stage to refuse it as too_many_bytes."""
    from flamingo_data.converters import chatgpt
    from flamingo_data.fetch.i2d_output import ImageStore
    from flamingo_data.images.stage import ImagePolicy

    store = ImageStore(setup[0] / "images")
    url, (_, _, size) = next(iter(store.found.items()))
    handed = []
    real = chatgpt.process_image
    monkeypatch.setattr(
        chatgpt,
        "process_image",
        lambda data, policy: handed.append(len(data)) or real(data, policy),
    )
    cap = size // 4
    assert chatgpt._image(store, url, ImagePolicy(max_bytes=cap)) == ("too_many_bytes", None)
    assert handed == [cap + 1]


def test_placeholders_are_renumbered_in_text_order(setup, tmp_path: Path) -> None:
    """open_flamingo binds image k to the k-th placeholder of the text (it reads image_map by
    number 1..n, the text's placeholders in order): "_!_IMAGE2_!_ ... _!_IMAGE1_!_" was written as
    is, so each placeholder got the other's image. Checked by colour, as that loader binds them."""
    import io
    import re

    from PIL import Image

    _, _, _, server = setup
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gold": (255, 200, 0)}
    for name, rgb in colours.items():
        body = io.BytesIO()
        Image.new("RGB", (32, 24), rgb).save(body, "PNG")
        server.routes[f"/{name}.png"] = Route(body.getvalue(), "image/png")
    sequences = [  # (text, {number: colour or None for a dead url})
        ("B _!_IMAGE2_!_ then A _!_IMAGE1_!_.", {1: "red", 2: "green"}),
        ("_!_IMAGE3_!_ x _!_IMAGE2_!_ y _!_IMAGE1_!_", {1: "blue", 2: None, 3: "gold"}),
        ("in order _!_IMAGE1_!_ _!_IMAGE2_!_", {1: "gold", 2: "red"}),
    ]
    source = [
        {
            "example": text,
            "image_map": {
                f"_!_IMAGE{n}_!_": {"url": server.url(f"{c or 'dead'}.png")} for n, c in m.items()
            },
        }
        for text, m in sequences
    ]
    (tmp_path / "s.json").write_text(json.dumps(source))
    convert_chatgpt(
        str(tmp_path / "s.json"),
        ChatGptOptions(download=FAST, missing="strip"),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    )
    records = read_records(tmp_path / "out")
    placeholder = re.compile(r"_!_IMAGE(\d+)_!_")
    for index, (text, numbers) in enumerate(sequences):
        record = records[f"s-{index:07d}"]
        wanted = [numbers[int(n)] for n in placeholder.findall(text) if numbers[int(n)]]
        # open_flamingo: the k-th placeholder of the text gets image_map["_!_IMAGE{k}_!_"]
        bound = [
            Image.open(io.BytesIO(image(record, k))).convert("RGB").getpixel((0, 0))
            for k in range(1, len(record["image_map"]) + 1)
        ]
        assert bound == [colours[c] for c in wanted]
        assert placeholder.findall(record["example"]) == [str(k) for k in range(1, len(wanted) + 1)]
        assert [
            record["image_map"][f"_!_IMAGE{k}_!_"]["url"] for k in range(1, len(wanted) + 1)
        ] == [server.url(f"{c}.png") for c in wanted]
    assert records["s-0000000"]["example"] == "B _!_IMAGE1_!_ then A _!_IMAGE2_!_."
    assert records["s-0000001"]["example"] == "_!_IMAGE1_!_ x y _!_IMAGE2_!_"
    assert validate_shards(str(tmp_path / "out")).ok


def test_negative_retries_is_a_usage_error(tmp_path: Path, capsys) -> None:
    """``--retries -1`` made img2dataset try no url at all and fail every shard on an unbound
    variable: a traceback in its log and exit 1, "did not finish shard(s) 00000"."""
    from flamingo_data.cli.main import main as cli

    (tmp_path / "s.json").write_text("[]")
    args = ["convert", "chatgpt", "--sequences", str(tmp_path / "s.json"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        cli([*args, "--out", str(tmp_path / "out"), "--retries", "-1"])
    assert exc.value.code == 2 and "--retries: must not be negative" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
