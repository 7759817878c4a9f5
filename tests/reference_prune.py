"""A plain Wanda pipeline written from the paper, independent of vlsparse's streaming code.

The whole model sits in memory in float32 (``from_pretrained``). Its decoder layers are
pruned one after another: the calibration windows run through the layer while hooks sum
each Linear's squared input columns; every output row then loses its lowest
``|W| * ||X||`` entries (a fraction ``ratio`` of the row, or ``n`` of every ``m`` inputs for
N:M); the pruned layer runs again to make the next layer's inputs. Only the decoder layers'
Linears are pruned (the LM head and embeddings are not), as in the paper's reference code.

``tests/test_reference_prune.py`` checks vlsparse's uniform Wanda against it on a tiny model,
and ``benchmarks/prune_peer.py`` on SmolLM2 (time, peak RSS, perplexity, mask agreement).
"""

from __future__ import annotations

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the first layer's pre-hook once it has its inputs (stops the forward)."""


def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[dict]) -> list[tuple]:
    """(hidden states, keyword arguments) with which the first decoder layer is called, per batch."""
    inputs: list[tuple] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((hidden, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def wanda_keep(weight: torch.Tensor, column_sq: torch.Tensor, ratio: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep mask of one matrix: per output row, drop the lowest |W| * ||X|| (``nm``: keep n of every m)."""
    score = weight.abs().float() * column_sq.float().sqrt()
    keep = torch.ones_like(weight, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(score.shape[0], -1, m)
        drop = groups.argsort(dim=-1)[..., : m - n]
        keep.view(score.shape[0], -1, m).scatter_(-1, drop, False)
        return keep
    prune = int(weight.shape[1] * ratio)
    drop = score.argsort(dim=1)[:, :prune]
    keep.scatter_(1, drop, False)
    return keep


def _layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reference_wanda(model: nn.Module, batches: list[dict], ratio: float = 0.5,
                    nm: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place, layer by layer; returns {parameter name: keep mask} of every pruned weight."""
    layers = model.get_decoder().layers
    names = {module: name for name, module in model.named_modules()}
    captured = first_layer_inputs(model, layers, batches)
    hidden = [h for h, _ in captured]
    kwargs = [k for _, k in captured]
    masks: dict[str, torch.Tensor] = {}
    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        column_sq = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

        def make_hook(name):
            def hook(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                column_sq[name] += (x * x).sum(0)
            return hook

        handles = [m.register_forward_hook(make_hook(name)) for name, m in linears.items()]
        try:
            for h, k in zip(hidden, kwargs):
                _layer_output(layer, h, k)
        finally:
            for handle in handles:
                handle.remove()
        for name, linear in linears.items():
            keep = wanda_keep(linear.weight, column_sq[name], ratio, nm)
            linear.weight.mul_(keep)
            masks[f"{names[layer]}.{name}.weight"] = keep
        hidden = [_layer_output(layer, h, k) for h, k in zip(hidden, kwargs)]
    return masks
