"""Core neurons and core tokens at run time: smaller FFN matmuls and really dropped image tokens.

``attach_core(loaded, settings)`` changes a loaded model in place, with no copied
model forward:

- **Core neurons** (CoreInfer). The MLP of every layer in ``settings.neuron_layers``
  is swapped for a ``CoreMLP`` that shares its ``gate_proj``/``up_proj``/``down_proj``
  (the state dict keeps its keys). At prefill it runs dense, takes the prompt's
  activations ``a = act(gate(x)) * up(x)``, picks the sentence-wise core neurons K
  (``vlsparse.kernels.core_select``: token-wise top alpha of the active neurons, active =
  ``|act(gate(x))|`` above the layer's CATS threshold, then the ``ceil(beta F)`` most
  frequent over at most ``sample_tokens`` evenly spaced prompt tokens) and copies the
  rows K of gate/up (stacked into one [2|K|, H] weight, so decoding makes one matmul
  fewer per layer even at beta = 1) and the columns K of down ([H, |K|]) once. Every
  decode step then runs ``down_K(act(gate_K x) * up_K x)``: a smaller matmul, not a mask.
- **Core tokens** (CoreMatching). At the token layer L, the MLP (also a ``CoreMLP``)
  hands its prefill activations to a forward hook on decoder layer L, which scores
  every image token (cosine between its token-wise core set and the core set of the
  reference tokens: ``text`` = the prompt's non-image tokens, ``all`` = every prompt
  token, ``last`` = the last prompt token), cuts at the elbow within the keep guards
  and returns the hidden states of the survivors only (text tokens always survive).
  The dropping itself (survivors keep their rotary positions, later layers' masks and
  KV caches hold only survivors) is ``vlsparse.kernels.token_drop``, shared with the
  visual-token-reduction runtime ``vlsparse.kernels.token_runtime``; decode positions
  still come from the full count (generate's ``position_ids``, or layer 0's cache length).

Image positions come from ``adapter.image_spans`` on the prompt (a forward pre-hook
on the model, like ``vlsparse.kernels.runtime``). Token dropping needs batch size 1
and ``input_ids``; otherwise that prompt runs with core neurons only. A new prompt
is recognised by an empty KV cache (or none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsparse.compat import cache_length, cache_of_call
from vlsparse.kernels.token_drop import (NOT_DROPPED, Drop, TokenDrop, attach_drop, check_free, detach_drop,
                                         prompt_of_call, span_mask)
from vlsparse.kernels.core_select import (core_match_scores, evenly_spaced, select_core_tokens, sentence_core,
                                          token_core_mask)
from vlsparse.profile.core import SCORE_RULES, CoreSettings


@dataclass
class CoreRuntime:
    """State shared by the hooks of one model: settings, switches, and the current prompt."""

    settings: CoreSettings
    neurons: bool = True
    tokens: bool = True
    enabled: bool = True
    sparse_runtime: Any = None
    handles: list = field(default_factory=list, repr=False)
    swapped: list = field(default_factory=list, repr=False)
    drop: TokenDrop | None = field(default=None, repr=False)
    # the current prompt
    prefill: bool = False
    prompt_len: int = 0
    image_mask: Tensor | None = field(default=None, repr=False)
    token_layer_core: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    image_total: int = 0
    image_kept: int = 0
    core_kept: dict[int, int] = field(default_factory=dict)
    core_total: dict[int, int] = field(default_factory=dict)
    note: str = ""

    def start_prompt(self, prompt_len: int, image_mask: Tensor | None, note: str = "",
                     image_total: int | None = None) -> None:
        """A new prompt: ``image_mask`` marks the image tokens to drop from (None: drop nothing);
        ``image_total`` counts the prompt's image tokens when no mask is given."""
        self.prefill, self.prompt_len, self.image_mask = True, prompt_len, image_mask
        self.token_layer_core, self.note = None, note
        self.image_total = int(image_mask.sum()) if image_mask is not None else (image_total or 0)
        self.image_kept = self.image_total
        self.core_kept, self.core_total = {}, {}
        if self.drop is not None:
            self.drop.start_prompt(prompt_len, image_mask)

    @property
    def keep(self) -> Tensor | None:
        """Indices (into the full prompt) of the tokens that survived the token layer; None = all."""
        return self.drop.keep if self.drop is not None else None

    def stats(self) -> dict[str, Any]:
        """What the last prompt kept: image tokens and core neurons (kept and total)."""
        s = self.settings
        return {
            "core_tokens": self.tokens and s.token_layer is not None,
            "core_neurons": self.neurons and bool(s.neuron_layers),
            "token_layer": s.token_layer if self.tokens else None,
            "image_tokens_kept": self.image_kept,
            "image_tokens_total": self.image_total,
            "neuron_layers": list(s.neuron_layers) if self.neurons else [],
            "core_neurons_kept": sum(self.core_kept.values()),
            "core_neurons_total": sum(self.core_total.values()),
            "alpha": s.alpha,
            "beta": s.beta,
            "note": self.note,
        }

    def describe(self) -> str:
        """One line for a summary: ``image tokens 120/512 kept (layer 2), core neurons 40%`` etc."""
        st, parts = self.stats(), []
        if st["core_tokens"]:
            parts.append(f"image tokens {st['image_tokens_kept']}/{st['image_tokens_total']} kept "
                         f"(from layer {st['token_layer']})")
        if st["core_neurons"] and st["core_neurons_total"]:
            parts.append(f"core neurons {st['core_neurons_kept']}/{st['core_neurons_total']} "
                         f"in {len(st['neuron_layers'])} layers (beta {st['beta']:g})")
        if st["note"]:
            parts.append(st["note"])
        return ", ".join(parts) or "core: nothing to do"


class CoreMLP(nn.Module):
    """A gated MLP that decodes with the prompt's core neurons (see the module docstring).

    Shares the (gate, up, down) projections (``projections``, as the adapter's
    ``mlp_projections(layer)`` names them) and ``act_fn`` with the MLP it replaces.
    ``slice_neurons=False`` (the token layer outside the neuron range) only records
    prefill activations for token scoring.
    """

    def __init__(self, mlp: nn.Module, projections: tuple[nn.Module, nn.Module, nn.Module], layer: int,
                 runtime: CoreRuntime, slice_neurons: bool) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = projections
        self.act_fn = mlp.act_fn
        self.layer = layer
        self.slice_neurons = slice_neurons
        self.runtime = runtime
        self.core: Tensor | None = None
        self._gate_up: Tensor | None = None
        self._gate_up_bias: Tensor | None = None
        self._down: Tensor | None = None

    def dense(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: Tensor) -> Tensor:
        rt = self.runtime
        if not rt.enabled:
            return self.dense(x)
        if rt.prefill:
            return self._prefill(x)
        if self._down is not None and rt.neurons and self.slice_neurons:
            return self._decode(x)
        return self.dense(x)

    def _prefill(self, x: Tensor) -> Tensor:
        rt, s = self.runtime, self.runtime.settings
        gate = self.act_fn(self.gate_proj(x))
        act = gate * self.up_proj(x)
        out = self.down_proj(act)
        scoring = rt.tokens and self.layer == s.token_layer and x.shape[0] == 1
        slicing = rt.neurons and self.slice_neurons
        if not (scoring or slicing):
            return out
        flat_act, flat_gate = act.reshape(-1, act.shape[-1]), gate.reshape(-1, gate.shape[-1])
        threshold = s.thresholds.get(self.layer, 0.0)
        rows = evenly_spaced(flat_act.shape[0], s.sample_tokens)
        if scoring:  # every token's core set: image tokens are scored one by one
            mask = token_core_mask(flat_act, s.alpha, flat_gate, threshold)
            rt.token_layer_core = (mask, flat_act)
            sample = mask[rows]
        elif slicing:
            sample = token_core_mask(flat_act[rows], s.alpha, flat_gate[rows], threshold)
        if slicing:
            self.build(sentence_core(sample, s.beta, flat_act[rows]))
        return out

    @torch.no_grad()
    def build(self, core: Tensor) -> None:
        """Copy the core rows of gate/up and columns of down (once per prompt)."""
        self.core = core
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        self._gate_up = torch.cat([gate.weight.index_select(0, core), up.weight.index_select(0, core)]).contiguous()
        self._gate_up_bias = None
        if gate.bias is not None or up.bias is not None:
            zeros = gate.weight.new_zeros(len(core))
            self._gate_up_bias = torch.cat([gate.bias.index_select(0, core) if gate.bias is not None else zeros,
                                            up.bias.index_select(0, core) if up.bias is not None else zeros])
        self._down = down.weight.index_select(1, core).contiguous()
        self.runtime.core_kept[self.layer] = int(core.numel())
        self.runtime.core_total[self.layer] = int(gate.weight.shape[0])

    def _decode(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self._gate_up, self._gate_up_bias).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self._down, self.down_proj.bias)

    def clear(self) -> None:
        self.core = self._gate_up = self._gate_up_bias = self._down = None


# ----------------------------------------------------------------------------- token dropping


def score_image_tokens(mask: Tensor, act: Tensor, image_mask: Tensor, settings: CoreSettings) -> Tensor:
    """CoreMatching scores of the image tokens (in prompt order): [n_image].

    mask: [T, F] token-wise core sets at the token layer; act: [T, F] its activations
    (tie-breaks); image_mask: [T] boolean. The reference core set K follows ``settings.score``.
    """
    if settings.score == "last":
        reference = mask[-1:]
        core = reference[0].nonzero().flatten()
    else:
        rows = ~image_mask if settings.score == "text" else torch.ones_like(image_mask)
        if not bool(rows.any()):
            rows = torch.ones_like(image_mask)
        rows = rows.nonzero().flatten()
        rows = rows[evenly_spaced(len(rows), settings.sample_tokens)]
        core = sentence_core(mask[rows], settings.beta, act[rows])
    if core.numel() == 0:
        return torch.ones(int(image_mask.sum()), device=act.device)
    return core_match_scores(mask[image_mask], core)


def _decide(runtime: CoreRuntime):
    """The CoreMatching rule at the token layer, for ``vlsparse.kernels.token_drop``: text tokens and the
    image tokens within the elbow cut survive."""

    def decide(layer: int, hidden: Tensor) -> Drop | None:
        rt, s = runtime, runtime.settings
        if not (rt.enabled and rt.tokens) or rt.token_layer_core is None:
            return None
        mask, act = rt.token_layer_core
        rt.token_layer_core = None
        image_mask = rt.image_mask.to(hidden.device)
        scores = score_image_tokens(mask, act, image_mask, s)
        kept_image = image_mask.nonzero().flatten()[select_core_tokens(scores, s.min_keep, s.max_keep)]
        keep_mask = ~image_mask
        keep_mask[kept_image] = True
        rt.image_kept = int(kept_image.numel())
        return Drop(keep_mask.nonzero().flatten())

    return decide


# ----------------------------------------------------------------------------- attach / detach


def _prompt_hook(runtime: CoreRuntime, adapter):
    def hook(module, args, kwargs):
        if cache_length(cache_of_call(kwargs)):
            runtime.prefill = False
            if runtime.drop is not None:
                runtime.drop.decode_step(kwargs)
            return None
        length, spans = prompt_of_call(adapter, args, kwargs)
        image_total = sum(span.length for span in spans or ())
        dropping = runtime.tokens and runtime.settings.token_layer is not None
        image_mask = span_mask(spans, length) if dropping and image_total else None
        note = NOT_DROPPED if dropping and adapter.is_vlm and spans is None else ""
        runtime.start_prompt(length, image_mask, note, image_total=image_total)
        return None

    return hook


def attach_core(loaded, settings: CoreSettings, neurons: bool = True, tokens: bool = True,
                sparse_runtime=None) -> CoreRuntime:
    """Give ``loaded.model`` core-neuron decoding and/or core-token dropping; returns the runtime.

    ``settings`` come from a profile (``core_settings(profile.core, num_layers)``).
    ``sparse_runtime`` (from ``vlsparse.kernels.runtime.attach``), if given, is told the
    survivors' image spans so its modality-aware heads see the shortened sequence.
    """
    adapter = loaded.adapter
    layers = adapter.lm_layers()
    runtime = CoreRuntime(settings=settings, neurons=neurons and bool(settings.neuron_layers),
                          tokens=tokens and settings.token_layer is not None and adapter.image_tokens,
                          sparse_runtime=sparse_runtime)
    wanted = set(settings.neuron_layers) if runtime.neurons else set()
    if runtime.tokens:
        check_free(loaded.model)
        wanted.add(settings.token_layer)
    for index in sorted(wanted):
        layer = layers[index]
        original = adapter.mlp(layer)
        layer.mlp = CoreMLP(original, adapter.mlp_projections(layer), index, runtime,
                            slice_neurons=runtime.neurons and index in settings.neuron_layers)
        runtime.swapped.append((layer, original))
    runtime.handles.append(loaded.model.register_forward_pre_hook(_prompt_hook(runtime, adapter), with_kwargs=True))
    if runtime.tokens:
        runtime.drop = attach_drop(loaded.model, adapter.language_model(), layers,
                                   TokenDrop(_decide(runtime), (settings.token_layer,), sparse_runtime=sparse_runtime),
                                   adapter=adapter)
    return runtime


def attach_profile_core(loaded, profile, neurons: bool = True, tokens: bool = True,
                        sparse_runtime=None) -> CoreRuntime | None:
    """``attach_core`` with the settings of ``profile.core`` (None when the profile has no core section).

    Checks that the profile was made for this model (one-line ``ProfileError`` otherwise).
    """
    from vlsparse.profile import check_profile_matches
    from vlsparse.profile.core import core_settings

    if profile.core is None:
        return None
    check_profile_matches(profile, loaded.adapter.fingerprint())
    settings = core_settings(profile.core, loaded.adapter.num_layers)
    return attach_core(loaded, settings, neurons=neurons, tokens=tokens, sparse_runtime=sparse_runtime)


def detach_core(loaded, runtime: CoreRuntime) -> None:
    """Put the original MLPs back and remove every hook: the model is dense again."""
    runtime.enabled = False
    if runtime.drop is not None:
        detach_drop(loaded.model, runtime.drop)
    for handle in runtime.handles:
        handle.remove()
    for layer, original in runtime.swapped:
        layer.mlp.clear()
        layer.mlp = original
    runtime.handles.clear()
    runtime.swapped.clear()


__all__ = ["CoreMLP", "CoreRuntime", "SCORE_RULES", "attach_core", "attach_profile_core", "detach_core",
           "score_image_tokens"]
