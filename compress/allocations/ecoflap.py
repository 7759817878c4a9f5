"""ECoFLaP allocation (the coarse step): zeroth-order importance of each block, then water-filling.

ECoFLaP (Sung et al., ICLR 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-wise
Pruning for Vision-Language Models"). For each group ``g`` (a block) and noise
draw ``z ~ N(0, I)`` over the group's prunable weights:

    score_g = mean over batches and draws of |L(theta + eps z) - L(theta - eps z)| / (2 eps)
              / (number of prunable weights in g)

which in expectation is proportional to the group's gradient norm; dividing by
the parameter count makes it a per-weight importance. Every (batch, draw)
gets its own ``z``, so averaging over batches also averages over the noise
(one ``z`` for all batches would leave a single half-normal draw per group). Defaults: eps = 1e-3,
1 draw (the reference's; it uses 32 samples, we default to fewer since every
sample costs ``2 * groups`` full forwards). The perturbation is added in fp32
(bf16 rounding would swallow eps = 1e-3) and ``z`` is regenerated from a seed
for the ``-`` pass instead of being stored. ``L`` is the model's own next-token
loss on the calibration batch (image tokens excluded).

Keep counts (``water_fill``): every block starts at the floor
``ceil(N_g * (1 - ratio - max_deviation))``; the rest of the keep budget is
poured in so that each block's extra keep *fraction* is proportional to its
score (a per-parameter importance), clamped at ``floor(N_g * (1 - ratio +
max_deviation))`` with the overflow redistributed. Equal scores give the
uniform allocation. (The reference implementation adds where it should
subtract in its overshoot branch and so misses the global ratio; here the
level is solved for and the total is exact.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vlsparse.compress.allocations.fill import deviation_bounds, fill_to_total, keep_total
from vlsparse.compress.calibration import take_samples
from vlsparse.compress.sequential import Perturbation, Progress, StreamedModel
from vlsparse.errors import InputError


@dataclass
class GroupScores:
    """Per-block zeroth-order scores, in block order."""

    names: list[str]
    raw: list[float]  # mean |dL/d(eps z)| estimate
    per_weight: list[float]  # raw / number of prunable weights (what the allocation uses)


def noise_seed(seed: int, group: int, draw: int, index: int) -> int:
    """A distinct, reproducible generator seed for (run seed, group, draw, weight index).

    ``draw`` counts (draw, batch) pairs: ``draw * n_batches + batch``.
    """
    return (((seed * 1_000_003 + group) * 10_007 + draw) * 1_009 + index) % (2**63 - 1)


def noise(seed: int, group: int, draw: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``z ~ N(0, I)`` of ``shape`` in fp32, the same every time for the same arguments."""
    generator = torch.Generator().manual_seed(noise_seed(seed, group, draw, index))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def batch_loss(streamed: StreamedModel, batch: dict, skip: tuple = ()) -> float:
    out = streamed.forward(batch, skip=skip)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise InputError("the calibration batch gave no loss (no labels)", "calibration data needs text tokens")
    return float(loss)


def zeroth_order_scores(streamed: StreamedModel, batches: list[dict], epsilon: float = 1e-3, draws: int = 1,
                        seed: int = 0, progress: Progress = lambda _: None,
                        reuse_prefix: bool = True) -> GroupScores:
    """ECoFLaP scores of every block of ``streamed`` on ``batches`` (each with ``labels``).

    Perturbing block ``g`` leaves every block before it as it was, so with ``reuse_prefix``
    one unperturbed forward per batch records every block's output, and each perturbed
    forward replays blocks ``0..g-1`` from that record instead of reading and running them:
    about half the block forwards and reads, the same losses. Memory: one batch's block outputs
    (ECoFLaP batches hold one sample each).
    """
    if epsilon <= 0 or draws < 1 or not batches:
        raise InputError("ECoFLaP needs epsilon > 0, at least one draw and one calibration batch")
    blocks = streamed.blocks
    differences: dict[tuple[int, int, int], float] = {}  # (group, draw, batch) -> |dL| / (2 eps)
    for b, batch in enumerate(batches):
        progress(f"({b + 1}/{len(batches)}) ECoFLaP scoring {len(blocks)} blocks on calibration sample {b + 1}")
        outputs = block_outputs(streamed, batch) if reuse_prefix else None
        for g, block in enumerate(blocks):
            for draw in range(draws):
                loss = {}
                for sign in (1.0, -1.0):  # the same z both ways: regenerated from its seed, never stored
                    streamed.perturbation = Perturbation(
                        block.name, sign, epsilon,
                        lambda i, shape, g=g, d=draw * len(batches) + b: noise(seed, g, d, i, shape))
                    try:
                        with replayed(blocks[:g], outputs):
                            loss[sign] = batch_loss(streamed, batch, skip=tuple(blocks[:g]) if outputs else ())
                    finally:
                        streamed.perturbation = None
                differences[g, draw, b] = abs(loss[1.0] - loss[-1.0]) / (2 * epsilon)
    raw = [sum(differences[g, draw, b] for draw in range(draws) for b in range(len(batches)))
           / (draws * len(batches)) for g in range(len(blocks))]
    per_weight = [r / max(1, b.size()) for r, b in zip(raw, blocks)]
    return GroupScores([b.name for b in blocks], raw, per_weight)


def block_outputs(streamed: StreamedModel, batch: dict) -> list | None:
    """What every block returned in one unperturbed forward on ``batch``; None if some block did not run
    exactly once (then nothing is replayed)."""
    outputs: list[list] = [[] for _ in streamed.blocks]
    handles = [block.module.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out))
               for i, block in enumerate(streamed.blocks)]
    try:
        streamed.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(o) != 1 for o in outputs):
        return None
    return [o[0] for o in outputs]


def _copy(output):
    """A fresh copy of a block's output (the model may change what a block returns in place)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_copy(o) for o in output)
    return output


@contextlib.contextmanager
def replayed(blocks: Sequence, outputs: list | None) -> Iterator[None]:
    """Blocks ``blocks`` (the first ones, in order) return their recorded outputs instead of running."""
    if not outputs or not blocks:
        yield
        return
    for i, block in enumerate(blocks):
        block.module.forward = lambda *args, i=i, **kwargs: _copy(outputs[i])
    try:
        yield
    finally:
        for block in blocks:
            del block.module.forward


SCORERS = ("zeroth-order", "gradient")
"""``--ecoflap-scores``: the paper's zeroth-order estimate, or the exact quantity it estimates."""


def gradient_scores(streamed: StreamedModel, batches: list[dict], progress: Progress = lambda _: None) -> GroupScores:
    """ECoFLaP scores from the gradient itself: the expectation the zeroth-order estimate converges to.

    For ``z ~ N(0, I)``, ``|L(theta + eps z) - L(theta - eps z)| / (2 eps)`` tends to ``|z . g|``
    (``g`` the loss gradient over the group's prunable weights), whose mean is
    ``sqrt(2 / pi) * ||g||``. That is computed here exactly, per batch, with no noise. The
    gradient is taken block by block from the end, so only one block is resident:

    1. one streamed forward records every block's output;
    2. the model's own forward runs again with every block replaced by its recorded output,
       made a leaf that requires grad; each replacement also keeps the (differentiable) tensors
       it was called with. ``loss.backward()`` gives each output's direct gradient (through the
       LM head, or whatever glue reads it: LLaVA's feature layer, DeepStack, cross-attention);
    3. from the last block to the first: read the block, run it on detached copies of its
       recorded inputs with its weights requiring grad, backpropagate its output's gradient
       (complete by then: later blocks were done first), keep ``||g||`` of its prunable weights,
       and push the gradients of its inputs back through the glue to the earlier outputs.

    Cost per batch: two forwards plus one forward and backward of every block, against
    ``2 * groups`` forwards (less the replayed prefixes) for the zeroth-order estimate.
    """
    blocks = streamed.blocks
    norms = [0.0] * len(blocks)
    for b, batch in enumerate(batches):
        progress(f"({b + 1}/{len(batches)}) ECoFLaP gradient scores on calibration sample {b + 1}")
        outputs = block_outputs(streamed, batch)
        if outputs is None:
            raise InputError("ECoFLaP gradient scores need every block to run once per forward",
                             "use the zeroth-order scores (the default) for this model")
        leaves = [_leaf(o) for o in outputs]
        calls: list[tuple] = [()] * len(blocks)
        for i, block in enumerate(blocks):
            block.module.forward = lambda *args, i=i, **kwargs: _record_call(calls, i, args, kwargs, leaves[i])
        try:
            with torch.enable_grad():
                loss = streamed.forward(batch, skip=tuple(blocks), grad=True).loss
                if loss is None:
                    raise InputError("the calibration batch gave no loss (no labels)",
                                     "calibration data needs text tokens")
                loss.backward(retain_graph=True)
        finally:
            for block in blocks:
                del block.module.forward
        for k in reversed(range(len(blocks))):
            norms[k] += _block_backward(streamed, blocks[k], calls[k], leaves[k]) / len(batches)
    raw = [math.sqrt(2 / math.pi) * n for n in norms]
    return GroupScores([b.name for b in blocks], raw, [r / max(1, b.size()) for r, b in zip(raw, blocks)])


def _leaf(output):
    """A block's recorded output as leaves that require grad (tensors inside tuples too)."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone().requires_grad_(output.is_floating_point())
    if isinstance(output, (tuple, list)):
        return type(output)(_leaf(o) for o in output)
    return output


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _record_call(calls: list, i: int, args: tuple, kwargs: dict, leaf):
    calls[i] = (args, kwargs)
    return leaf


def _block_backward(streamed: StreamedModel, block, call: tuple, leaf) -> float:
    """``||dL/dW||`` over ``block``'s prunable weights, given its output leaf's accumulated gradient; pushes the
    gradient of its inputs back to the outputs (leaves) they were computed from."""
    outs = [t for t in _tensors(leaf) if t.grad is not None]
    if not outs:  # nothing downstream read this block's output
        return 0.0
    args, kwargs = call
    originals = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    copies = {id(t): t.detach().requires_grad_() for t in originals}

    def swap(value):
        if isinstance(value, torch.Tensor):
            return copies.get(id(value), value)
        if isinstance(value, (tuple, list)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    streamed.materialise(block)
    try:
        weights = [block.module.get_parameter(n[len(block.prefix) + 1:]) for n in block.weight_names()]
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = block.module(*swap(args), **swap(kwargs))
            pairs = [(o, t.grad) for o, t in zip(_tensors(out), _tensors(leaf)) if t.grad is not None]
            inputs = [copies[id(t)] for t in originals]
            grads = torch.autograd.grad([o for o, _ in pairs], weights + inputs, [g for _, g in pairs],
                                        allow_unused=True)
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads[:len(weights)] if g is not None))
        back = [(t, g) for t, g in zip(originals, grads[len(weights):]) if g is not None]
        if back:
            torch.autograd.backward([t for t, _ in back], [g for _, g in back], retain_graph=True)
        return norm
    finally:
        streamed.release(block)


def water_fill(sizes: Sequence[int], scores: Sequence[float], ratio: float, max_deviation: float = 0.1) -> list[int]:
    """ECoFLaP water-filling: keep counts from per-parameter group ``scores`` (higher = keep more)."""
    if len(sizes) != len(scores):
        raise ValueError("one score per group")
    lo, hi = deviation_bounds(sizes, ratio, max_deviation)
    clean = [max(0.0, float(s)) if math.isfinite(s) else 0.0 for s in scores]
    if not any(clean):  # no information: equal scores, i.e. uniform
        clean = [1.0] * len(sizes)
    slope = [c * s for c, s in zip(clean, sizes)]
    return fill_to_total([float(x) for x in lo], slope, lo, hi, keep_total(sizes, ratio))


def scores(streamed: StreamedModel, batches: list[dict], config, progress: Progress) -> tuple[list[float], dict]:
    """Per-weight zeroth-order scores on the first ``config.ecoflap_samples`` calibration samples."""
    scoring = take_samples(batches, config.ecoflap_samples)
    samples = sum(b["input_ids"].shape[0] for b in scoring)
    if config.ecoflap_scores == "gradient":
        result = gradient_scores(streamed, scoring, progress)
        return result.per_weight, {"ecoflap": {"scores": "gradient", "samples": samples}}
    result = zeroth_order_scores(streamed, scoring, config.epsilon, config.draws, config.seed, progress)
    return result.per_weight, {"ecoflap": {"epsilon": config.epsilon, "draws": config.draws,
                                           "samples": samples, "seed": config.seed}}


def keep_counts(sizes: Sequence[int], scores: Sequence[float], config) -> list[int]:
    return water_fill(sizes, scores, config.ratio, config.max_deviation)
