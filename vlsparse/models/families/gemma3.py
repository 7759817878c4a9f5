"""The Gemma 3 family: ``Gemma3ForConditionalGeneration``.

A SigLIP vision tower (``model.vision_tower``), a projector that average-pools the
patch grid to ``mm_tokens_per_image`` tokens (``model.multi_modal_projector``) and a
Gemma 3 language model whose sliding-window layers alternate with global ones
(``text_config.layer_types``, window ``text_config.sliding_window``). The processor
expands each image placeholder into ``<start_of_image>``, ``mm_tokens_per_image``
``<image_soft_token>`` tokens (a square grid) and ``<end_of_image>``; the span is the
soft tokens, boi/eoi stay outside it. The model lets an image's tokens attend to
each other bidirectionally (from the processor's ``token_type_ids``); the runtime
follows the model's mask there and on the sliding layers (``vlsparse.kernels.runtime``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from vlsparse.compat import cache_layer_keys, cache_of_call
from vlsparse.models.families.base import VisionLanguageAdapter, square_image_grids


class Gemma3Adapter(VisionLanguageAdapter):
    """Gemma 3 (vision): SigLIP tower + pooling projector + Gemma 3 LM with sliding/global layers."""

    family: ClassVar[str] = "gemma3"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gemma3",)
    SUPPORTED: ClassVar[str] = "Gemma 3"

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        image = getattr(processor, "boi_token", "<start_of_image>")
        return f"<start_of_turn>user\n{image * n_images}{question}<end_of_turn>\n<start_of_turn>model\n"

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """One square grid of ``mm_tokens_per_image`` tokens per image (pan-and-scan crops are images too)."""
        per_image = int(self.model.config.mm_tokens_per_image)
        side = math.isqrt(per_image)
        return square_image_grids(inputs, side, self.image_token_id) if side * side == per_image else None

    # -- token dropping ------------------------------------------------------------------
    def follow_token_drop(self, drop) -> list:
        """Keep each sliding layer's window over the original positions while decoding after a drop.

        A sliding layer's cache keeps its last ``sliding_window - 1`` entries by count; once
        prompt tokens are dropped those may reach further back than the window, so at each
        decode step a pre-hook on every sliding layer that holds survivors masks the cached
        keys whose original position is ``sliding_window`` or more before the query's.
        (At prefill the model's own sliding mask is cut down to the survivors already.)
        """
        text = self.text_config
        return [layer.register_forward_pre_hook(_window_after_drop(drop, index, int(text.sliding_window)),
                                                with_kwargs=True)
                for index, layer in enumerate(self.lm_layers())
                if text.layer_types[index] == "sliding_attention"]


def _window_after_drop(drop, layer: int, window: int):
    """Decoder-layer pre-hook: the decode mask of sliding ``layer`` limited to keys inside the window."""

    def hook(module, args, kwargs):
        keep = drop.layer_keep.get(layer) if drop.enabled and drop.active and not drop.prefill else None
        cache, positions = cache_of_call(kwargs), kwargs.get("position_ids")
        if keep is None or cache is None or not isinstance(positions, torch.Tensor):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        queries = positions.reshape(-1)[-hidden.shape[1]:].to(hidden.device)
        held = torch.cat([keep.to(hidden.device), torch.arange(drop.prompt_len, int(queries[-1]) + 1,
                                                               device=hidden.device)])
        keys = held[-(cache_layer_keys(cache, layer).shape[-2] + hidden.shape[1]):]
        allowed = (keys[None, :] <= queries[:, None]) & (queries[:, None] - keys[None, :] < window)
        mask = kwargs.get("attention_mask")
        if mask is None:
            kwargs["attention_mask"] = allowed[None, None]
        elif mask.dim() == 4 and mask.shape[-1] == keys.numel():
            kwargs["attention_mask"] = (mask & allowed if mask.dtype == torch.bool
                                        else mask.masked_fill(~allowed, torch.finfo(mask.dtype).min))
        return args, kwargs

    return hook

