"""The packaged Flamingo model: Perceiver resampler + gated cross-attention over pluggable encoders."""

from flamingo_data.model.build import build_flamingo
from flamingo_data.model.flamingo import Flamingo, FlamingoConfig, FlamingoOutput

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "build_flamingo"]
