"""The data a token-reduction method reads (``TokenContext``) and returns (``Selection``).

Kept free of a top-level torch import so ``import vlsparse.tokens`` stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from vlsparse.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

BEFORE_LM = -1


class Stage(NamedTuple):
    """One drop point of a schedule: after LM layer ``layer`` (0-based; -1 = before the LM),
    keep ``keep`` of the ORIGINAL image-token count (nominal for adaptive methods)."""

    layer: int
    keep: float


@dataclass(frozen=True)
class AttentionSpec:
    """How the runtime must compute ``TokenContext.received`` for one stage.

    rows: the row sets wanted, each filled into ``received[name]``: ``"last"`` (final
        prompt token), ``"text"`` (non-image tokens after the first image token),
        ``"image"`` (image tokens), ``"all"`` (every token); see
        ``vlsparse.tokens.attention.query_rows``.
    layer_offset: 0 = the self-attention of the stage's layer L itself (the layer just
        run, queries/keys from its input); 1 = the attention that layer L+1 would compute
        on layer L's output (PyramidDrop, FEATHER score with the next layer's projections).
    rope: apply the rotary embedding to q and k before scoring (FEATHER: no).
    keys: ``"all"`` = the model's causal softmax over every key; ``"image"`` = softmax
        over the image keys only.
    reduce: ``attention_received``'s reduction (``"sum"``, ``"mean"``, ``"visible"``).
    Heads are averaged after the reduction.
    """

    rows: tuple[str, ...]
    layer_offset: int = 0
    rope: bool = True
    keys: str = "all"
    reduce: str = "mean"


@dataclass
class TokenContext:
    """What a method may read at its drop point. N = current prompt length.

    hidden: [N, D] hidden states of the whole prompt at that point (before the LM: the
        input embeddings, i.e. after the projector; in the LM: the output of layer ``layer``).
    image_mask: [N] bool, the image positions of the CURRENT sequence (survivors only
        after an earlier drop). Selections index these positions in order: image token
        i is ``image_mask.nonzero()[i]``.
    image_index: [n_image] long, which image each image token belongs to (0, 1, ...);
        None = one image.
    grid: per image, (rows, cols) of its tokens in raster order, when known and while
        every token of the image is still present (first drop); None otherwise.
    received: row-set name -> [N] head-averaged attention received by each position,
        computed as the method's ``attention(stage)`` spec says; empty when it asked none.
    vision_attention: [n_image] attention each image token receives in the vision tower
        (the [CLS] row of the feature layer, heads summed or averaged); None if unavailable.
    vision_keys: [n_image, d] optional key states of the vision tower's feature layer
        (VisionZip's merge metric); None = methods fall back to ``hidden``.
    layer: the layer after which the drop happens (-1 = before the LM); num_layers: LM depth.
    """

    image_mask: Tensor
    hidden: Tensor | None = None
    image_index: Tensor | None = None
    grid: list[tuple[int, int]] | None = None
    received: dict[str, Tensor] = field(default_factory=dict)
    vision_attention: Tensor | None = None
    vision_keys: Tensor | None = None
    layer: int = BEFORE_LM
    num_layers: int = 0

    @property
    def n_image(self) -> int:
        return int(self.image_mask.sum())

    def image_positions(self) -> Tensor:
        return self.image_mask.nonzero().flatten()

    def image_hidden(self) -> Tensor:
        if self.hidden is None:
            raise InputError("this token-reduction method needs the hidden states",
                             "pass TokenContext(hidden=...) at its drop point")
        return self.hidden[self.image_mask].float()

    def image_received(self, rows: str) -> Tensor:
        if rows not in self.received:
            raise InputError(f"this token-reduction method needs the attention received from the {rows!r} rows",
                             "fill TokenContext.received from the method's attention() spec")
        return self.received[rows][self.image_mask].float()


@dataclass
class Selection:
    """What a method keeps, in indices INTO THE CURRENT IMAGE TOKENS (0 .. n_image-1).

    kept: sorted long tensor of surviving image tokens (they keep their hidden states and
        rotary positions). merged: optional [m, D] extra embeddings (VisionZip's contextual
        tokens) that REPLACE the hidden states at the dropped image tokens ``merged_slots``
        ([m] long, sorted, disjoint from ``kept``), whose rotary positions they take; float32,
        cast to the model dtype. note: a human-readable remark (adaptive counts, decisions).
    """

    kept: Tensor
    merged: Tensor | None = None
    merged_slots: Tensor | None = None
    note: str = ""

    @property
    def count(self) -> int:
        return int(self.kept.numel()) + (0 if self.merged_slots is None else int(self.merged_slots.numel()))


def count_for(fraction: float, total: int) -> int:
    """Tokens kept when keeping ``fraction`` of ``total``: floor, clamped to [0, total]."""
    if total <= 0:
        return 0
    return max(0, min(total, int(math.floor(fraction * total + 1e-9))))


def resolve(name: str, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``params``; an unknown parameter is an InputError."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise InputError(f"token method {name!r} has no parameter {', '.join(unknown)}",
                         f"its parameters are: {', '.join(sorted(defaults))}")
    merged = {**defaults, **{key: value for key, value in params.items() if value is not None}}
    keep = merged.get("keep")
    if keep is not None and not 0.0 < float(keep) <= 1.0:
        raise InputError(f"token method {name!r}: keep must be in (0, 1], got {keep}",
                         "pass the fraction of image tokens to keep, e.g. keep=0.25")
    return merged


def check_layers(name: str, layers: list[int], num_layers: int, *, before_lm: bool = False) -> None:
    """Every drop must leave at least one LM layer after it and come in increasing order.

    Only a stage meant to run before the LM (``before_lm``, first stage) may use layer -1.
    """
    for i, layer in enumerate(layers):
        lowest = BEFORE_LM if before_lm and i == 0 else 0
        if not lowest <= layer <= num_layers - 2:
            raise InputError(f"token method {name!r} would drop tokens after layer {layer} of a "
                             f"{num_layers}-layer LM",
                             "pass explicit layers/k that fit the model, or pick another method")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise InputError(f"token method {name!r}: stage layers {layers} are not increasing",
                         "pass strictly increasing layers")


def stage_after_k(name: str, defaults: dict[str, Any], num_layers: int, keep: float | None,
                  params: dict[str, Any]) -> list[Stage]:
    """One drop after layer ``k - 1`` (``k``: the paper's 1-based layer, from ``params`` or ``defaults``)."""
    p = resolve(name, defaults, {"keep": keep, **params})
    layers = [int(p["k"]) - 1]
    check_layers(name, layers, num_layers)
    return [Stage(layers[0], float(p["keep"]))]


def stage_before_lm(name: str, defaults: dict[str, Any], keep: float | None, params: dict[str, Any]) -> list[Stage]:
    """One drop before the language model, on its input embeddings."""
    p = resolve(name, defaults, {"keep": keep, **params})
    return [Stage(BEFORE_LM, float(p["keep"]))]


def no_attention(stage: int = 0, **params) -> None:
    """``attention`` of a method that reads no attention."""
    return None


def rows_attention(name: str, defaults: dict[str, Any], params: dict[str, Any], reduce: str) -> AttentionSpec:
    """The stage's own attention (RoPE, all keys), over the ``rows`` parameter's row set, reduced by ``reduce``."""
    p = resolve(name, defaults, params)
    return AttentionSpec(rows=(str(p["rows"]),), layer_offset=0, rope=True, keys="all", reduce=reduce)
