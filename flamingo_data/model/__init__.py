"""The packaged Flamingo model: Perceiver resampler + gated cross-attention over pluggable encoders.

Names are exported lazily (PEP 562), so importing the package needs no torch; using them needs the
[train] extra.
"""

from __future__ import annotations

from flamingo_data.core.extras import lazy_exports as _lazy_exports

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Flamingo": "flamingo_data.model.flamingo",
    "FlamingoConfig": "flamingo_data.model.flamingo",
    "FlamingoOutput": "flamingo_data.model.flamingo",
    "build_flamingo": "flamingo_data.model.build",
    "model_config": "flamingo_data.model.openflamingo",
    "load_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
    "save_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
