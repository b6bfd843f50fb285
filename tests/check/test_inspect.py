"""inspect: numbers checked against shards built with known counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_data.check.inspect import inspect_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.core.records import encode_base64
from flamingo_data.demo.sample_data import make_image
from flamingo_data.storage.shard_writer import ShardWriter
from tests.loader_data import interleaved_record, solid_jpeg, write_json_shard


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    out = tmp_path / "s"
    out.mkdir()
    write_json_shard(
        out,
        "a",
        {
            "d1": interleaved_record(
                ["A", "B", "C"],
                [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]],
                [solid_jpeg((1, 2, 3), (300, 200)), solid_jpeg((4, 5, 6), (100, 100))],
            ),
            "d2": interleaved_record(
                ["A", "B"], [[0.2, 0.1]], [solid_jpeg((7, 8, 9))]
            ),  # below 0.24: rejected
            "d3": interleaved_record(
                ["A" * 400, "B"], [[0.1, 0.5]], [solid_jpeg((9, 9, 9))]
            ),  # image past 256 tokens
        },
    )
    writer = ShardWriter(out, "b")
    writer.write(
        "g1",
        {
            "json": json.dumps(
                {
                    "is_gpt": True,
                    "example": "_!_IMAGE1_!_ hi",
                    "image_map": {
                        "_!_IMAGE1_!_": {"base64_image": encode_base64(make_image(1, fmt="PNG"))}
                    },
                }
            ).encode()
        },
    )
    writer.write("p1", {"jpg": make_image(2, 160, 130), "txt": b"a caption", "json": b"{}"})
    writer.close()
    (out / "stats.json").write_text(
        json.dumps({"converter": "mmc4", "counts": {"documents": {"in": 5}}, "reasons": {}})
    )
    return out


def test_counts_histograms_and_loader_survival(shards: Path) -> None:
    report = inspect_shards(str(shards)).to_json()
    assert report["shards"] == 2 and report["documents"] == 5
    assert report["kinds"] == {"interleaved": 3, "gpt": 1, "pair": 1}
    assert report["images"] == 6
    assert report["images_per_doc"] == {"1": 4, "2": 1}
    assert report["sentences_per_doc"] == {"1": 1, "2": 3, "3": 1}
    assert report["image_formats"] == {"jpeg": 5, "png": 1}
    assert report["image_short_side"] == {"0": 4, "128": 2}  # 300x200 and 160x130 are in 128-255
    assert report["loader"]["survive"] == 3
    assert report["loader"]["rejected"] == {"no_images": 1, "too_few_images_after_truncation": 1}
    assert report["source_stats"]["mmc4"]["counts"] == {"documents": {"in": 5}}


def test_the_terminal_table_labels_short_side_buckets_as_ranges(shards: Path) -> None:
    from flamingo_data.check.inspect import format_report

    table = format_report(inspect_shards(str(shards)))
    (line,) = [row for row in table.splitlines() if row.startswith("image short side")]
    assert line.split("  ")[-1].strip() == "0-127 px: 4, 128-255 px: 2"


def test_a_named_shard_that_does_not_exist_is_counted(shards: Path) -> None:
    present = sorted(p.name for p in shards.glob("*.tar"))
    spec = [str(shards / name) for name in present] + [str(shards / "gone-00000.tar")]
    report = inspect_shards(spec).to_json()
    assert report["shards"] == 2 and report["documents"] == 5
    assert report["read_issues"] == {"missing_shard": 1}


def test_threshold_changes_survival(shards: Path) -> None:
    assert inspect_shards(str(shards), threshold=0.15).survive == 4
    assert inspect_shards(str(shards), max_tokens=1024).survive == 4


def test_cli_table_json_and_plot(shards: Path, tmp_path: Path, capsys) -> None:
    assert cli(["inspect", str(shards)]) == 0
    assert "loader keeps" in capsys.readouterr().out
    assert cli(["inspect", str(shards), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 5
    pytest.importorskip("matplotlib")
    png = tmp_path / "h.png"
    assert cli(["inspect", str(shards), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_literal_image_tokens_in_text_do_not_count_as_images(tmp_path: Path) -> None:
    """The loader breaks a literal ``<image>`` in web text so it stays text; inspect's prediction
    of which documents survive truncation must agree (the image here lies past 256 tokens)."""
    write_json_shard(
        tmp_path,
        "a",
        {
            "d": interleaved_record(
                ["About the <image> tag. " + "A" * 400, "B"], [[0.1, 0.5]], [solid_jpeg((9, 9, 9))]
            )
        },
    )
    report = inspect_shards(str(tmp_path))
    assert report.rejected_by_loader == {"too_few_images_after_truncation": 1}
    assert report.survive == 0


def test_records_the_loader_refuses_as_json_are_bad_json_here_too_and_crash_nothing(
    tmp_path: Path,
) -> None:
    """Deep nesting (RecursionError) and a lone surrogate (UnicodeEncodeError in the tokenizer)
    crashed inspect and preview on the whole dataset; NaN, 1e400 and a JSON list were
    'bad_record' where the loader says 'bad_json'. The counts must match the loader's."""
    from flamingo_data.check.preview import write_preview
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    good = interleaved_record(["A", "B"], [[0.3, 0.1]], [solid_jpeg((1, 2, 3))])
    text = json.dumps(good)
    writer = ShardWriter(tmp_path, "odd")
    for key, raw in {
        "good": text,
        "deep": "[" * 100_000 + "]" * 100_000,
        "surrogate": text.replace('"A"', '"\\udc00"'),
        "nan": text.replace("0.3", "NaN"),
        "huge": text.replace("0.3", "1e400"),
        "list": "[1, 2]",
    }.items():
        writer.write(key, {"json": raw.encode()})
    writer.close()
    report = inspect_shards(str(tmp_path))
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))], make_tokenizer(None), LoaderConfig(image_size=16)
    )
    assert sum(len(batch["keys"]) for batch in loader) == 1
    assert report.documents == 6 and report.survive == 1
    assert dict(report.rejected_by_loader) == loader.rejections() == {"bad_json": 5}
    assert write_preview(str(tmp_path), str(tmp_path / "p.html"), n=10)


@pytest.mark.parametrize("content", ["{", "[1]", '{"counts": "x"}'])
def test_a_malformed_stats_json_is_counted_not_a_crash(tmp_path: Path, content: str) -> None:
    """It raised JSONDecodeError / AttributeError out of inspect_shards."""
    write_json_shard(
        tmp_path, "a", {"d": interleaved_record(["A"], [[0.3]], [solid_jpeg((1, 2, 3))])}
    )
    (tmp_path / "stats.json").write_text(content)
    report = inspect_shards(str(tmp_path))
    assert report.documents == 1 and report.survive == 1
    assert report.read_issues == {"bad_stats_json": 1} and report.source_stats == {}


def test_gpt_survivors_at_a_token_limit_are_the_loaders(tmp_path: Path) -> None:
    """Eleven GPT sequences whose second image sits 1..11 characters later: with 10 tokens and 2
    images required, inspect kept 6 where the loader keeps 7 (it tokenized another string)."""
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    image = {"base64_image": encode_base64(solid_jpeg((1, 2, 3)))}
    writer = ShardWriter(tmp_path, "g")
    for n in range(1, 12):
        record = {
            "is_gpt": True,
            "example": f"_!_IMAGE1_!_ {'x' * n} _!_IMAGE2_!_ tail",
            "image_map": {"_!_IMAGE1_!_": image, "_!_IMAGE2_!_": image},
        }
        writer.write(f"k{n:02d}", {"json": json.dumps(record).encode()})
    writer.close()
    report = inspect_shards(str(tmp_path), max_tokens=10, min_images=2)
    config = LoaderConfig(image_size=16, max_tokens=10, min_images=2)
    loader = build_loader([DatasetSpec("d", str(tmp_path))], make_tokenizer(None), config)
    kept = sum(len(batch["keys"]) for batch in loader)
    assert report.survive == kept == 7
    assert dict(report.rejected_by_loader) == loader.rejections()


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "--max-images", "0"],
        ["inspect", "--max-tokens", "0"],
        ["inspect", "--tokenizer", "no/such/tokenizer"],
        ["preview", "--n", "0"],
        ["preview", "--max-images", "-1"],
        ["validate", "--max-pixels", "0"],
        ["validate", "--max-failures-shown", "-1"],
    ],
)
def test_bad_command_line_input_is_exit_2(shards: Path, tmp_path: Path, args: list[str]) -> None:
    """A count below 1 was accepted (an empty report, a blank page, every image failing
    validate --deep) and a bad --tokenizer path was exit 1 with advice to rerun with --resume."""
    command, *options = args
    extra = ["--out", str(tmp_path / "p.html")] if command == "preview" else []
    try:
        code = cli([command, str(shards), *options, *extra])
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    assert code == 2


def test_records_the_loader_refuses_by_shape_are_counted_as_the_loaders_not_a_crash(
    tmp_path: Path,
) -> None:
    """A matrix that is not images x sentences, no sentence at all, or a number among the
    sentences stopped inspect and preview with a traceback (IndexError, TypeError); the loader
    counts them (bad_matrix_shape, bad_record), and so must inspect."""
    from flamingo_data.check.preview import write_preview
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    two = [solid_jpeg((1, 2, 3)), solid_jpeg((3, 2, 1))]
    write_json_shard(
        tmp_path,
        "shape",
        {
            "good": interleaved_record(["A", "B"], [[0.3, 0.1]], two[:1]),
            "short_matrix": interleaved_record(["A", "B"], [[0.3, 0.1]], two),
            "no_sentence": interleaved_record([], [[]], two[:1]),
            "number_sentence": interleaved_record(["A", 5], [[0.3, 0.1]], two[:1]),
        },
    )
    report = inspect_shards(str(tmp_path))
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))], make_tokenizer(None), LoaderConfig(image_size=16)
    )
    assert sum(len(batch["keys"]) for batch in loader) == 1
    expected = {"bad_matrix_shape": 2, "bad_record": 1}
    assert dict(report.rejected_by_loader) == loader.rejections() == expected
    assert report.survive == 1
    result = write_preview(str(tmp_path), str(tmp_path / "p.html"), n=10)
    assert result.documents == 4
    assert "bad_matrix_shape" in (tmp_path / "p.html").read_text()


def test_a_spec_that_names_no_shard_is_named_in_the_error(tmp_path: Path, capsys) -> None:
    """The one-line error said "no shard matches []": the spec the user typed was lost."""
    assert cli(["inspect", str(tmp_path)]) == 2
    assert f"no shard matches [{str(tmp_path)!r}]" in capsys.readouterr().err
    spec = str(tmp_path / "{00000..00001}.tar")
    assert cli(["inspect", spec]) == 2
    assert f"no shard matches [{spec!r}]" in capsys.readouterr().err


def test_samples_the_loader_refuses_by_kind_or_caption_get_the_loaders_reasons(
    tmp_path: Path,
) -> None:
    """A pair without a caption or with a caption that is not UTF-8, a sample with neither json
    nor image, a record neither GPT nor interleaved and an image whose base64 is broken all read
    as kept (or as bad_json / bad_record); a null matched_text_index, which the loader never
    reads, made a kept document bad_record. Inspect must name what the loader names."""
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    image = solid_jpeg((1, 2, 3))
    null_match = interleaved_record(["A", "B"], [[0.3, 0.1], [0.1, 0.1]], [image, image])
    null_match["image_info"][1]["matched_text_index"] = None
    bad_b64 = interleaved_record(["A", "B"], [[0.3, 0.1]], [image])
    bad_b64["image_info"][0]["image_base64"] = "!!not base64!!"
    gpt_bad_b64 = {
        "is_gpt": True,
        "example": "_!_IMAGE1_!_ hi",
        "image_map": {"_!_IMAGE1_!_": {"base64_image": "@@@@"}},
    }
    writer = ShardWriter(tmp_path, "odd")
    good = interleaved_record(["A", "B"], [[0.3, 0.1]], [image])
    writer.write("good", {"json": json.dumps(good).encode()})
    writer.write("null_match", {"json": json.dumps(null_match).encode()})
    writer.write("pair_no_caption", {"jpg": image})
    writer.write("pair_bad_caption", {"jpg": image, "txt": b"\xff\xfe caption"})
    writer.write("only_txt", {"txt": b"hello"})
    writer.write("no_kind", {"json": b'{"url": "u"}'})
    writer.write("bad_b64", {"json": json.dumps(bad_b64).encode()})
    writer.write("gpt_bad_b64", {"json": json.dumps(gpt_bad_b64).encode()})
    writer.close()
    report = inspect_shards(str(tmp_path))
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))], make_tokenizer(None), LoaderConfig(image_size=16)
    )
    kept = sorted(key for batch in loader for key in batch["keys"])
    assert kept == ["good", "null_match"] and report.survive == 2
    expected = {
        "missing_caption": 1,
        "bad_caption": 1,
        "missing_json": 1,
        "unknown_record_kind": 1,
        "bad_base64": 2,
    }
    assert dict(report.rejected_by_loader) == loader.rejections() == expected


def test_a_pairs_token_count_is_the_string_the_loader_tokenizes(tmp_path: Path) -> None:
    """The loader tokenizes ``<image>`` + stripped caption + ``<|endofchunk|>`` + eos (the
    built-in tokenizer: one id per byte, one per special token); inspect left out both end
    tokens and the strip, so a pair's count was 2 short (plus its spaces)."""
    captions = ["  a caption  ", "x" * 40, "café"]
    writer = ShardWriter(tmp_path, "p")
    for n, caption in enumerate(captions):
        writer.write(f"p{n}", {"jpg": make_image(n, 64, 64), "txt": caption.encode()})
    writer.close()
    report = inspect_shards(str(tmp_path))
    assert report.tokens == [3 + len(c.strip().encode()) for c in captions]  # [12, 43, 8]
    assert report.survive == 3


def test_token_percentiles_are_nearest_rank(tmp_path: Path) -> None:
    """p90 of ten documents was the longest one and p50 of two the longer: int(q * n) is one
    rank too high. Checked against numpy's nearest-rank (inverted CDF) percentile."""
    import numpy as np

    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 400]
    records = {
        f"d{n}": interleaved_record(["x" * (k - 10)], [[0.3]], [solid_jpeg((1, 2, 3))])
        for n, k in enumerate(lengths)
    }
    write_json_shard(tmp_path, "a", records)
    report = inspect_shards(str(tmp_path))
    tokens = report.to_json()["tokens"]
    for name, q in (("p50", 50), ("p90", 90)):
        assert tokens[name] == int(np.percentile(report.tokens, q, method="inverted_cdf"))
    assert tokens["p90"] < tokens["max"] == max(report.tokens)


def test_plot_is_a_png_at_the_path_given_and_an_unwritable_one_is_exit_2(
    shards: Path, tmp_path: Path, capsys
) -> None:
    """matplotlib chose the format by extension: '--plot hist' wrote hist.png while saying
    'written to hist', '--plot h.txt' stopped with a traceback, and a folder or a path under a
    file was exit 1 with advice to rerun with --resume."""
    pytest.importorskip("matplotlib")
    for name in ("hist", "h.txt"):
        assert cli(["inspect", str(shards), "--plot", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "hist.png").exists()
    capsys.readouterr()
    for bad in (tmp_path, tmp_path / "hist" / "h.png"):
        assert cli(["inspect", str(shards), "--plot", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"--plot: cannot write the plot to {bad}" in err and "--resume" not in err


def test_each_image_has_one_format_so_the_mix_adds_up_to_the_images(tmp_path: Path) -> None:
    """An image whose header does not read was counted as its sniffed format and again as
    'unreadable': 2 images gave a format mix of 3."""
    truncated = solid_jpeg((1, 2, 3))[:12]  # sniffs as JPEG, no readable header
    record = interleaved_record(["A", "B"], [[0.3, 0.1], [0.1, 0.3]], [truncated, make_image(1)])
    write_json_shard(tmp_path, "a", {"d": record})
    report = inspect_shards(str(tmp_path)).to_json()
    assert report["images"] == sum(report["image_formats"].values()) == 2
    assert report["image_formats"] == {"unreadable": 1, "jpeg": 1}
    assert sum(report["image_short_side"].values()) == 1


@pytest.mark.parametrize("command", ["inspect", "preview", "validate"])
def test_a_url_this_machine_cannot_open_is_one_line_exit_2(
    command: str, tmp_path: Path, capsys
) -> None:
    """An unknown protocol (fsspec's ValueError) or one whose package is not installed (its
    ImportError, e.g. s3:// without s3fs) was a traceback."""
    import importlib.util

    urls = ["nosuchproto://bucket/a-00000.tar"]
    if importlib.util.find_spec("dropboxdrivefs") is None:
        urls.append("dropbox://folder/a-00000.tar")
    extra = ["--out", str(tmp_path / "p.html")] if command == "preview" else []
    for url in urls:
        assert cli([command, url, *extra]) == 2
        assert f"error: cannot use {url}" in capsys.readouterr().err


def test_progress_reaches_every_shard_on_stderr_and_json_stdout_stays_pure(shards: Path) -> None:
    argv = [sys.executable, "-m", "flamingo_data", "inspect", str(shards), "--json"]
    shown = subprocess.run(argv, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "inspect: 100%" in shown.stderr and "2/2" in shown.stderr
    assert json.loads(shown.stdout)["shards"] == 2  # the whole of stdout is the report
    quiet = subprocess.run([*argv, "--no-progress"], capture_output=True, text=True)
    assert quiet.stdout == shown.stdout
    assert "2/2" not in quiet.stderr and "inspect:" not in quiet.stderr
