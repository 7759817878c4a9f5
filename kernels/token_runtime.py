"""Visual-token reduction at run time: a ``vlsparse.tokens`` method, driven by its schedule.

``attach_tokens(loaded, settings)`` (``settings``: ``vlsparse.profile.tokens.TokenSettings``)
follows the registry's runtime recipe on every prompt (batch size 1, ``input_ids``; other
calls run dense): at each stage of ``method.schedule`` it builds the ``TokenContext``
(current image mask, hidden states, image index, grid at the first drop, attention
received, vision [CLS] attention), calls ``method.select`` with ``count_for(stage.keep,
original image tokens)``, and keeps every non-image token plus the selected image
tokens (VisionZip's merged embeddings are written at their slots, which survive). The
dropping is ``vlsparse.kernels.token_drop``: survivors keep their rotary positions
(M-RoPE included), later layers and their KV caches hold only survivors, decode masks
are gathered per layer. A sparse runtime (``sparse_runtime``) is told the survivors'
image spans after every stage, so sparse attention runs over the shorter sequence.

Attention scores: the model runs transformers' attention through the ``"vlsparse"``
registry entry (SDPA when no sparse profile is attached); the scoring layer's attention
module gets an observer (``vlsparse.kernels.runtime``) that sees the post-RoPE query and
key of the prefill and fills ``TokenContext.received`` with
``vlsparse.tokens.attention.received_for`` (row blocks, never an N x N matrix). The vision
tower's [CLS] attention comes the same way (``vlsparse.kernels.token_vision``).

Deviations from the papers' recipes, by design of this runtime:

- ``AttentionSpec.layer_offset = 1`` (PyramidDrop, FEATHER: score with the NEXT layer's
  projections applied to layer L's output, then drop before layer L+1) is served by
  scoring with layer L+1's own attention over the tokens it holds and dropping AFTER
  layer L+1: the same q/k, but layer L+1 still runs on every token, one layer of
  savings fewer per stage. ``stats()`` reports both layers (``layer``, ``drop_after``).
  A stage that would then cut after the LAST layer saves nothing (``generate`` computes
  only the last position's logits) and is skipped, with a note (PyramidDrop's last
  stage on a 4-layer LM): the counts reported are the ones some layer really ran on.
- ``rope=False`` (FEATHER) is served with rotary-embedded q/k: the attention function
  only ever sees roped states, so FEATHER's RoPE-free criterion is approximated.
- VisionZip's [CLS] attention is read only from a LLaVA CLIP tower; other models refuse
  ``visionzip`` with a one-line error naming what is missing (ToDRE falls back to its
  documented pivot without it).
- A model loaded with ``attn_implementation="eager"`` runs SDPA while attached.

Cost: scoring is one more attention pass over the chosen rows, in float32 row blocks
(``received_for``). ``rows="last"`` (PyramidDrop, FEATHER, FastV's reference code) is one
row; FastV's paper criterion ``rows="all"`` and ZipVL score every row, a full extra
attention pass at the scoring layer, which a small LM's prefill does not earn back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from vlsparse import compat
from vlsparse.compat import cache_length, cache_of_call
from vlsparse.errors import InputError
from vlsparse.kernels.runtime import ATTENTION_NAME, RUNTIME_ATTR, register_attention, set_observer
from vlsparse.kernels.token_drop import (BEFORE_LM, NOT_DROPPED, Drop, TokenDrop, attach_drop, detach_drop,
                                         prompt_of_call, span_mask)
from vlsparse.kernels.token_vision import VisionCapture, vision_observer, vision_source
from vlsparse.profile.tokens import TokenSettings, schedule_text
from vlsparse.tokens import TokenContext, count_for, method_named
from vlsparse.tokens.attention import received_for


@dataclass
class PlannedStage:
    """One schedule stage as this runtime runs it: ``drop_after`` = the layer whose output is cut
    (``layer`` + the attention spec's ``layer_offset``; -1 before the LM)."""

    index: int
    layer: int
    keep: float
    drop_after: int
    spec: Any = None
    skipped: bool = False


@dataclass
class TokenRuntime:
    """State shared by the hooks of one model: the method, its stages, and the current prompt."""

    settings: TokenSettings
    method: ModuleType
    stages: list[PlannedStage]
    num_layers: int
    drop: TokenDrop | None = field(default=None, repr=False)
    enabled: bool = True
    sparse_runtime: Any = None
    handles: list = field(default_factory=list, repr=False)
    observed: list = field(default_factory=list, repr=False)
    original_attention: str | None = None
    vision: VisionCapture | None = field(default=None, repr=False)
    # the current prompt
    image_total: int = 0
    image_ordinal: Tensor | None = field(default=None, repr=False)  # [N] long: image token ordinal, -1 = text
    image_index: Tensor | None = field(default=None, repr=False)  # [n_image] long: which image
    grids: list[tuple[int, int]] | None = None
    received: dict[int, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    stage_stats: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    plan_note: str = ""

    def start_prompt(self, prompt_len: int, image_mask: Tensor | None, spans=(), note: str = "",
                     image_total: int = 0) -> None:
        self.note, self.received, self.stage_stats = note, {}, []
        self.image_total = int(image_mask.sum()) if image_mask is not None else image_total
        self.image_ordinal = self.image_index = self.grids = None
        if image_mask is not None:
            ordinal = torch.full((prompt_len,), -1, dtype=torch.long)
            ordinal[image_mask] = torch.arange(self.image_total)
            self.image_ordinal = ordinal
            self.image_index = torch.cat([torch.full((s.length,), i, dtype=torch.long) for i, s in enumerate(spans)])
            self.grids = [(s.rows, s.cols) if s.rows and s.cols else (0, 0) for s in spans]
        self.drop.start_prompt(prompt_len, image_mask)

    @property
    def image_kept(self) -> int:
        return self.stage_stats[-1]["kept"] if self.stage_stats else self.image_total

    def stats(self) -> dict[str, Any]:
        """What the last prompt kept, per stage and in the end (image tokens)."""
        s = self.settings
        return {
            "method": s.method, "keep": s.keep, "params": dict(s.params),
            "schedule": [{"layer": p.layer, "keep": p.keep, "drop_after": None if p.skipped else p.drop_after}
                         for p in self.stages],
            "stages": [dict(row) for row in self.stage_stats],
            "image_tokens_kept": self.image_kept, "image_tokens_total": self.image_total,
            "note": "; ".join(x for x in (self.plan_note, self.note) if x),
        }

    def describe(self) -> str:
        """``image tokens kept 36/144 (fastv, after layer 1)``; one count per stage that ran."""
        counts = "→".join(str(r["kept"]) for r in self.stage_stats)
        where = ", ".join("before the LM" if p.drop_after < 0 else f"after layer {p.drop_after}"
                          for p in self.stages if not p.skipped)
        text = f"image tokens kept {self.image_kept}/{self.image_total} ({self.settings.method}, {where}"
        text += f"; {self.image_total}→{counts})" if len(self.stage_stats) > 1 else ")"
        note = self.stats()["note"]
        return text + (f", {note}" if note else "")

    # -- the drop decision -------------------------------------------------------------------
    def decide(self, layer: int, hidden: Tensor) -> Drop | None:
        stage = next((p for p in self.stages if p.drop_after == layer and not p.skipped), None)
        drop = self.drop
        current = drop.current_image_mask()
        if stage is None or not self.enabled or current is None:
            return None
        current = current.to(hidden.device)
        held = torch.arange(drop.prompt_len, device=hidden.device) if drop.keep is None else drop.keep
        image_rows = current.nonzero().flatten()
        ordinals = self.image_ordinal.to(hidden.device)[held[image_rows]]
        before = int(image_rows.numel())
        received = self.received.pop(layer, {})
        row = {"layer": stage.layer, "drop_after": layer, "keep": round(stage.keep, 6), "kept": before,
               "total": before}
        self.stage_stats.append(row)
        if before == 0:
            return None
        if stage.spec is not None and not received:
            row["note"] = "no attention scores captured: nothing dropped"
            return None
        vision_attention = vision_keys = None
        if self.vision is not None:
            attention, keys = self.vision.per_token(self.image_total)
            self.vision.clear()
            if attention is not None:
                vision_attention, vision_keys = attention[ordinals.cpu()], keys[ordinals.cpu()]
        ctx = TokenContext(image_mask=current, hidden=hidden[0], image_index=self.image_index[ordinals.cpu()],
                           grid=self.grids if drop.keep is None else None, received=received,
                           vision_attention=vision_attention, vision_keys=vision_keys, layer=stage.layer,
                           num_layers=self.num_layers)
        selection = self.method.select(ctx, count_for(stage.keep, self.image_total), stage=stage.index,
                                       **{**self.settings.params, "keep": self.settings.keep})
        survive = ~current
        survive[image_rows[selection.kept.to(hidden.device)]] = True
        new_hidden = None
        if selection.merged is not None and selection.merged_slots is not None and selection.merged_slots.numel():
            slots = image_rows[selection.merged_slots.to(hidden.device)]
            survive[slots] = True
            new_hidden = hidden.clone()
            new_hidden[0, slots] = selection.merged.to(device=hidden.device, dtype=hidden.dtype)
        row["kept"] = int((survive & current).sum())
        if selection.note:
            row["note"] = selection.note
        return Drop(held[survive], new_hidden)

    def observer(self, layer: int, spec):
        """The scoring layer's attention observer: ``received`` of the tokens held at a prefill."""

        def observe(module, query, key, attention_mask, kwargs) -> None:
            drop = self.drop
            if not (self.enabled and drop.enabled and drop.active and drop.prefill):
                return
            n = drop.held()
            if query.shape[0] != 1 or query.shape[2] != n or key.shape[2] != n:
                return
            scale = compat.attention_scale(module, query, kwargs)
            image_mask = drop.current_image_mask().to(query.device)
            self.received[layer] = received_for(spec, query[0], key[0], float(scale), image_mask)

        return observe


def plan(settings: TokenSettings, num_layers: int) -> list[PlannedStage]:
    """The stages as this runtime runs them (see the module docstring on ``layer_offset``)."""
    method = method_named(settings.method)
    stages = []
    for index, (layer, keep) in enumerate(settings.schedule):
        spec = method.attention(index, **settings.params)
        offset = spec.layer_offset if spec is not None else 0
        drop_after = layer if layer == BEFORE_LM else layer + offset
        stages.append(PlannedStage(index, layer, keep, drop_after, spec, skipped=drop_after >= num_layers - 1))
    after = [p.drop_after for p in stages]
    if len(set(after)) != len(after):
        raise InputError(f"token method {settings.method!r}: two stages would drop after the same layer ({after})",
                         "pass stage layers at least two apart")
    return stages


def _prompt_hook(runtime: TokenRuntime, adapter):
    def hook(module, args, kwargs):
        drop = runtime.drop
        if cache_length(cache_of_call(kwargs)):
            drop.decode_step(kwargs)
            if runtime.vision is not None:
                runtime.vision.clear()
            return None
        length, spans = prompt_of_call(adapter, args, kwargs)
        total = sum(span.length for span in spans or ())
        image_mask = span_mask(spans, length) if total and runtime.enabled else None
        note = NOT_DROPPED if spans is None and runtime.enabled else ""
        runtime.start_prompt(length, image_mask, spans or [], note, image_total=total)
        return None

    return hook


def attach_tokens(loaded, settings: TokenSettings, sparse_runtime=None) -> TokenRuntime:
    """Run ``settings``' token-reduction method on ``loaded.model``'s prompts; returns the runtime.

    ``InputError`` for a text-only model, a schedule that does not fit, or a method needing
    what this model cannot give (VisionZip without a CLIP [CLS] token).
    """
    adapter = loaded.adapter
    if not adapter.is_vlm:
        raise InputError(f"token reduction ({settings.method}) needs a vision-language model; "
                         f"{loaded.name} takes no images", "drop the tokens section, or use a VLM")
    if not adapter.image_tokens:
        raise InputError(f"token reduction ({settings.method}) does not apply to {loaded.name}: its images enter "
                         "through cross-attention layers, not as tokens of the prompt",
                         "drop the tokens section; use core neurons or a sparse-attention profile")
    method = method_named(settings.method)
    num_layers = adapter.num_layers
    stages = plan(settings, num_layers)
    layers = adapter.lm_layers()
    runtime = TokenRuntime(settings=settings, method=method, stages=stages, num_layers=num_layers,
                           sparse_runtime=sparse_runtime)
    needs = {need for p in stages for need in method.needs(p.index, **settings.params)}
    module, strategy = vision_source(loaded)
    if "vision_attention" in needs and module is None:
        raise InputError(f"{settings.method} needs {strategy}", "choose divprune, or another method")
    wants_vision = "vision_attention" in needs or "vision_attention" in method.OPTIONAL
    skipped = [p for p in stages if p.skipped]
    if skipped:
        runtime.plan_note = (f"stage{'s' if len(skipped) > 1 else ''} at layer {', '.join(str(p.layer) for p in skipped)} "
                             f"skipped: it would cut after the last layer")
    drop = TokenDrop(runtime.decide, tuple(p.drop_after for p in stages if not p.skipped),
                     sparse_runtime=sparse_runtime)
    attach_drop(loaded.model, adapter.language_model(), layers, drop, adapter=adapter)
    runtime.drop = drop
    runtime.original_attention = compat.attn_implementation(loaded.model)
    register_attention()
    loaded.model.set_attn_implementation(ATTENTION_NAME)
    for p in stages:
        if p.spec is not None and not p.skipped:
            attention = adapter.attention(layers[p.drop_after])
            set_observer(attention, runtime.observer(p.drop_after, p.spec))
            runtime.observed.append(attention)
    if wants_vision and module is not None:
        runtime.vision = VisionCapture(strategy=strategy)
        set_observer(module, vision_observer(runtime.vision, lambda: runtime.enabled and drop.enabled))
        runtime.observed.append(module)
    runtime.handles.append(loaded.model.register_forward_pre_hook(_prompt_hook(runtime, adapter), with_kwargs=True))
    return runtime


def attach_profile_tokens(loaded, profile, sparse_runtime=None) -> TokenRuntime | None:
    """``attach_tokens`` with ``profile.tokens`` (None when the profile has no tokens section)."""
    from vlsparse.profile import check_profile_matches
    from vlsparse.profile.tokens import token_settings

    if profile is None or profile.tokens is None:
        return None
    check_profile_matches(profile, loaded.adapter.fingerprint())
    return attach_tokens(loaded, token_settings(profile.tokens, loaded.adapter.num_layers),
                         sparse_runtime=sparse_runtime)


def detach_tokens(loaded, runtime: TokenRuntime) -> None:
    """Remove every hook and observer; the model's attention implementation is restored unless a
    sparse runtime still needs ``"vlsparse"``: the model is dense again."""
    runtime.enabled = False
    if runtime.drop is not None:
        detach_drop(loaded.model, runtime.drop)
    for handle in runtime.handles:
        handle.remove()
    runtime.handles.clear()
    for module in runtime.observed:
        set_observer(module, None)
    runtime.observed.clear()
    sparse = any(getattr(m, RUNTIME_ATTR, None) is not None for m in loaded.model.modules())
    if not sparse and runtime.original_attention and runtime.original_attention != ATTENTION_NAME:
        loaded.model.set_attn_implementation(runtime.original_attention)


def stages_text(settings: TokenSettings) -> str:
    return schedule_text(settings.schedule)


__all__ = ["PlannedStage", "TokenRuntime", "attach_profile_tokens", "attach_tokens", "detach_tokens", "plan",
           "stages_text"]
