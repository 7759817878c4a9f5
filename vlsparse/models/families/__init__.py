"""Model families: one ``Adapter`` subclass per family, one module each, keyed by ``model_type``.

- ``llava``: LLaVA 1.5 / NeXT / OneVision (``llava.LlavaAdapter``);
- ``qwen2_vl``, ``qwen2_5_vl``: Qwen2-VL and Qwen2.5-VL (``qwen2_vl``);
- ``gemma3``: Gemma 3 with images (``gemma3.Gemma3Adapter``);
- ``paligemma``: PaliGemma (``paligemma.PaliGemmaAdapter``);
- ``idefics3``: Idefics3 and SmolVLM, images split into tiles (``idefics3.Idefics3Adapter``);
- ``mllama``: Llama 3.2 Vision, images through cross-attention layers (``mllama.MllamaAdapter``);
- ``qwen3_vl``: Qwen3-VL, DeepStack features kept in step with dropped tokens (``qwen3_vl.Qwen3VLAdapter``);
- ``internvl``: InternVL (transformers-native), pixel-shuffled image tiles (``internvl.InternVLAdapter``);
- ``causal_lm``: Llama-style decoder-only LMs (``causal_lm.CausalLMAdapter``).

Adding a family: a module with its ``Adapter`` subclass (see ``base``), its entry in
``FAMILIES`` below, and its case in ``tests/test_model_families.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from vlsparse.errors import UnsupportedModelError
from vlsparse.models.families.base import Adapter, ImageSpan, VisionLanguageAdapter
from vlsparse.models.families.causal_lm import CausalLMAdapter
from vlsparse.models.families.gemma3 import Gemma3Adapter
from vlsparse.models.families.idefics3 import Idefics3Adapter
from vlsparse.models.families.internvl import InternVLAdapter
from vlsparse.models.families.llava import LlavaAdapter
from vlsparse.models.families.mllama import MllamaAdapter
from vlsparse.models.families.paligemma import PaliGemmaAdapter
from vlsparse.models.families.qwen2_vl import Qwen25VLAdapter, Qwen2VLAdapter
from vlsparse.models.families.qwen3_vl import Qwen3VLAdapter

FAMILIES: tuple[type[Adapter], ...] = (LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Gemma3Adapter, PaliGemmaAdapter,
                                       Idefics3Adapter, MllamaAdapter, Qwen3VLAdapter, InternVLAdapter,
                                       CausalLMAdapter)
"""Every family, in the order error messages list them."""


def registry() -> dict[str, type[Adapter]]:
    """A fresh table: config.json ``model_type`` -> family class."""
    return {model_type: family for family in FAMILIES for model_type in family.MODEL_TYPES}


def _classes(table: Mapping[str, type[Adapter]]) -> list[type[Adapter]]:
    return list(dict.fromkeys(table.values()))


def supported_text(table: Mapping[str, type[Adapter]] | None = None) -> str:
    """``LLaVA (...), Qwen2-VL, ...``: the supported families, for error messages."""
    return ", ".join(family.SUPPORTED for family in _classes(registry() if table is None else table))


def family_for(config: dict, table: Mapping[str, type[Adapter]] | None = None) -> type[Adapter]:
    """The family class of a parsed config.json, or ``UnsupportedModelError``."""
    table = registry() if table is None else table
    model_type = config.get("model_type", "")
    family = table.get(model_type)
    if family is not None and family.accepts(config):
        return family
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else model_type or "unknown"
    raise UnsupportedModelError(f"architecture {name} is not supported", f"supported: {supported_text(table)}")


def family_named(name: str, table: Mapping[str, type[Adapter]] | None = None) -> type[Adapter]:
    """The family class whose ``family`` is ``name`` (``ValueError`` for an unknown name)."""
    classes = _classes(registry() if table is None else table)
    for family in classes:
        if family.family == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.family for f in classes)}")


__all__ = ["FAMILIES", "Adapter", "CausalLMAdapter", "ImageSpan", "LlavaAdapter", "Qwen25VLAdapter",
           "Qwen2VLAdapter", "VisionLanguageAdapter", "family_for", "family_named", "registry", "supported_text"]
