"""The pattern table (vlsparse.patterns): every pattern is one module with the full interface, its
search-side layout keeps the runtime's query-key pairs, and a new pattern is one module plus its test."""

from __future__ import annotations

import types

import pytest
import torch

from vlsparse.kernels.indices import index_mask, slash_windows, vertical_slash_index
from vlsparse.patterns.layer import layer_index
from vlsparse.models.adapter import ImageSpan
from vlsparse.patterns import INTERFACE, PATTERNS, SEARCH_ORDER, lookup
from vlsparse.patterns.common import candidate, estimate, head_counts, static_tiles
from vlsparse.profile import PATTERNS as PROFILE_PATTERNS
from vlsparse.profile import HeadProfile
from vlsparse.search.candidates import SearchSpace, budget_counts, build_layout, catalogue, needed_columns
from vlsparse.patterns.layout import Layout
from vlsparse.search.recall import layout_token_mask

N, HEADS, KV_HEADS, DIM, SCALE = 801, 4, 2, 16, 0.25  # ragged: the last query block holds 33 rows; GQA
SPANS = [ImageSpan(0, 90, 90 + 8 * 16, 8, 16, 90), ImageSpan(1, 400, 400 + 8 * 16, 8, 16, 400)]


@pytest.fixture(scope="module")
def qk():
    g = torch.Generator().manual_seed(1)
    return torch.randn(HEADS, N, DIM, generator=g) * 2, torch.randn(KV_HEADS, N, DIM, generator=g) * 2


def test_every_pattern_has_the_full_interface():
    assert tuple(PATTERNS) == PROFILE_PATTERNS and set(SEARCH_ORDER) == set(PATTERNS)
    for name, module in PATTERNS.items():
        missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
        assert missing == [], f"{name} lacks {missing}"
        assert module.NAME == name
        assert set(module.BUDGET_MINIMUMS) | set(module.TILE_BUDGETS) <= set(module.BUDGETS)
        assert set(module.REQUIRED_PARAMS) <= set(module.PARAMS)
        assert module.COLOR.startswith("#")
        assert (module.synthetic_index is None) == (module.density_guess is None) == (module.synthetic_bytes is None)
    with pytest.raises(ValueError, match="unknown attention pattern"):
        lookup("nope")
    with pytest.raises(TypeError):
        PATTERNS["toy"] = PATTERNS["dense"]  # read-only: new patterns go into a copy


def _profile(cand, registry=PATTERNS) -> HeadProfile:
    return HeadProfile(pattern=cand.pattern, budget=cand.budgets, params=cand.parameters,
                       mask="m" if lookup(cand.pattern, registry).USES_MASK else None)


def _agree(cand, est, q, k, registry=PATTERNS, masks=None, mask=None, spans=SPANS):
    index = layer_index([_profile(cand, registry)] * HEADS, q[None], k[None], scale=SCALE,
                        spans=[(s.start, s.end) for s in spans], masks=masks, registry=registry)
    runtime = index_mask(index, N)[0]
    rows = torch.arange(N)
    for h in range(HEADS):
        layout = registry[cand.pattern].layout(cand, est, h, mask)
        assert torch.equal(layout_token_mask(layout, N, rows), runtime[h]), f"{cand.key} head {h}"


@pytest.mark.parametrize("images", [True, False])
def test_search_layout_keeps_the_runtime_pairs_for_every_pattern(qk, images):
    q, k = qk
    spans = SPANS if images else []
    est = estimate(q, k, SCALE, spans)
    everything = catalogue(N, images=images, strides=(16, 128))
    for name, module in PATTERNS.items():
        cands = [c for c in everything if c.pattern == name]
        assert cands or (name == "modality_vertical_slash" and not images), name
        for cand in cands[:: max(1, len(cands) // 4)]:
            if module.USES_MASK:
                mean_mass = torch.rand(11, 11, generator=torch.Generator().manual_seed(3))
                tiles = static_tiles(mean_mass, cand.budgets["select"])
                _agree(cand, est, q, k, masks={"m": tiles}, mask=tiles, spans=spans)
            else:
                _agree(cand, est, q, k, spans=spans)


def test_static_has_no_layout_without_its_mask(qk):
    est = estimate(*qk, SCALE)
    with pytest.raises(ValueError, match="no online layout"):
        build_layout(candidate("static", {"select": 0.1}), est, 0)


def _toy_module() -> types.SimpleNamespace:
    """A new pattern, ``stripes``: the local band plus diagonals at multiples of ``every`` tokens."""

    def slashes(n, every, local):
        return torch.cat([torch.arange(local), torch.arange(0, n, every)])

    def candidates(n0, images, strides, space):
        return [candidate("stripes", {"local": t / n0}, {"every": e}) for t in (1, 64) for e in (100, 300)]

    def layout(cand, est, head, mask=None):
        local = head_counts([types.SimpleNamespace(budget=cand.budgets)], "local", est.n, 1)[0]
        return Layout(starts=slash_windows(slashes(est.n, cand.parameters["every"], local), est.n, est.block)[None])

    def runtime_index(profiles, ids, inputs):
        n = inputs.n
        sets = [slashes(n, p.params["every"], c) for p, c in zip(profiles, head_counts(profiles, "local", n, 1))]
        width = max(len(s) for s in sets)
        slash = torch.stack([torch.nn.functional.pad(s, (0, width - len(s)), value=n) for s in sets])
        none = torch.full((1, len(ids), 1), n, dtype=torch.long)
        return [(ids, vertical_slash_index(none, slash[None], n, inputs.block_size))]

    return types.SimpleNamespace(
        NAME="stripes", BUDGETS=("local",), PARAMS=("every",), REQUIRED_PARAMS=("every",), USES_MASK=False,
        OFFLINE=False, BUDGET_MINIMUMS={"local": 1}, TILE_BUDGETS=(), COLOR="#000000", candidates=candidates,
        layout=layout, needed_columns=lambda cand, est: {}, runtime_index=runtime_index,
        estimate_flops=lambda n, d, last_q, block: 0.0, synthetic_index=None, synthetic_bytes=None,
        density_guess=None)


def test_a_new_pattern_is_one_module_registered_into_a_copy(qk):
    q, k = qk
    toy = _toy_module()
    registry = dict(PATTERNS) | {"stripes": toy}
    assert "stripes" not in PATTERNS and all(hasattr(toy, attr) for attr in INTERFACE)
    space = SearchSpace(patterns=("stripes", "a_shape", "dense"))
    cands = catalogue(N, space=space, registry=registry)
    toys = [c for c in cands if c.pattern == "stripes"]
    assert len(toys) == 4 and cands[:4] == toys and cands[-1].pattern == "dense"
    assert budget_counts(toys[0], N, registry=registry) == {"local": 1}
    est = estimate(q, k, SCALE)
    assert needed_columns(est, cands, registry=registry).shape[0] == HEADS
    for cand in toys:
        build_layout(cand, est, 0, registry=registry)
        _agree(cand, est, q, k, registry=registry, spans=[])
    with pytest.raises(ValueError, match="unknown attention pattern"):
        layer_index([_profile(candidate("dense"))] * 3 + [HeadProfile(pattern="stripes", budget={"local": 0.1},
                                                                      params={"every": 50})], q[None], k[None])
