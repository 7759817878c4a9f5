"""Really dropping prompt tokens inside a language model: one machinery for every token-reduction rule.

A ``TokenDrop`` holds the current prompt and which of its tokens each language-model
layer sees. ``attach_drop(model, layers, drop)`` registers its hooks; the rule that
decides is a callback, ``drop.decide(layer, hidden) -> Drop | None``, called at each
drop point during a prefill:

- **in the LM** (``layer >= 0``): a forward hook on decoder layer ``layer`` hands it
  the layer's output ``[1, n, D]`` and returns the survivors' rows only;
- **before the LM** (``layer == -1``): a forward pre-hook on layer 0 hands it the
  input embeddings and gathers them, so layer 0 and its KV cache already hold only
  the survivors.

Several drop points may follow each other (PyramidDrop, FEATHER, ToDRE): each keep set
is a subset of the previous one, always in indices of the FULL prompt (``Drop.keep``,
sorted). ``Drop.hidden`` optionally replaces the current hidden states before the
gather (VisionZip writes its merged embeddings at their slots).

Forward pre-hooks on every layer after the first drop point gather, with the keep set
active at that layer, ``position_embeddings`` (cos, sin: sequence on dim -2, 1-D and
multimodal RoPE alike), ``position_ids`` and a 2-D/4-D ``attention_mask`` (rows and key
columns), so the survivors keep their original rotary positions and each layer's KV
cache holds only its survivors. Each layer's keep set is remembered, so a decode
step's mask key columns are gathered per layer: a decode mask is sized by layer 0's
cache (its ``base`` prompt tokens, then the decoded ones), and layer ``l`` holds the
positions of its keep set within layer 0's, then every decoded token.

Decode positions: ``generate`` passes ``position_ids`` that count every prompt token,
dropped or not. A caller that passes none after a before-LM drop would get positions
from layer 0's (shorter) cache, so a pre-hook on the decoder stack then supplies them:
the prompt's last position (as the decoder saw it at prefill, M-RoPE sections
included) plus one per token decoded since.

A new prompt is recognised by an empty KV cache (``start_prompt``); dropping needs
batch size 1 and a known image mask (the caller's prompt hook decides).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlsparse.compat import cache_length, cache_of_call
from vlsparse.models.families.base import true_runs
from vlsparse.tokens.context import BEFORE_LM


@dataclass
class Drop:
    """What a drop point keeps: ``keep`` = sorted indices into the FULL prompt (a subset of the tokens
    held now); ``hidden``: optional [1, n_now, D] replacing the current hidden states before the gather."""

    keep: Tensor
    hidden: Tensor | None = None


@dataclass
class TokenDrop:
    """State shared by the drop hooks of one model (see the module docstring).

    ``stages``: the layers after which ``decide`` is asked (-1: before the LM).
    ``sparse_runtime`` (``vlsparse.kernels.runtime``), if set, is told the survivors' image
    spans after every drop, so its modality-aware heads see the shortened sequence.
    """

    decide: Callable[[int, Tensor], Drop | None]
    stages: tuple[int, ...]
    sparse_runtime: Any = None
    enabled: bool = True
    handles: list = field(default_factory=list, repr=False)
    # the current prompt
    active: bool = False
    prefill: bool = False
    prompt_len: int = 0
    image_mask: Tensor | None = field(default=None, repr=False)
    keep: Tensor | None = field(default=None, repr=False)
    layer_keep: dict[int, Tensor] = field(default_factory=dict, repr=False)
    base_keep: Tensor | None = field(default=None, repr=False)
    last_position: Tensor | None = field(default=None, repr=False)
    caller_positions: bool = True

    def start_prompt(self, prompt_len: int, image_mask: Tensor | None) -> None:
        """A new prompt of ``prompt_len`` tokens; ``image_mask`` ([N] bool) None = drop nothing."""
        self.prefill, self.prompt_len, self.image_mask = True, prompt_len, image_mask
        self.active = image_mask is not None
        self.keep, self.base_keep, self.last_position = None, None, None
        self.layer_keep = {}

    def decode_step(self, kwargs: dict) -> None:
        """A decode call of the model (its keyword arguments): no dropping, and note whether the
        caller passed ``position_ids`` (see the module docstring on decode positions)."""
        self.prefill = False
        self.caller_positions = kwargs.get("position_ids") is not None

    @property
    def base_len(self) -> int:
        """Prompt tokens layer 0 (and so a decode mask) holds."""
        return self.prompt_len if self.base_keep is None else int(self.base_keep.numel())

    def current_image_mask(self) -> Tensor | None:
        """Image positions of the sequence held now ([n_now] bool), or None when not dropping."""
        if self.image_mask is None:
            return None
        return self.image_mask if self.keep is None else self.image_mask[self.keep.to(self.image_mask.device)]

    def held(self) -> int:
        """Tokens of the prompt held now."""
        return self.prompt_len if self.keep is None else int(self.keep.numel())

    def apply(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Ask ``decide`` at drop point ``layer``; returns the survivors' hidden states, or None (unchanged)."""
        if not (self.enabled and self.active and self.prefill) or hidden.shape[0] != 1 or \
                hidden.shape[1] != self.held():
            return None
        drop = self.decide(layer, hidden)
        if drop is None:
            return None
        new_keep = drop.keep.to(hidden.device).long()
        rows = new_keep if self.keep is None else torch.searchsorted(self.keep.to(hidden.device), new_keep)
        source = hidden if drop.hidden is None else drop.hidden
        self.keep = new_keep
        if self.sparse_runtime is not None:
            self.sparse_runtime.spans = true_runs(self.image_mask.to(new_keep.device)[new_keep])
        return gather(source, 1, rows)


def gather(t: Tensor, dim: int, index: Tensor) -> Tensor:
    return t.index_select(dim, index.to(t.device))


def key_columns(keep: Tensor, base_keep: Tensor | None, base_len: int, kv_len: int) -> Tensor:
    """Mask key columns a layer holding ``keep`` needs, in the coordinates of a mask sized by layer 0:
    the positions of ``keep`` within layer 0's prompt tokens ``base_keep`` (None: all), then every later token."""
    inside = keep if base_keep is None else torch.searchsorted(base_keep.to(keep.device), keep)
    return torch.cat([inside, torch.arange(base_len, kv_len, device=keep.device)])


# ----------------------------------------------------------------------------- hooks


def _drop_hook(drop: TokenDrop, layer: int):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        short = drop.apply(layer, hidden)
        if short is None:
            return None
        return (short, *output[1:]) if isinstance(output, tuple) else short

    return hook


def _survivor_hook(drop: TokenDrop, layer: int, before_lm: bool):
    def hook(module, args, kwargs):
        if not (drop.enabled and drop.active):
            return None
        if before_lm:  # layer 0 with a drop before the LM: drop its input first
            hidden = args[0] if args else kwargs["hidden_states"]
            short = drop.apply(BEFORE_LM, hidden)
            if short is not None:
                if args:
                    args = (short, *args[1:])
                else:
                    kwargs["hidden_states"] = short
                drop.base_keep = drop.keep
        if drop.prefill:
            keep = drop.keep
            if keep is None:
                return (args, kwargs) if before_lm else None
            drop.layer_keep[layer] = keep
        else:
            keep = drop.layer_keep.get(layer)
            if keep is None:
                return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len, full = hidden.shape[1], drop.prompt_len
        keep = keep.to(hidden.device)
        pe = kwargs.get("position_embeddings")
        if pe is not None and pe[0].shape[-2] == full and q_len != full:
            kwargs["position_embeddings"] = tuple(gather(t, t.dim() - 2, keep) for t in pe)
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor) and pos.shape[-1] == full and q_len != full:
            kwargs["position_ids"] = gather(pos, pos.dim() - 1, keep)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() in (2, 4):
            if mask.dim() == 4 and mask.shape[-2] == full and q_len != full:
                mask = gather(mask, 2, keep)
            coords, base = (full, None) if drop.prefill else (drop.base_len, drop.base_keep)
            if mask.shape[-1] >= coords:
                mask = gather(mask, mask.dim() - 1, key_columns(keep, base, coords, mask.shape[-1]))
            kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def _stack_hook(drop: TokenDrop):
    """On the decoder stack: note the prompt's last position at prefill; after a before-LM drop, supply
    decode positions a caller did not pass (see the module docstring)."""

    def hook(module, args, kwargs):
        if not (drop.enabled and drop.active):
            return None
        pos = kwargs.get("position_ids")
        if drop.prefill:
            if isinstance(pos, Tensor):
                drop.last_position = pos[..., -1:].clone()
            else:
                drop.last_position = torch.full((1, 1), drop.prompt_len - 1, dtype=torch.long)
            return None
        if drop.caller_positions or drop.base_len == drop.prompt_len or drop.last_position is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        q_len = embeds.shape[1] if isinstance(embeds, Tensor) else (args[0].shape[-1] if args else 1)
        done = cache_length(cache_of_call(kwargs)) - drop.base_len  # tokens decoded since the prompt
        last = drop.last_position
        steps = torch.arange(1, q_len + 1, device=last.device).view(*([1] * (last.dim() - 1)), q_len)
        kwargs["position_ids"] = last + done + steps
        return args, kwargs

    return hook


def prompt_of_call(adapter, args: tuple, kwargs: dict):
    """(length, image spans) of a prefill call of the model, from its forward pre-hook; spans are None
    when image tokens cannot be dropped (a text-only model, a batch of several prompts, no ``input_ids``)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = ids.shape[-1] if ids is not None else embeds.shape[1] if embeds is not None else 0
    if not adapter.is_vlm or ids is None or ids.shape[0] != 1:
        return length, None
    return length, adapter.image_spans({**kwargs, "input_ids": ids})


def span_mask(spans, length: int) -> Tensor:
    """[length] bool: True on the image tokens of ``spans``."""
    mask = torch.zeros(length, dtype=torch.bool)
    for span in spans:
        mask[span.start:span.end] = True
    return mask


NOT_DROPPED = "tokens not dropped (batch of several prompts, or no input_ids)"


MODEL_ATTR = "vlsparse_token_drop"


def check_free(model) -> None:
    """``InputError`` if image tokens of ``model`` are already dropped by an attached runtime."""
    if getattr(model, MODEL_ATTR, None) is not None:
        from vlsparse.errors import InputError

        raise InputError("image tokens of this model are already dropped by another runtime (core tokens or "
                         "a token-reduction method)", "detach it first: use one of the two")


def attach_drop(model, stack, layers: list, drop: TokenDrop, adapter=None) -> TokenDrop:
    """Register ``drop``'s hooks on the decoder ``layers`` (and the decoder ``stack`` holding them),
    and the hooks of ``adapter.follow_token_drop`` (the family's per-token additions, e.g. Qwen3-VL's
    DeepStack features, follow the survivors).

    The caller's forward pre-hook on ``model`` calls ``drop.start_prompt`` at each prefill and
    ``drop.decode_step(kwargs)`` at each decode step. One dropper per model: a second
    one (CoreMatching and a visual-token method together) is an ``InputError``.
    """
    if not drop.stages:
        return drop
    check_free(model)
    setattr(model, MODEL_ATTR, drop)
    stages = sorted(set(drop.stages))
    before_lm = stages[0] == BEFORE_LM
    for layer in stages:
        if layer != BEFORE_LM:
            drop.handles.append(layers[layer].register_forward_hook(_drop_hook(drop, layer)))
    first = 0 if before_lm else stages[0] + 1
    for index in range(first, len(layers)):
        drop.handles.append(layers[index].register_forward_pre_hook(
            _survivor_hook(drop, index, before_lm and index == 0), with_kwargs=True))
    if before_lm:
        drop.handles.append(stack.register_forward_pre_hook(_stack_hook(drop), with_kwargs=True))
    if adapter is not None:
        drop.handles.extend(adapter.follow_token_drop(drop))
    return drop


def detach_drop(model, drop: TokenDrop) -> None:
    """Remove ``drop``'s hooks from ``model``."""
    drop.enabled = False
    for handle in drop.handles:
        handle.remove()
    drop.handles.clear()
    if getattr(model, MODEL_ATTR, None) is drop:
        delattr(model, MODEL_ATTR)


__all__ = ["BEFORE_LM", "NOT_DROPPED", "Drop", "TokenDrop", "attach_drop", "check_free", "detach_drop", "gather",
           "key_columns", "prompt_of_call", "span_mask"]
