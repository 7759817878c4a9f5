"""``Adapter``: uniform access to a loaded model's parts; ``family_of``: a config's family name.

The families themselves (one ``Adapter`` subclass per family, keyed by ``model_type``)
live in ``vlsparse.models.families``; this module keeps the names callers import.
"""

from __future__ import annotations

from vlsparse.models.families import Adapter, ImageSpan, family_for
from vlsparse.models.families.base import _token_runs


def family_of(config: dict) -> str:
    """Map a parsed config.json to a family name, or raise ``UnsupportedModelError``."""
    return family_for(config).family


__all__ = ["Adapter", "ImageSpan", "_token_runs", "family_for", "family_of"]
