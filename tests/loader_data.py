"""Hand-built records and shards for the loader tests (real JPEG bytes, real tars)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from flamingo_data.core.records import encode_base64
from flamingo_data.storage.shard_writer import ShardWriter


def solid_jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def interleaved_record(
    sentences: list[str], matrix: list[list[float]], images: list[bytes | None]
) -> dict:
    infos = []
    for i, data in enumerate(images):
        info = {
            "image_name": f"{i}.jpg",
            "raw_url": "",
            "matched_text_index": 0,
            "matched_sim": 0.3,
        }
        if data is not None:
            info["image_base64"] = encode_base64(data)
        infos.append(info)
    return {"url": "u", "text_list": sentences, "image_info": infos, "similarity_matrix": matrix}


def write_json_shard(out_dir: Path, prefix: str, records: dict[str, dict]) -> Path:
    writer = ShardWriter(out_dir, prefix)
    for key, record in records.items():
        writer.write(key, {"json": json.dumps(record).encode()})
    sizes = writer.close()
    sizes_file = out_dir / "sizes.json"
    merged = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    merged.update(sizes)
    sizes_file.write_text(json.dumps(merged))
    return out_dir / next(iter(sizes))


def simple_docs(n: int, seed: int = 0) -> dict[str, dict]:
    """n one-image documents with distinct keys and colours."""
    docs = {}
    for i in range(n):
        color = ((i * 37 + seed) % 256, (i * 91) % 256, (i * 13 + 50) % 256)
        docs[f"doc{seed}_{i:04d}"] = interleaved_record(
            [f"Sentence {i}.", "More text."], [[0.3, 0.1]], [solid_jpeg(color)]
        )
    return docs
