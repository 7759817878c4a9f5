"""Python API of the pattern search.

    from vlsparse.models import load
    from vlsparse.profile import save_profile
    from vlsparse.search.api import profile_model
    from vlsparse.search.calibration import calibration_from

    loaded = load("demo")
    profile = profile_model(loaded, calibration_from(loaded, samples=4, seq_len=4096))
    save_profile(profile, "profiles/demo.yaml")

For each calibration sample the model runs one ordinary forward with the
capture attention function (``search.capture``); each language layer's
queries and keys are scored against every candidate as they pass
(``search.evaluate``), so only one layer's tensors are alive at a time.
Then each (layer, query head) takes the cheapest candidate that keeps
``recall`` on every sample (``search.choose``).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Callable, Iterator

import torch

from vlsparse.errors import InputError, param
from vlsparse.memory import calibration_tokens, check_sequence_fits
from vlsparse.patterns import lookup
from vlsparse.profile import AttentionProfile, Calibration, Profile
from vlsparse.profile.layout import prompt_layout
from vlsparse.search.calibration import CalibrationSet, prepare_sample
from vlsparse.search.candidates import LAST_Q, SearchSpace, catalogue
from vlsparse.search.capture import capture_attention
from vlsparse.search.choose import head_profile
from vlsparse.search.pattern_search import PatternSearch
from vlsparse.search.recall import BLOCK, STEP_ELEMENTS

Progress = Callable[[str], None]

STATIC_STATS_BYTES = 1 << 30
"""Most memory the static masks' statistics may take (``layers * heads * samples * (N/64)^2`` floats);
above it static candidates are left out of the search."""


def image_strides(spans_per_sample: list[list]) -> tuple[int, ...]:
    """Grid strides seen in the calibration inputs, from the processor's image grids: the most
    common row stride (``cols`` tokens) and the most common frame stride (distance between
    consecutive images' first grid tokens)."""
    rows = Counter(s.cols for spans in spans_per_sample for s in spans if s.cols > 0)
    frames = Counter(b.grid_start - a.grid_start for spans in spans_per_sample for a, b in zip(spans, spans[1:])
                     if a.cols > 0 and b.cols > 0)
    return tuple(dict.fromkeys(c.most_common(1)[0][0] for c in (rows, frames) if c))


def static_mask_name(layer: int, head: int) -> str:
    """Sidecar tensor name of a static head's tile mask."""
    return f"attention.static.layer{layer}.head{head}"


def auto_threads() -> int:
    """Torch threads for the search: 1 on a busy machine (1-minute load average >= cores), else all cores.

    Under oversubscription torch's OpenMP threads wait on each other at every op;
    on the 2-core development machines one thread ran the search 3-4x faster then.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy else max(1, torch.get_num_threads())


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (``None`` or 0: unchanged)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _forward(model, inputs: dict) -> None:
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    except TypeError:  # a forward without logits_to_keep
        model(**inputs, use_cache=False)


def profile_model(loaded, calibration: CalibrationSet, recall: float = 0.95, space: SearchSpace = SearchSpace(),
                  tie_density: float = 0.01, min_gain: float = 0.01, max_elements: int = STEP_ELEMENTS,
                  threads: int | None = None, progress: Progress | None = None,
                  tail_recall: float | None = None, dense_tail: bool = True) -> Profile:
    """Search every language layer's query heads of ``loaded`` on ``calibration``; return the profile.

    ``recall``: the attention recall every sample must keep (default 0.95);
    ``tail_recall``: the recall every sample must keep over its last 64-row query block,
    where the question and the answer's row are (default: ``recall``; 0: no such guard);
    ``dense_tail``: that block runs dense in every head (recorded in the profile; the runtime
    follows it), which makes its recall 1 at a cost of at most ``2 / (NQB + 1)`` of the pairs;
    ``space``: budget ladders; ``tie_density`` / ``min_gain``: the tie-break
    (see ``search.choose``); ``max_elements``: floats in one row block's scores
    (memory knob, 8M = 32 MiB by default); ``threads``: torch threads while
    searching (``None``: unchanged; see ``auto_threads``); ``progress``: receives
    one line per sample and layer.
    """
    if not 0.0 < recall <= 1.0:
        raise InputError(f"{param('recall')} must be in (0, 1], got {recall}", f"pass e.g. {param('recall', 0.95)}")
    tail_recall = recall if tail_recall is None else tail_recall
    if not 0.0 <= tail_recall <= 1.0:
        raise InputError(f"{param('tail_recall')} must be in [0, 1], got {tail_recall}",
                         f"pass e.g. {param('tail_recall', 0.95)}")
    check_sequence_fits(loaded, calibration_tokens(calibration), option=param("seq_len"))
    with torch_threads(threads):
        chosen, masks, n_cal, used, layout = _search(loaded, calibration, recall, space, tie_density, min_gain,
                                                     max_elements, progress or (lambda _msg: None), tail_recall,
                                                     dense_tail)
    adapter = loaded.adapter
    layers = []
    tensors = {}
    for li, row in enumerate(chosen):
        heads = []
        for hi, best in enumerate(row):
            name = static_mask_name(li, hi) if (li, hi) in masks else None
            if name:
                tensors[name] = masks[(li, hi)].to(torch.uint8)
            heads.append(head_profile(best, n_cal, mask=name))
        layers.append(heads)
    return Profile(
        model=adapter.fingerprint(),
        calibration=Calibration(source=calibration.source, samples=used, seq_len=n_cal,
                                seed=calibration.seed, target_seq_len=calibration.seq_len, layout=layout),
        attention=AttentionProfile(layers=layers, block_size=BLOCK, recall_target=recall, last_q=LAST_Q,
                                   tail_recall_target=tail_recall, dense_tail=dense_tail),
        tensors=tensors,
    )


def _search(loaded, calibration: CalibrationSet, recall: float, space: SearchSpace, tie_density: float,
            min_gain: float, max_elements: int, say: Progress, tail_recall: float, dense_tail: bool):
    """Run the calibration forwards with the capture on; return the choice per head, what it was made at (mean
    length, samples) and the prompts' layout (``vlsparse.profile.layout``)."""
    adapter = loaded.adapter
    prepared = []
    for sample in calibration.samples:
        inputs = prepare_sample(loaded, sample)
        prepared.append((sample, inputs, adapter.image_spans(inputs), int(inputs["input_ids"].shape[1])))
    lengths = [n for *_, n in prepared]
    n_cal = int(round(sum(lengths) / len(lengths)))
    spans_all = [s for _, _, spans, _ in prepared for s in spans]
    candidates = catalogue(n_cal, images=bool(spans_all), strides=image_strides([s for *_, s, _ in prepared]),
                           space=space)
    def offline(c) -> bool:
        return lookup(c.pattern).OFFLINE

    if len(prepared) < 2:  # offline (static) masks are scored leave-one-out: they need two samples
        candidates = [c for c in candidates if not offline(c)]
    nb = max(-(-n // BLOCK) for n in lengths)
    static_bytes = 4 * adapter.num_layers * adapter.num_heads * len(prepared) * nb * nb
    if static_bytes > STATIC_STATS_BYTES and any(offline(c) for c in candidates):
        candidates = [c for c in candidates if not offline(c)]
        say(f"note: static masks left out (their statistics would take {static_bytes / 2**30:.1f} GiB; "
            f"use fewer --samples or a shorter --seq-len)")
    search = PatternSearch(candidates, adapter.num_layers, adapter.num_heads, last_q=LAST_Q, block=BLOCK,
                           max_elements=max_elements, dense_tail=dense_tail)
    modules = [adapter.self_attention(layer) for layer in adapter.lm_layers()]  # None: no self-attention (dense)
    off_causal: dict[int, tuple[int, int]] = {}  # layer -> the largest (rows off causal, n) seen

    def on_mask(layer: int, rows: int, n: int) -> None:
        seen_rows, seen_n = off_causal.get(layer, (0, 1))
        if rows * seen_n > seen_rows * n:
            off_causal[layer] = (rows, n)

    total = len(prepared)
    for index, (sample, inputs, spans, n) in enumerate(prepared, start=1):
        if adapter.image_tokens or not sample.images:
            seen = f"{sum(s.length for s in spans)} image tokens, {len({s.image_index for s in spans})} images"
        else:  # Mllama: the images are given, but reach the LM through its cross-attention layers
            seen = f"{len(sample.images)} images through cross-attention, no image tokens"
        say(f"({index}/{total}) {sample.name}: {n} tokens ({seen})")

        def on_layer(layer: int, query: torch.Tensor, key: torch.Tensor, scale: float,
                     spans=spans, index=index) -> None:
            search.add(layer, query[0].detach().float(), key[0].detach().float(), scale, spans)
            say(f"({index}/{total}) layer {layer + 1}/{adapter.num_layers} scored")

        with torch.inference_mode(), capture_attention(loaded.model, modules, on_layer, on_mask=on_mask):
            _forward(loaded.model, inputs)
    if off_causal:
        layers = ", ".join(f"{layer + 1} ({rows}/{n} rows)" for layer, (rows, n) in sorted(off_causal.items()))
        say(f"note: the model's mask is not causal on some rows of layers {layers} (a sliding window shorter "
            f"than the sample, bidirectional image or prefix tokens, padding): patterns are scored as causal "
            f"attention, and the runtime runs those rows dense under the model's mask")
    say(f"choosing among {len(candidates)} candidates per head")
    chosen, masks = search.choose(recall, n_cal, tie_density=tie_density, min_gain=min_gain, tail_target=tail_recall)
    layout = prompt_layout([(n, spans if adapter.image_tokens else []) for _, _, spans, n in prepared])
    return chosen, masks, n_cal, total, layout
