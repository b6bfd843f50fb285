"""preview: loaded in headless Chromium, the DOM shows each document, its images in loader order, drops greyed."""

from __future__ import annotations

from pathlib import Path

import pytest

from flamingo_data.check.preview import write_preview
from flamingo_data.cli.main import main as cli
from flamingo_data.core.records import encode_base64
from tests.browser import Elements, dump_dom, screenshot
from tests.loader_data import interleaved_record, solid_jpeg, write_json_shard

RED, BLUE, GREEN = (250, 0, 0), (0, 0, 250), (0, 250, 0)
EVIL = "<script>document.title='pwned'</script>\"' onerror=alert(1) <img src=x onerror=alert(2)>"


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    out.mkdir()
    records = {
        # image 0 -> sentence 2, image 1 -> sentence 0 (text order: 1 then 0); image 2 below threshold
        "doc1": interleaved_record(
            ["First.", "Second.", "Third."],
            [[0.1, 0.1, 0.3], [0.3, 0.1, 0.1], [0.1, 0.2, 0.1]],
            [solid_jpeg(RED), solid_jpeg(BLUE), solid_jpeg(GREEN)],
        ),
        "doc2": interleaved_record([EVIL, "plain"], [[0.5, 0.1]], [solid_jpeg(GREEN)]),
        "doc3": interleaved_record(["no match here"], [[0.1]], [solid_jpeg(RED)]),
        "gpt1": {
            "is_gpt": True,
            "example": "_!_IMAGE1_!_ a cat _!_IMAGE2_!_ a dog",
            "image_map": {
                f"_!_IMAGE{k}_!_": {"base64_image": encode_base64(solid_jpeg(c))}
                for k, c in ((1, RED), (2, BLUE))
            },
        },
    }
    records["doc2"]["url"] = EVIL
    write_json_shard(out, "s", records)
    return out


def test_dom_shows_documents_images_in_order_and_drops(shards: Path, tmp_path: Path) -> None:
    page = tmp_path / "preview.html"
    result = write_preview(str(shards), str(page), n=10)
    assert result.documents == 4
    dom = Elements(dump_dom(page, tmp_path / "profile"))
    docs = dom.find("article", "doc")
    assert [d["data-key"] for d in docs] == ["doc1", "doc2", "doc3", "gpt1"]
    html = page.read_text()
    doc1 = html[html.index("data-key='doc1'") : html.index("data-key='doc2'")]
    figures = Elements(doc1).find("figure")
    assert [(f["class"], f["data-image-index"]) for f in figures] == [
        ("img kept", "1"),
        ("img dropped", "2"),
        ("img kept", "0"),
    ]
    assert figures[1]["data-reason"] == "below_threshold"
    assert [d["data-rejected"] for d in docs] == ["", "", "no_images", ""]
    assert len(dom.find("img")) == 7  # 3 + 1 + 1 + 2, all inline data URLs
    assert all(img["src"].startswith("data:image/jpeg;base64,") for img in dom.find("img"))
    shot = screenshot(page, tmp_path / "profile2", tmp_path / "preview.png")
    assert shot.stat().st_size > 10_000


def test_untrusted_text_renders_as_text_and_runs_nothing(shards: Path, tmp_path: Path) -> None:
    page = tmp_path / "preview.html"
    write_preview(str(shards), str(page), keys=["doc2"])
    dom = Elements(dump_dom(page, tmp_path / "profile"))
    assert (
        dom.title == "flamingo-data preview: 1 documents"
    )  # the injected script would have changed it
    assert dom.find("script") == [] and len(dom.find("img")) == 1
    assert "&lt;script&gt;document.title" in page.read_text()


def test_cli_preview_and_bad_spec(shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.html"
    assert cli(["preview", str(shards), "--n", "2", "--out", str(out)]) == 0
    assert "wrote 2 documents" in capsys.readouterr().out and out.exists()
    assert cli(["preview", str(tmp_path / "missing_{1..2}.tar"), "--out", str(out)]) == 2


def test_a_key_no_sample_has_or_a_nan_threshold_is_one_line_exit_2(
    shards: Path, tmp_path: Path, capsys
) -> None:
    """A mistyped --key wrote an empty page, exit 0; --threshold nan passed every comparison."""
    out = tmp_path / "p.html"
    base = ["preview", str(shards), "--out", str(out)]
    assert cli([*base, "--key", "doc1", "--key", "dco2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sample has the key dco2" in err[0] and not out.exists()
    assert cli([*base, "--key", "doc1", "--key", "doc2"]) == 0
    assert "wrote 2 documents" in capsys.readouterr().out
    assert cli([*base, "--key", "doc2", "--key", "doc3", "--n", "1"]) == 0  # cut at n: not missing
    for command in ("preview", "inspect"):
        with pytest.raises(SystemExit) as refused:
            cli([command, str(shards), "--threshold", "nan"])
        assert refused.value.code == 2
        assert "must be a finite number" in capsys.readouterr().err


def test_an_image_name_in_a_caption_is_escaped_once() -> None:
    """The caption of an image without a similarity was escaped twice: 'a&b' showed as 'a&amp;b'."""
    from flamingo_data.check.docview import ImageView
    from flamingo_data.check.preview import render_image

    html = render_image(ImageView(0, None, False, 0, None, "no_image_bytes", "a&b <x>.jpg"))
    assert "<figcaption>a&amp;b &lt;x&gt;.jpg · no_image_bytes</figcaption>" in html


def test_gpt_images_show_the_loaders_reason_by_position(tmp_path: Path) -> None:
    """Kept was decided by placeholder name: a placeholder repeated past --max-images showed as
    kept, and every image of a sequence the loader rejects was greyed as over_max_images."""
    from flamingo_data.loader.config import LoaderConfig

    image = {"base64_image": encode_base64(solid_jpeg(RED))}
    records = {
        "repeat": {
            "is_gpt": True,
            "example": "_!_IMAGE1_!_ a _!_IMAGE2_!_ b _!_IMAGE1_!_ c",
            "image_map": {"_!_IMAGE1_!_": image, "_!_IMAGE2_!_": image},
        },
        "missing": {
            "is_gpt": True,
            "example": "_!_IMAGE1_!_ a _!_IMAGE2_!_ b",
            "image_map": {"_!_IMAGE1_!_": image},
        },
    }
    write_json_shard(tmp_path, "g", records)
    page = tmp_path / "p.html"
    write_preview(str(tmp_path), str(page), config=LoaderConfig(max_images=2))
    html = page.read_text()
    repeat = Elements(html[html.index("data-key='repeat'") : html.index("data-key='missing'")])
    missing = Elements(html[html.index("data-key='missing'") :])
    assert [(f["class"], f["data-reason"]) for f in repeat.find("figure")] == [
        ("img kept", ""),
        ("img kept", ""),
        ("img dropped", "over_max_images"),
    ]
    assert [(f["class"], f["data-reason"]) for f in missing.find("figure")] == [
        ("img dropped", "placeholder_without_image"),
        ("img dropped", "placeholder_without_image"),
    ]


def test_an_unwritable_out_is_one_line_exit_2_and_a_url_out_is_written_there(
    shards: Path, tmp_path: Path, capsys
) -> None:
    """A folder or a path under a file was an OSError: exit 1 with advice to rerun with
    --resume; a url became a local file named 'memory:/...'."""
    import fsspec

    for bad in (tmp_path, tmp_path / "shards" / "s-00000.tar" / "p.html"):
        assert cli(["preview", str(shards), "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {bad}" in err and "--resume" not in err
    url = "memory://preview-out/p.html"
    assert cli(["preview", str(shards), "--out", url]) == 0
    with fsspec.open(url, "rb") as handle:
        assert b"data-key='doc1'" in handle.read()
    assert not list(tmp_path.glob("memory*")) and not Path("memory:").exists()


def test_a_dropped_image_shows_its_assigned_sentence_and_the_best_one(tmp_path: Path) -> None:
    """Image 0's best sentence (0.30, sentence 1) went to image 1 (0.90); the assignment gave image
    0 sentence 2 at 0.19, under the 0.24 threshold: the label says so."""
    record = interleaved_record(
        ["a.", "b.", "c."],
        [[0.05, 0.30, 0.19], [0.10, 0.90, 0.05]],
        [solid_jpeg((200, 0, 0)), solid_jpeg((0, 0, 200))],
    )
    write_json_shard(tmp_path, "s", {"doc": record})
    page = tmp_path / "preview.html"
    write_preview(str(tmp_path / "s-00000.tar"), str(page))
    html = page.read_text()
    assert "sim 0.19 · below_threshold (best 0.30 at sentence 1, given to image 1)" in html
    assert "sim 0.90</figcaption>" in html  # the kept image: the sentence it is placed before


def test_a_drop_on_the_best_sentence_shows_one_similarity() -> None:
    from flamingo_data.check.docview import ImageView
    from flamingo_data.check.preview import render_image

    image = ImageView(0, None, False, 0, 0.19, "below_threshold", "x.jpg")
    assert "<figcaption>sim 0.19 · below_threshold</figcaption>" in render_image(image)
