"""Shards -> Flamingo batches (``vision_x``, ``lang_x``, ``attention_mask``, ``labels``, keys, dataset).

Keeps open_flamingo's text/label contract, binds images in text order, counts every rejection, never
unpickles, and can save/restore its position with a checkpoint.

Names are exported lazily (PEP 562): the torch-free parts (config, sample planning, the byte
tokenizer) are importable without the [train] extra; ``build_loader`` and ``FlamingoLoader`` need it.
"""

from __future__ import annotations

from flamingo_data.core.extras import lazy_exports as _lazy_exports

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "DatasetSpec": "flamingo_data.loader.config",
    "LoaderConfig": "flamingo_data.loader.config",
    "FlamingoLoader": "flamingo_data.loader.pipeline",
    "build_loader": "flamingo_data.loader.pipeline",
    "make_tokenizer": "flamingo_data.loader.tokenizer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
