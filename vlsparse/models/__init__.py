"""Model loading and per-family adapters.

    loaded = load("demo")                      # or a folder, or a hub id
    inputs = loaded.prepare([image], "What color is the circle?")
    loaded.adapter.image_spans(inputs)         # where each image's tokens are
"""

from vlsparse.models.adapter import Adapter, ImageSpan, family_of
from vlsparse.models.loading import LoadedModel, load

__all__ = ["Adapter", "ImageSpan", "LoadedModel", "family_of", "load"]
