"""Loader options and dataset specs: plain dataclasses, never the trainer's whole argparse namespace."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flamingo_data.errors import InputError

LOSS_ON = ("assistant", "all")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LoaderConfig:
    """Defaults follow open_flamingo's published recipe, where it is sound."""

    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    max_tokens: int = 256
    pair_max_tokens: int = 32
    max_images: int = 6
    min_images: int = 1
    sim_threshold: float = 0.24
    min_image_bytes: int = 0
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    flip_prob: float = 0.5
    single_image_keep_prob: float = 1.0
    max_pixels: int = 64_000_000
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    resample: bool = False
    samples_per_epoch: int | None = None
    drop_last: bool = False
    prefetch_factor: int = 2
    # "float": normalized float32 vision_x; "uint8": pixels as they are, normalized on the device
    # by normalize_vision (4x less to copy to a GPU, no per-pixel work in the training process)
    pixels: str = "float"
    # "assistant": records that name their turns' roles (converted conversations) train on the
    # assistant's text only; "all": every record trains on all its text
    loss_on: str = "assistant"

    def __post_init__(self) -> None:
        if self.pixels not in ("float", "uint8"):
            raise InputError(f"`pixels` must be float or uint8, not {self.pixels!r}")
        if self.loss_on not in LOSS_ON:
            raise InputError(f"`loss_on` must be one of {', '.join(LOSS_ON)}, not {self.loss_on!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: shard specs (brace patterns, lists, folders), kind, and mixing weight."""

    name: str
    shards: str | list[str] | tuple[str, ...]
    kind: str = "auto"
    weight: float = 1.0

    def __post_init__(self) -> None:
        """A weight must be a finite number above 0: any other makes the mix's probabilities
        meaningless (NaN, or a 0-weight dataset drawn once the others run out)."""
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise InputError(
                f"dataset {self.name!r}: weight must be a finite number above 0, got {self.weight!r}"
                " (to leave a dataset out, do not list it)"
            )
