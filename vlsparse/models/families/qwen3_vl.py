"""The Qwen3-VL family (``qwen3_vl``): Qwen2-VL's layout plus DeepStack.

A ViT (``model.visual``, blocks in ``visual.blocks``) whose patch merger (``visual.merger``)
is the projector, and a Qwen3 language model with interleaved multimodal RoPE. Each image
becomes ``t * (h / m) * (w / m)`` ``<|image_pad|>`` tokens between ``<|vision_start|>`` and
``<|vision_end|>``, from the processor's ``image_grid_thw`` and the merge size ``m``, as in
Qwen2-VL. The processor is loaded without its video half when that needs torchvision.

DeepStack: the vision blocks ``vision_config.deepstack_visual_indexes`` feed merged features
(their own mergers, ``visual.deepstack_merger_list``: neither the projector nor a pruned block)
to the first ``len(deepstack_visual_indexes)`` language layers: the decoder stack adds feature
``j`` of every visual token to its hidden state right after layer ``j``. The stack indexes
them by the FULL prompt's visual positions, so once image tokens are dropped
(``vlsparse.kernels.token_drop``) the adapter takes that addition over (``follow_token_drop``):
a pre-hook on the decoder stack takes the features out of the call, and a forward hook on
each DeepStack layer adds to each visual token the layer holds its own feature (picked by
its ordinal among the prompt's visual tokens); dropped tokens' features are skipped. The
hook runs before the layer's drop hook, so a drop point after layer ``j`` sees (and keeps)
what layer ``j + 1`` would see: layer ``j``'s output with feature ``j`` added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from vlsparse.compat import take_deepstack
from vlsparse.errors import InputError
from vlsparse.models.families.base import image_only_processor, torchvision_available
from vlsparse.models.families.qwen2_vl import Qwen2VLAdapter

UNALIGNED_HINT = "run this prompt without dropping image tokens (no core tokens, no token-reduction method)"


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's ViT + patch merger + multimodal-RoPE LM, with DeepStack features
    added to the first language layers (kept in step with dropped image tokens)."""

    family: ClassVar[str] = "qwen3_vl"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    SUPPORTED: ClassVar[str] = "Qwen3-VL"

    @classmethod
    def required_sub_configs(cls, config: dict) -> tuple[str, ...]:
        return ("text_config", "vision_config")

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        from transformers import AutoProcessor

        if torchvision_available():
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return image_only_processor(folder, "Qwen3VLProcessor", "Qwen2VL", trust_remote_code)  # no video half

    @property
    def deepstack_layers(self) -> int:
        """How many language layers (the first ones) receive DeepStack features."""
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def follow_token_drop(self, drop) -> list:
        """Take the DeepStack addition over while ``drop`` drops image tokens (see the module docstring)."""
        layers = self.lm_layers()[:self.deepstack_layers]
        follower = DeepStackFollower(drop, len(layers))
        handles = [self.language_model().register_forward_pre_hook(follower.take, with_kwargs=True)]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(follower.adder(index), prepend=True))
        return handles


@dataclass
class DeepStackFollower:
    """The DeepStack features of the prompt being prefilled while tokens are dropped.

    ``layers``: how many first layers have an adder; ``visual``: [N] bool, the full prompt's
    visual positions; ``ordinal``: [N] long, each visual position's row in the features;
    ``features``: one [n_visual, D] per DeepStack layer (emptied after the last one, and on
    every call that does not drop).
    """

    drop: Any
    layers: int
    visual: Tensor | None = field(default=None, repr=False)
    ordinal: Tensor | None = field(default=None, repr=False)
    features: list[Tensor] = field(default_factory=list, repr=False)

    def take(self, module, args, kwargs):
        """Decoder-stack pre-hook: take the features out of a prefill call whose tokens may be dropped."""
        self.features, self.visual, self.ordinal = [], None, None
        drop = self.drop
        if not (drop.enabled and drop.active and drop.prefill):
            return None  # the stack adds its features itself
        taken = take_deepstack(kwargs)
        if taken is None:
            return None
        mask, features = taken
        if len(features) > self.layers:
            raise InputError(f"Qwen3-VL's DeepStack features feed {len(features)} layers, but vision_config names "
                             f"{self.layers} (deepstack_visual_indexes)", UNALIGNED_HINT)
        if mask.shape[0] != 1 or mask.shape[-1] != drop.prompt_len:
            raise InputError(f"Qwen3-VL's DeepStack features cover {tuple(mask.shape)} tokens, not the "
                             f"{drop.prompt_len}-token prompt whose image tokens are dropped",
                             UNALIGNED_HINT)
        self.visual = mask[0].bool()
        self.ordinal = torch.cumsum(self.visual.long(), 0) - 1
        self.features = features
        return args, kwargs

    def adder(self, index: int):
        """Forward hook of DeepStack layer ``index``: add feature ``index`` to the visual tokens it holds."""

        def hook(module, args, output):
            if index >= len(self.features):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            held = self.drop.keep
            visual = self.visual.to(hidden.device)
            ordinal = self.ordinal.to(hidden.device)
            if held is not None:
                held = held.to(hidden.device)
                visual, ordinal = visual[held], ordinal[held]
            if hidden.shape[0] != 1 or hidden.shape[1] != visual.numel():
                raise InputError(f"layer {index} holds {hidden.shape[1]} tokens but the kept set has "
                                 f"{visual.numel()}: DeepStack features cannot be lined up",
                                 UNALIGNED_HINT)
            rows = visual.nonzero().flatten()
            feature = self.features[index].to(hidden.device, hidden.dtype)
            added = hidden.clone()
            added[0, rows] = hidden[0, rows] + feature[ordinal[rows]]
            if index == len(self.features) - 1:
                self.features = []
            return (added, *output[1:]) if isinstance(output, tuple) else added

        return hook
