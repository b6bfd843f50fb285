"""Shards -> Flamingo batches (``vision_x``, ``lang_x``, ``attention_mask``, ``labels``, keys, dataset).

Keeps open_flamingo's text/label contract, binds images in text order, counts every rejection, never
unpickles, and can save/restore its position with a checkpoint.
"""

from flamingo_data.loader.config import DatasetSpec, LoaderConfig
from flamingo_data.loader.pipeline import FlamingoLoader, build_loader
from flamingo_data.loader.tokenizer import make_tokenizer

__all__ = ["DatasetSpec", "FlamingoLoader", "LoaderConfig", "build_loader", "make_tokenizer"]
