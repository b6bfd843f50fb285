"""Every code the package counts or reports, registered once: ``(category, code) -> meaning``.

Categories are those of stats.json (``documents``, ``images``, ``units``, ``rows``, ``samples``,
``members``, ``keys``, ``values``, ``shards``) plus ``validate`` (failures in validate's report) and
``loader`` / ``loader_images`` (what the loader rejects, or drops from a sample it keeps). Reject
reasons sit in stats.json's ``reasons``; the other codes are outcomes counted in its ``counts``.
Codes built at run time (``image_<reason>``, ``layout_<layout>``) are registered expanded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    category: str
    code: str
    meaning: str


# The image stage's reject reasons: converters count them under ``images`` and, for a document
# dropped because of its image, under ``documents`` as ``image_<reason>``.
_IMAGE_REJECTS = (
    ("empty", "the image file has no bytes"),
    ("too_many_bytes", "the image file is over the byte cap (max_bytes)"),
    ("not_an_image", "the bytes are not a JPEG, PNG or WebP image"),
    (
        "too_many_pixels",
        "the image is over the pixel cap (max_pixels): a possible decompression bomb",
    ),
    ("undecodable", "the image cannot be decoded"),
    ("too_small", "the image is smaller than the smallest size kept"),
    ("truncated", "the image stream ends before its end marker"),
)
# Why the chatgpt converter has no bytes for an image url (img2dataset's codes as in ``rows``).
_URL_REJECTS = (
    ("no_url", "the image_map entry has no url"),
    ("bad_url", "the url is not http(s), or img2dataset could not use it"),
    ("not_downloaded", "the url is in no img2dataset output that was joined"),
)
_IMG2DATASET = (
    ("timeout", "the download timed out"),
    ("image_decoding_error", "img2dataset could not decode the image"),
    ("image_too_small", "img2dataset's min_size refused the image"),
    ("too_many_pixels", "img2dataset refused an image over the pixel cap"),
    ("aspect_ratio_too_large", "img2dataset refused the image's aspect ratio"),
    ("opted_out", "the server's X-Robots-Tag or the site's robots.txt forbids use of the image"),
    ("robots_unreachable", "the site's robots.txt could not be fetched (5xx, timeout)"),
    ("dns_error", "the host name did not resolve"),
    ("connection_refused", "the server refused the connection"),
    ("ssl_error", "the TLS handshake or certificate failed"),
    ("connection_closed", "the server closed the connection mid-download"),
    ("bad_url", "the url is not http(s) or has no host"),
    ("too_many_bytes", "the response is over the download cap"),
    ("failed", "img2dataset failed the row with a message no other code matches"),
    ("dropped_by_img2dataset", "img2dataset wrote the row to no output file"),
)

_REGISTERED: tuple[Reason, ...] = (
    # documents: a source item (MMC4 line, conversation, ChatGPT sequence) that became no record
    Reason("documents", "in", "source items read"),
    Reason("documents", "written", "records written to a shard"),
    Reason("documents", "bad_json", "the line or item is not valid JSON"),
    Reason("documents", "not_an_object", "the item is not a JSON object"),
    Reason("documents", "bad_text_list", "text_list is not a list of strings"),
    Reason("documents", "empty_text_list", "text_list is empty"),
    Reason("documents", "bad_image_info", "image_info is not a list of objects with image_name"),
    Reason("documents", "bad_matrix_shape", "similarity_matrix is not images x sentences"),
    Reason("documents", "schema", "the record breaks its JSON schema"),
    Reason("documents", "line_too_long", "the source line is over the line-length cap"),
    Reason("documents", "no_images", "no image of the document could be kept"),
    Reason(
        "documents", "missing_images", "an image is missing and drop_docs_with_missing_images is on"
    ),
    Reason("documents", "invalid_unicode", "a string holds text that is not valid Unicode"),
    Reason("documents", "unencodable_value", "a value JSON cannot carry (an integer over 64 bits)"),
    Reason(
        "documents", "bad_image_field", "image/images is not a string or list (or both are given)"
    ),
    Reason("documents", "no_conversations", "conversations is missing or empty"),
    Reason("documents", "bad_turn", "a turn is not an object with from and value strings"),
    Reason("documents", "unknown_role", "a turn's from is no role the templates know"),
    Reason("documents", "special_token_in_text", "the text holds the loader's special tokens"),
    Reason("documents", "tag_count_mismatch", "the number of <image> tags differs from the images"),
    Reason("documents", "missing_image", "an image file named by the item does not exist"),
    Reason("documents", "unsafe_image_path", "an image path leaves the image folder"),
    Reason("documents", "placeholder_in_text", "the text holds an image placeholder of its own"),
    Reason("documents", "bad_record", "the sequence is not an object with text and image_map"),
    Reason("documents", "placeholder_mismatch", "the placeholders differ from image_map's keys"),
    Reason("documents", "placeholder_repeated", "a placeholder appears more than once"),
    Reason("documents", "bad_crc", "its zip member fails its CRC-32: its text may be damaged"),
    Reason("documents", "bad_fields", "images or texts is not a list of strings and nulls"),
    Reason("documents", "length_mismatch", "images and texts differ in length"),
    Reason("documents", "position_both", "a position holds both an image url and a text"),
    Reason("documents", "position_empty", "a position holds neither an image url nor a text"),
    Reason("documents", "no_text", "the document holds no text that is not blank"),
    Reason("documents", "bad_metadata", "metadata or general_metadata is not JSON of its shape"),
    # images: one image of a document, through the image stage
    Reason("images", "in", "images named by the documents read"),
    Reason("images", "found", "images whose file was found"),
    Reason("images", "missing", "images whose file was not found"),
    Reason("images", "embedded", "images embedded in written records"),
    Reason("images", "written", "images written with their records"),
    Reason("images", "kept", "source bytes kept as they are"),
    Reason("images", "trimmed", "source bytes kept, bytes after the image's end cut off"),
    Reason("images", "converted", "re-encoded as JPEG (format, mode, bit depth, EXIF or alpha)"),
    Reason("images", "resized", "downscaled and re-encoded as JPEG"),
    Reason("images", "unsafe_image_name", "the image name leaves the image folder"),
    # units: one input unit (a zip, a JSON file chunk)
    Reason("units", "done", "units finished (their markers)"),
    Reason("units", "missing_input", "named input files that do not exist"),
    Reason("units", "layout_auto", "the image layout was detected"),
    Reason("units", "layout_indexed", "images were read as <images>/<shard index>/<name>"),
    Reason("units", "layout_flat", "images were read as <images>/<name>"),
    Reason("units", "layout_url", "images were read by url from an img2dataset output"),
    # urls: the distinct image urls of a document converter's download
    Reason("urls", "in", "distinct http(s) image urls the documents name"),
    Reason("urls", "fetched", "urls whose image was downloaded"),
    Reason("units", "unreadable_json", "the sequence or conversation file is not JSON"),
    Reason("units", "truncated_zip", "the zip ends before its central directory: a cut-off copy"),
    Reason("units", "unreadable_zip", "the zip cannot be read"),
    Reason("units", "compression_bomb", "the input inflates far beyond its size: never read"),
    Reason("units", "truncated_stream", "a .jsonl.gz/.zst ends inside its stream: a cut-off copy"),
    Reason("units", "unreadable_stream", "a .jsonl, .jsonl.gz or .jsonl.zst cannot be read"),
    Reason("units", "bad_crc", "a zip member fails its CRC-32: redone on resume"),
    Reason("units", "duplicate_input", "an input named twice (a glob and its path): read once"),
    Reason("units", "damaged_marker", "an unreadable completion marker: the unit is redone"),
    Reason("units", "unreadable_parquet", "a .parquet file cannot be read, or breaks off"),
    Reason("units", "missing_columns", "a .parquet file has no images or texts column"),
    # rows: LAION parquet rows through img2dataset
    Reason("rows", "in", "parquet rows read"),
    Reason("rows", "downloaded", "rows whose image was downloaded"),
    # samples: downloaded image-text pairs, checked before they are adopted
    Reason("samples", "in", "downloaded samples checked"),
    Reason("samples", "written", "samples kept"),
    Reason("samples", "non_finite_to_null", "samples whose NaN/Infinity metadata became null"),
    Reason("samples", "missing_image", "the sample has no image member"),
    Reason("samples", "not_an_image", "the image member is not a JPEG, PNG or WebP image"),
    Reason("samples", "too_many_pixels", "the image is over the pixel cap"),
    Reason("samples", "undecodable_image", "the image cannot be decoded"),
    Reason("samples", "too_small", "the image's shorter side is under min_side"),
    Reason("samples", "too_many_bytes", "the image file is over the byte cap (max_bytes)"),
    Reason("samples", "missing_caption", "the sample has no txt member"),
    Reason("samples", "caption_not_utf8", "the caption is not UTF-8"),
    Reason("samples", "bad_json", "the json member is not valid JSON"),
    Reason("samples", "empty_caption", "the caption is blank"),
    Reason("samples", "schema", "the json member breaks the pair schema"),
    # members: what reading a tar found (counted by the pair check, reported by validate,
    # counted by the loader)
    Reason("members", "duplicate_member", "a sample holds the same member twice"),
    Reason("members", "trailing_data", "bytes after the tar's end that are not zero padding"),
    Reason(
        "members", "unsafe_member_name", "a member name is absolute, has .. or is not plain text"
    ),
    Reason("members", "not_a_regular_file", "a member is a link, device or folder"),
    Reason("members", "sparse_member", "a member is a sparse file"),
    Reason("members", "empty_tar", "the tar file has no bytes"),
    Reason("members", "unreadable_tar", "the tar file cannot be opened"),
    Reason("members", "truncated_tar", "the tar ends mid-member"),
    Reason("members", "not_a_tar", "the file is not a tar"),
    Reason("members", "oversized_header", "a tar header declares more bytes than any real one"),
    Reason("members", "bad_header", "a tar header is malformed (a pax record's length, a chain)"),
    Reason("members", "not_a_file", "the shard path is a FIFO, device or folder: never opened"),
    Reason("members", "unexpected_member", "a member no sample kind has (.pickle): dropped unread"),
    # keys / values / shards: notes on written records
    Reason("keys", "derived", "the item had no id: its key comes from its file and position"),
    Reason("keys", "duplicate_id", "the item's id was taken: its key comes from its position"),
    Reason("values", "non_finite_as_null", "NaN/Infinity values written as null"),
    Reason("shards", "written", "shards written"),
    Reason("shards", "copied", "downloaded shards adopted unchanged, as a copy"),
    Reason("shards", "linked", "downloaded shards adopted unchanged, as a hard link"),
    Reason("shards", "rewritten", "downloaded shards rewritten without their bad samples"),
    Reason("shards", "empty", "downloaded shards left out: no sample was fit"),
    # validate: failures in validate's report, by shard and key
    Reason("validate", "missing_shard", "a named shard does not exist"),
    Reason("validate", "empty_tar", "the shard holds no sample"),
    Reason("validate", "duplicate_key", "a key appears in more than one sample"),
    Reason("validate", "schema", "the record breaks its JSON schema"),
    Reason("validate", "bad_json", "the json member is not valid JSON"),
    Reason("validate", "bad_base64", "an embedded image is not valid base64"),
    Reason("validate", "not_an_image", "an image is not a JPEG, PNG or WebP image"),
    Reason("validate", "too_many_pixels", "deep: an image is over the pixel cap"),
    Reason("validate", "undecodable_image", "deep: an image cannot be decoded"),
    Reason("validate", "bad_matrix_shape", "similarity_matrix is not images x sentences"),
    Reason("validate", "no_images", "no image_info entry has image_base64"),
    Reason("validate", "index_out_of_range", "matched_text_index names no sentence"),
    Reason("validate", "placeholder_mismatch", "the placeholders differ from image_map's keys"),
    Reason("validate", "placeholder_numbering", "placeholders are not numbered 1..n"),
    Reason("validate", "placeholder_repeated", "a placeholder appears more than once"),
    Reason("validate", "bad_roles", "text_roles or role_spans do not fit the record's text"),
    Reason("validate", "missing_image", "a pair sample has no image member"),
    Reason("validate", "missing_caption", "a pair sample has no txt member"),
    Reason("validate", "caption_not_utf8", "a caption is not UTF-8"),
    Reason("validate", "bad_sizes_json", "sizes.json is not valid JSON"),
    Reason("validate", "sizes_schema", "sizes.json breaks its schema"),
    Reason("validate", "missing_from_sizes_json", "a shard is not listed in sizes.json"),
    Reason("validate", "count_mismatch", "sizes.json's count differs from the shard's samples"),
    Reason("validate", "stats_schema", "stats.json breaks its schema"),
    # loader: samples the loader will not train on (its rejections)
    Reason("loader", "missing_json", "the sample has no json member"),
    Reason("loader", "unexpected_member", "the sample has members the loader does not read"),
    Reason("loader", "bad_json", "the json member is not valid JSON"),
    Reason("loader", "bad_record", "the record lacks a field the loader needs"),
    Reason("loader", "unknown_record_kind", "the record is no kind the loader knows"),
    Reason("loader", "bad_base64", "an embedded image is not valid base64"),
    Reason("loader", "undecodable_image", "an image cannot be decoded"),
    Reason("loader", "no_images", "no image of the sample is usable"),
    Reason("loader", "placeholder_without_image", "a placeholder names no image in image_map"),
    Reason("loader", "too_few_images_after_truncation", "truncation at max_tokens cut every image"),
    Reason("loader", "single_image_subsampled", "a one-image document left out by subsampling"),
    Reason("loader", "no_trainable_tokens", "no token of the sample would be trained on"),
    Reason("loader", "bad_roles", "text_roles or role_spans do not fit the record's text"),
    Reason("loader", "missing_caption", "a pair sample has no txt member"),
    Reason("loader", "bad_caption", "a pair's caption is not UTF-8"),
    # loader_images: images the loader drops from a document it keeps (preview greys them)
    Reason("loader_images", "no_image_bytes", "the image_info entry has no image_base64"),
    Reason("loader_images", "too_small", "the image is under min_image_bytes"),
    Reason("loader_images", "undecodable_image", "the image cannot be decoded"),
    Reason("loader_images", "below_threshold", "its best sentence is below sim_threshold"),
    Reason("loader_images", "not_matched", "no sentence was left to match it"),
    Reason("loader_images", "over_max_images", "the document already has max_images images"),
)


def _derived() -> tuple[Reason, ...]:
    """Image reasons as the images, documents and rows categories count them."""
    images = {**dict(_IMG2DATASET), **dict(_URL_REJECTS), **dict(_IMAGE_REJECTS)}
    images["rejected"] = "the image stage refused the image with no more precise reason"
    return (
        *(Reason("images", code, meaning) for code, meaning in images.items()),
        *(
            Reason("documents", f"image_{code}", f"an image was refused: {meaning}")
            for code, meaning in images.items()
        ),
        *(Reason("rows", code, meaning) for code, meaning in _IMG2DATASET),
        *(Reason("urls", code, meaning) for code, meaning in _IMG2DATASET),
        Reason("urls", "not_downloaded", "the url is in no attempt of the download folder"),
    )


def _registry(reasons: tuple[Reason, ...]) -> dict[tuple[str, str], Reason]:
    """Index by (category, code); a code registered twice in one category is a bug here."""
    registry: dict[tuple[str, str], Reason] = {}
    for reason in reasons:
        key = (reason.category, reason.code)
        if key in registry and registry[key].meaning != reason.meaning:
            raise AssertionError(f"reason {key} registered twice with other meanings")
        registry.setdefault(key, reason)
    return registry


REASONS: dict[tuple[str, str], Reason] = _registry(_REGISTERED + _derived())


def reasons_table() -> str:
    """The registry as a Markdown table, sorted by category and code."""
    lines = ["| category | reason | meaning |", "| --- | --- | --- |"]
    for category, code in sorted(REASONS):
        lines.append(f"| {category} | `{code}` | {REASONS[category, code].meaning} |")
    return "\n".join(lines) + "\n"
