"""The image stage on real bytes: kept, converted, resized, rejected — each with its reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from flamingo_data.demo.sample_data import make_image
from flamingo_data.images.stage import (
    ImagePolicy,
    ImageResult,
    dct_scale_limit,
    decode_at_least,
    decode_rgb,
    plain_jpeg_header,
    process_image,
    sniff_format,
)

POLICY = ImagePolicy()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A real PNG header declaring a huge image; a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_valid_jpeg_png_webp_are_kept_byte_identical(fmt: str) -> None:
    data = make_image(3, 80, 60, fmt)
    result = process_image(data, POLICY)
    assert (result.outcome, result.data, result.fmt, result.width, result.height) == (
        "kept",
        data,
        fmt.lower(),
        80,
        60,
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: encode(Image.open(io.BytesIO(make_image(1))).convert("CMYK"), "JPEG"),
            "mode_cmyk",
        ),
        (
            lambda: encode(
                Image.new("RGBA", (30, 20), (255, 0, 0, 128)).convert("P"), "PNG", transparency=0
            ),
            "exif_or_alpha",
        ),
        (
            lambda: encode(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"),
            "mode_i_16",
        ),
        (lambda: encode(Image.open(io.BytesIO(make_image(2))), "BMP"), "format_bmp"),
        (lambda: encode(Image.open(io.BytesIO(make_image(2))), "TIFF"), "format_tiff"),
    ],
    ids=["cmyk", "palette-alpha", "16-bit", "bmp", "tiff"],
)
def test_other_images_are_converted_to_rgb_jpeg(make, reason: str) -> None:
    result = process_image(make(), POLICY)
    assert result.outcome == "converted" and result.reason == reason and result.fmt == "jpeg"
    decoded = Image.open(io.BytesIO(result.data))
    assert decoded.format == "JPEG" and decoded.mode == "RGB"


def test_animated_gif_becomes_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    result = process_image(buf.getvalue(), POLICY)
    assert result.outcome == "converted" and result.reason == "animated"
    pixel = Image.open(io.BytesIO(result.data)).getpixel((10, 10))
    assert pixel[0] > 200 and pixel[2] < 60  # red: the first frame


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    result = process_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), POLICY)
    assert result.outcome == "converted" and (result.width, result.height) == (20, 40)
    top = Image.open(io.BytesIO(result.data)).getpixel((10, 5))
    assert top[0] > 200  # the red half is now on top


def test_resize_limits_sides_and_never_upscales() -> None:
    data = make_image(4, 800, 600)
    short = process_image(data, ImagePolicy(short_side=256))
    assert (short.outcome, short.width, short.height) == ("resized", 341, 256)
    longest = process_image(data, ImagePolicy(max_side=400))
    assert (longest.width, longest.height) == (400, 300)
    small = process_image(make_image(5, 100, 80), ImagePolicy(short_side=256))
    assert small.outcome == "kept"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html><body>404</body></html>", "not_an_image"),
        (np.random.default_rng(0).bytes(3000), "not_an_image"),
        (make_image(6, 200, 150)[:1500], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "undecodable"),
        # PIL raises ValueError("Truncated IHDR chunk"): its message was the counted reason
        (b"\x89PNG\r\n\x1a\n\0\0\0\0IHDR\0\0\0\x14", "undecodable"),
    ],
    ids=["empty", "html", "random", "truncated-jpeg", "broken-png", "png-cut-in-ihdr"],
)
def test_bad_bytes_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    result = process_image(data, POLICY)
    assert (result.outcome, result.reason, result.data) == ("rejected", reason, None)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb()
    assert len(bomb) < 1000
    assert process_image(bomb, POLICY).reason == "too_many_pixels"
    with pytest.raises(ValueError, match="too_many_pixels"):
        decode_rgb(bomb)
    assert (
        process_image(make_image(7, 100, 100), ImagePolicy(max_pixels=5000)).reason
        == "too_many_pixels"
    )


def test_sniffing_reads_bytes_not_names() -> None:
    assert sniff_format(make_image(8, fmt="PNG")) == "png"
    assert sniff_format(make_image(8, fmt="WEBP")) == "webp"
    assert sniff_format(b"GIF89a...") == "gif" and sniff_format(b"hello") is None


def test_decode_verification_is_available() -> None:
    cut = make_image(6, 200, 150)[:1500]
    assert process_image(cut, ImagePolicy()).reason == "truncated"  # cheap: no end-of-image marker
    assert process_image(cut, ImagePolicy(verify="decode")).reason == "undecodable"  # full decode


def _smooth_jpeg(width: int, height: int, exif: bytes = b"") -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return encode(Image.fromarray(arr.astype(np.uint8)), "JPEG", quality=95, exif=exif)


def test_reduced_scale_decode_keeps_the_short_side_and_reports_full_size() -> None:
    pixels, full = decode_at_least(_smooth_jpeg(1000, 600), 224)
    assert full == (1000, 600)
    assert 224 <= pixels.shape[0] < 600 and pixels.shape[2] == 3  # DCT-scaled, never below 224
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(1000 / 600, rel=0.01)
    small, full_small = decode_at_least(_smooth_jpeg(200, 150), 224)
    assert small.shape[:2] == (150, 200) and full_small == (200, 150)  # never upscaled


def test_reduced_scale_decode_applies_exif_rotation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels, full = decode_at_least(_smooth_jpeg(1000, 600, exif.tobytes()), 224)
    assert full == (600, 1000) and pixels.shape[0] > pixels.shape[1]


def test_reduced_scale_decode_refuses_bombs_before_decoding() -> None:
    with pytest.raises(ValueError, match="too_many_pixels"):
        decode_at_least(_smooth_jpeg(1000, 600), 224, max_pixels=500_000)


def test_resize_through_reduced_decode_matches_a_full_decode() -> None:
    """The fast resize path (DCT-scaled decode, then bicubic) stays within a few levels of
    decoding at full size and resizing, on a smooth picture."""
    data = _smooth_jpeg(1200, 900)
    fast = process_image(data, ImagePolicy(short_side=256))
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.Resampling.BICUBIC)
    assert (fast.outcome, fast.width, fast.height) == ("resized", 341, 256)
    diff = np.abs(np.asarray(Image.open(io.BytesIO(fast.data)), float) - np.asarray(full, float))
    assert diff.mean() < 3


@pytest.mark.parametrize(
    ("size", "short_side", "limit", "decoded"),
    [
        ((1000, 667), 256, {"min_height": 334}, (334, 500)),  # 1/2: 1/4 would give 167
        ((384, 256), 224, {"min_height": 256}, (256, 384)),  # full size, never the slow 7/8
        ((600, 2400), 70, {"min_width": 75}, (300, 75)),  # 1/8 at most
    ],
)
def test_dct_scaling_uses_only_the_fast_power_of_two_scales(size, short_side, limit, decoded):
    data = _smooth_jpeg(*size)
    assert dct_scale_limit(*size, short_side) == limit
    assert simplejpeg.decode_jpeg(data, **limit).shape[:2] == decoded


def test_plain_jpeg_header_reads_size_and_mode_without_pil() -> None:
    rgb = plain_jpeg_header(_smooth_jpeg(300, 200))
    assert (rgb.width, rgb.height, rgb.mode) == (300, 200, "RGB")
    grey = plain_jpeg_header(encode(Image.new("L", (50, 40), 128), "JPEG"))
    assert (grey.width, grey.height, grey.mode) == (50, 40, "L")


def _with_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _smooth_jpeg(40, 20, exif.tobytes())


@pytest.mark.parametrize(
    "make",
    [
        lambda: _with_exif(1),  # any APP1 (EXIF or XMP) may carry a rotation: PIL decides
        lambda: encode(Image.new("CMYK", (40, 30)), "JPEG"),  # PIL converts CMYK
        lambda: encode(
            Image.new("RGB", (40, 30)),
            "MPO",
            save_all=True,
            append_images=[Image.new("RGB", (40, 30))],
        ),  # multi-picture: first frame
        lambda: b"\xff\xd8\xff\xe0\x00\x10garbage",  # a broken header gets PIL's reason
    ],
    ids=["app1", "cmyk", "mpo", "broken"],
)
def test_jpegs_that_need_pil_leave_the_fast_path(make) -> None:
    assert plain_jpeg_header(make()) is None


def test_fast_path_gives_the_same_outcomes_as_pil() -> None:
    data = _smooth_jpeg(300, 200)
    assert process_image(data, POLICY) == ImageResult("kept", data, "jpeg", 300, 200)
    assert process_image(data, ImagePolicy(max_pixels=50_000)).reason == "too_many_pixels"
    assert process_image(data, ImagePolicy(min_side=201)).reason == "too_small"
    assert process_image(data[:-2], POLICY).reason == "truncated"
    grey = encode(Image.new("L", (400, 300), 90), "JPEG")
    small = process_image(grey, ImagePolicy(short_side=150))
    assert (small.outcome, small.width, small.height) == ("resized", 200, 150)
    assert Image.open(io.BytesIO(small.data)).mode == "RGB"
    assert process_image(_with_exif(1), POLICY).outcome == "kept"  # PIL path, same answer


def test_resize_filter_is_a_choice_and_checked() -> None:
    data = make_image(4, 800, 600)
    outputs = {
        name: process_image(data, ImagePolicy(short_side=256, resize_filter=name))
        for name in ("bicubic", "bilinear", "area", "lanczos")
    }
    assert {(r.width, r.height) for r in outputs.values()} == {(341, 256)}
    assert len({r.data for r in outputs.values()}) == 4  # each filter gives its own pixels
    with pytest.raises(ValueError, match="resize_filter"):
        ImagePolicy(resize_filter="nearest")
    with pytest.raises(ValueError, match="quality"):
        ImagePolicy(quality=0)


def _photo(fmt: str, **kwargs) -> bytes:
    rng = np.random.default_rng(5)
    return encode(
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)), fmt, **kwargs
    )


def _with_exif_thumbnail(jpeg: bytes) -> bytes:
    """An APP1 segment holding a whole small JPEG (its own SOI...EOI), as camera files carry."""
    thumb = encode(Image.new("RGB", (16, 12), (200, 10, 10)), "JPEG")
    payload = b"Exif\x00\x00" + thumb
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("verify", ["structure", "decode"])
@pytest.mark.parametrize(
    "source",
    [
        _photo("JPEG"),
        _photo("JPEG", progressive=True),  # several scans, tables between them
        _with_exif_thumbnail(_photo("JPEG")),
        _photo("PNG"),
        _photo("WEBP"),
    ],
    ids=["jpeg", "progressive", "exif-thumbnail", "png", "webp"],
)
def test_bytes_after_a_whole_image_are_dropped_not_the_image(source: bytes, verify: str) -> None:
    """A motion photo (JPEG + MP4) or a camera trailer: the image is good, the tail is not image."""
    tail = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40
    result = process_image(source + tail, ImagePolicy(verify=verify))
    assert (result.outcome, result.reason) == ("trimmed", "bytes_after_image")
    assert result.data == source
    assert process_image(source, ImagePolicy(verify=verify)).outcome == "kept"


@pytest.mark.parametrize(
    "source",
    [
        _photo("JPEG", progressive=True),
        _with_exif_thumbnail(_photo("JPEG")),  # the thumbnail's end marker is not the image's
        _photo("PNG"),
    ],
    ids=["progressive", "exif-thumbnail", "png"],
)
def test_cut_off_images_are_still_truncated_with_or_without_a_tail(source: bytes) -> None:
    cut = source[: len(source) * 2 // 3]
    assert process_image(cut, POLICY).reason == "truncated"
    assert process_image(cut + b"junk after the cut", POLICY).reason == "truncated"


def _with_junk_before_a_marker(jpeg: bytes) -> bytes:
    """libjpeg-turbo warns "3 extraneous bytes before marker 0xdb" and refuses; PIL reads it."""
    dqt = jpeg.index(b"\xff\xdb")
    return jpeg[:dqt] + b"\x00\x01\x02" + jpeg[dqt:]


def test_junk_before_a_marker_is_decoded_as_pil_does_everywhere() -> None:
    """Kept, resized and decoded by the loader alike, with PIL's pixels: not kept at conversion and
    then dropped at training time."""
    source = _photo("JPEG")
    junk = _with_junk_before_a_marker(source)
    assert process_image(junk, POLICY).outcome == "kept"
    resized = process_image(junk, ImagePolicy(short_side=45))
    assert resized.outcome == "resized" and (resized.width, resized.height) == (60, 45)
    pixels, full = decode_at_least(junk, 45)
    clean = simplejpeg.decode_jpeg(source, colorspace="RGB", min_height=45)  # same scale, no junk
    assert full == (120, 90) and pixels.shape == clean.shape == (45, 60, 3)
    assert np.abs(pixels.astype(int) - clean).mean() < 1


def test_a_cut_off_jpeg_fails_the_loaders_decode_too() -> None:
    """The PIL fallback is for warnings, not for missing data: libjpeg-turbo alone would grey-fill."""
    cut = _photo("JPEG")[: len(_photo("JPEG")) * 2 // 3]
    with pytest.raises(OSError):
        decode_at_least(cut, 45)
    assert process_image(cut, ImagePolicy(short_side=45)).reason == "undecodable"


def _quadrant_image() -> Image.Image:
    """60 x 30, red top-left quadrant on blue: every orientation moves the red corner differently."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[..., 2] = 200
    pixels[:15, :30] = (255, 0, 0)
    return Image.fromarray(pixels)


def _displayed(data: bytes) -> np.ndarray:
    """What a viewer that honours the orientation shows (PIL's exif_transpose)."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), int)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_is_applied_in_every_format(fmt: str, orientation: int) -> None:
    """A PNG or WebP may carry an EXIF orientation too (phones, browsers apply it); it was kept
    unrotated, so a loader that ignores EXIF (upstream open_flamingo's) saw it sideways, while the
    same image with --short-side came out upright. Output must show what the source displays."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = encode(_quadrant_image(), fmt, exif=exif.tobytes(), **options)
    result = process_image(data, POLICY)
    stored = np.asarray(Image.open(io.BytesIO(result.data)).convert("RGB"), int)
    expected = _displayed(data)
    assert stored.shape == expected.shape and (result.width, result.height) == stored.shape[1::-1]
    assert np.abs(stored - expected).mean() < 10
    if orientation == 1 and fmt != "TIFF":
        assert result.outcome == "kept"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_reduced_decode_reports_the_displayed_size_of_a_rotated_png_or_webp(fmt: str) -> None:
    """The loader sizes its resize from ``full``: with the stored size of a rotated PNG/WebP it
    stretched a 30 x 60 picture to 60 x 30's proportions."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels, full = decode_at_least(encode(_quadrant_image(), fmt, exif=exif.tobytes()), 10)
    assert full == (30, 60) and pixels.shape[:2] == (60, 30)


def _png_16bit(color_type: int, channels: int) -> bytes:
    """A real 16-bit-per-channel PNG (PIL writes none): a horizontal ramp, opaque alpha."""
    row = b"\x00" + b"".join(
        struct.pack(f">{channels}H", *([x * 1000] * (channels - 1) + [65535])) for x in range(64)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 64, 32, 16, color_type, 0, 0, 0)
    idat = zlib.compress(row * 32)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("color_type", "channels"), [(2, 3), (6, 4), (4, 2)], ids=["rgb", "rgba", "la"]
)
def test_16_bit_colour_pngs_are_converted_like_16_bit_grey(color_type: int, channels: int) -> None:
    """PIL opens a 16-bit RGB/RGBA/LA PNG as plain RGB/RGBA, so it was kept byte for byte (twice
    the bytes of its 8-bit self) while 16-bit grey was converted; the README promises both are."""
    data = _png_16bit(color_type, channels)
    result = process_image(data, POLICY)
    assert (result.outcome, result.reason, result.fmt) == ("converted", "bit_depth_16", "jpeg")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), int)
    stored = np.asarray(Image.open(io.BytesIO(result.data)), int)
    assert np.abs(stored - expected).mean() < 3


@pytest.mark.parametrize("peak", [255, 256, 65535])
def test_16_bit_grey_is_scaled_by_its_full_range_whatever_its_brightest_pixel(peak: int) -> None:
    """16-bit samples run 0..65535. A picture whose brightest pixel was <= 255 was not scaled at
    all, so a near-black one came out 257x brighter (mean 127 instead of 0), while the same
    picture with one pixel at 256 came out black: the output jumped on a single pixel value."""
    ramp = (np.arange(64 * 32).reshape(32, 64) * peak // (64 * 32 - 1)).astype(np.uint16)
    result = process_image(encode(Image.fromarray(ramp), "PNG"), POLICY)
    stored = np.asarray(Image.open(io.BytesIO(result.data)).convert("L"), float)
    assert result.outcome == "converted"
    assert abs(stored.mean() - (ramp / 257).mean()) < 2


@pytest.mark.parametrize(
    ("size", "orientation", "policy", "expected"),
    [
        ((1766, 1194), 3, ImagePolicy(short_side=256), (379, 256)),
        ((1082, 1208), 3, ImagePolicy(short_side=256), (256, 286)),
        ((629, 1610), 8, ImagePolicy(short_side=256), (655, 256)),
        ((357, 682), 8, ImagePolicy(max_side=333), (333, 174)),
    ],
)
def test_resized_rotated_jpegs_take_the_size_of_the_full_picture(
    size: tuple[int, int], orientation: int, policy: ImagePolicy, expected: tuple[int, int]
) -> None:
    """EXIF-rotated JPEGs decode through PIL at a reduced DCT scale; the resize was sized from
    that reduced image, so one side came out a pixel off the upright image's (45 of 300 cases)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", size, (90, 120, 30)), "JPEG", exif=exif.tobytes())
    result = process_image(data, policy)
    assert (result.outcome, result.width, result.height) == ("resized", *expected)
    assert Image.open(io.BytesIO(result.data)).size == expected


def test_the_byte_cap_rejects_bigger_data_and_is_recorded_only_when_changed() -> None:
    """Over ``max_bytes`` is too_many_bytes before any parse; markers of runs from before the
    cap existed hold no ``max_bytes``, so it is left out at its default (they still resume)."""
    data = make_image(1)
    assert process_image(data, ImagePolicy(max_bytes=len(data) - 1)).reason == "too_many_bytes"
    assert process_image(data, ImagePolicy(max_bytes=len(data))).outcome == "kept"
    assert "max_bytes" not in ImagePolicy().as_settings()
    assert ImagePolicy(max_bytes=5).as_settings()["max_bytes"] == 5
    with pytest.raises(ValueError):
        ImagePolicy(max_bytes=0)


def test_a_pixel_cap_above_pils_own_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL refuses over 2 x its MAX_IMAGE_PIXELS (179 M): --max-pixels 300 M still refused a
    196 M-pixel PNG as too_many_pixels. PIL's limit is raised to the cap, never lowered."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    before = Image.MAX_IMAGE_PIXELS
    big = png_bomb(14000, 14000)
    assert process_image(big, ImagePolicy()).reason == "too_many_pixels"
    assert before == Image.MAX_IMAGE_PIXELS
    assert process_image(big, ImagePolicy(max_pixels=300_000_000)).reason != "too_many_pixels"
    assert process_image(png_bomb(20000, 20000), ImagePolicy()).reason == "too_many_pixels"


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        len(payload).to_bytes(4, "big")
        + kind
        + payload
        + zlib.crc32(kind + payload).to_bytes(4, "big")
        for kind, payload in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("where", ["exif_after_pixels", "imagemagick_text", "xmp"])
def test_a_png_orientation_is_found_wherever_pil_finds_it(where: str) -> None:
    """The orientation check reads chunk headers only; each place PIL takes an orientation from
    is still found, and the stored picture shows what the source displays."""
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = [c for c in _png_chunks(encode(_quadrant_image(), "PNG")) if c[0] != b"IEND"]
    if where == "exif_after_pixels":
        extra = (b"eXIf", exif.tobytes()[6:])
    elif where == "imagemagick_text":
        raw = exif.tobytes().hex()
        extra = (
            b"tEXt",
            b"Raw profile type exif\x00\nexif\n" + f"{len(raw) // 2:8d}\n{raw}".encode(),
        )
    else:
        xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
        extra = (b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp.encode())
    data = _png_from([*plain, extra, (b"IEND", b"")])
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6  # PIL reads it there
    result = process_image(data, POLICY)
    assert result.outcome == "converted"
    stored = np.asarray(Image.open(io.BytesIO(result.data)).convert("RGB"), int)
    assert stored.shape == _displayed(data).shape == (60, 30, 3)
