"""Training-free visual-token reduction: a registry of scoring/selection rules, one module per paper.

Every method module (``fastv``, ``pyramiddrop``, ``feather``, ``zipvl``, ``visionzip``,
``divprune``, ``todre``) is a pure rule: it never touches a model. The runtime runs the
model, builds a ``TokenContext`` at each drop point, calls ``select`` and gathers the
survivors (hidden states, rotary positions, masks, KV cache): ``vlsparse.kernels.token_runtime``
(a profile's ``tokens`` section, ``vlsparse.profile.tokens``). CoreMatching lives in
``vlsparse.kernels.core_select``, not here.

Module interface
----------------
``NAME`` (str), ``PAPER`` (title, venue, year), ``WHERE`` ("before_lm" or "in_lm": where
the first stage runs; each stage's layer is authoritative), ``NEEDS`` (context fields
the first stage requires: "hidden", "received", "vision_attention"), ``OPTIONAL``
(fields used when present: "grid", "vision_keys", "vision_attention"), ``DEFAULTS``
(the paper's defaults, including ``keep``).

``schedule(num_layers, keep=None, **params) -> list[Stage]``
    ``Stage(layer, keep)``: drop after LM layer ``layer`` (0-based; -1 = before the LM,
    on the input embeddings), keeping ``keep`` of the ORIGINAL image-token count. ``keep``
    is the method's main ratio: the fraction kept at the first stage (PyramidDrop's
    lambda, FEATHER's 1 - R). Raises ``InputError`` if the stages do not fit the model.
``needs(stage=0, **params) -> tuple[str, ...]``: required context fields of that stage.
``attention(stage=0, **params) -> AttentionSpec | None``
    How to fill ``TokenContext.received``: which row sets, which layer's attention
    (``layer_offset`` 0 = the layer just run, 1 = the next layer applied to the current
    hidden states), with or without RoPE, softmax over all keys or image keys only, and
    the reduction. ``vlsparse.tokens.attention.received_for(spec, q, k, scale,
    image_mask)`` computes exactly that from the layer's q/k, in O(block x N) memory.
``select(ctx, keep_count, *, stage=0, **params) -> Selection``
    ``keep_count`` = ``count_for(stage.keep, original image-token count)``. Returns the
    kept image tokens as sorted indices into the CURRENT image tokens (0..n_image-1),
    optionally with merged embeddings placed at dropped slots (VisionZip). Adaptive rules
    return other counts and say so: FEATHER (union with a uniform grid, then keep**2 of
    the survivors), ZipVL (tau of the attention mass), ToDRE stage 1 (all or nothing).

Runtime recipe, per prompt: for each ``i, stage in enumerate(schedule(L, keep, **params))``
(in layer order, across all stages), at the drop point build ``TokenContext(image_mask=
current image positions, hidden=..., received=received_for(attention(i), ...) if any,
vision_attention=..., grid=... (first drop only), layer=stage.layer, num_layers=L)``,
call ``sel = select(ctx, count_for(stage.keep, n_original), stage=i, **params)``, keep
every non-image position plus ``image_positions[sel.kept]``, and write ``sel.merged``
(cast to the model dtype) at ``image_positions[sel.merged_slots]``, which also survive.
"""

from __future__ import annotations

from types import ModuleType

from vlsparse.registry import module_named, modules_of
from vlsparse.tokens.context import BEFORE_LM, AttentionSpec, Selection, Stage, TokenContext, count_for

METHOD_NAMES = ("fastv", "pyramiddrop", "feather", "zipvl", "visionzip", "divprune", "todre")
INTERFACE = ("NAME", "PAPER", "WHERE", "NEEDS", "OPTIONAL", "DEFAULTS", "schedule", "needs", "attention", "select")

__all__ = ["BEFORE_LM", "AttentionSpec", "INTERFACE", "METHOD_NAMES", "Selection", "Stage", "TokenContext",
           "count_for", "method_named", "methods"]


def methods() -> dict[str, ModuleType]:
    """A fresh dict ``name -> method module`` (modules are imported on first call)."""
    return modules_of("vlsparse.tokens", METHOD_NAMES)


def method_named(name: str) -> ModuleType:
    """The method module called ``name`` (case-insensitive); ``InputError`` naming the known ones otherwise."""
    return module_named("vlsparse.tokens", METHOD_NAMES, name, "token-reduction method")
