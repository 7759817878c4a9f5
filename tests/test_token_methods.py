"""Visual-token reduction rules (vlsparse.tokens): attention helper, each method on a case with a known answer, registry."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from vlsparse.errors import InputError
from vlsparse.tokens import (INTERFACE, METHOD_NAMES, AttentionSpec, Selection, Stage, TokenContext, count_for,
                             method_named, methods)
from vlsparse.tokens._select import greedy_diverse, nearest_neighbour_distance
from vlsparse.tokens.attention import attention_received, query_rows, received_for, visible_row_counts


def dense_received(q, k, scale, rows, keys=None, reduce="sum"):
    """Reference: the full N x N causal softmax per head, then rows summed (or averaged)."""
    heads, n, _ = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(heads, n, dtype=torch.float64)
    allowed = torch.zeros(n, dtype=torch.bool)
    allowed[torch.arange(n) if keys is None else keys] = True
    for h in range(heads):
        s = (q[h].double() @ k[h // group].double().T) * scale
        mask = torch.ones(n, n, dtype=torch.bool).tril() & allowed[None, :]
        s = s.masked_fill(~mask, float("-inf"))
        out[h] = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)[rows].sum(0)
    if reduce == "mean":
        out /= len(rows)
    elif reduce == "visible":
        counts = torch.tensor([sum(1 for r in rows.tolist() if r >= j) for j in range(n)], dtype=torch.float64)
        out /= counts.clamp(min=1)
    return out


def layout(system: int, image: int, text: int) -> torch.Tensor:
    """image_mask of a [system | image | text] prompt."""
    mask = torch.zeros(system + image + text, dtype=torch.bool)
    mask[system:system + image] = True
    return mask


def peaked_qk(image_mask, targets_by_row, n_heads=2, dim=8, strength=12.0, seed=0):
    """q/k where query row r attends (almost only) to the key positions ``targets_by_row(r)``: each
    target group gets its own direction, carried strongly by its keys and by the rows that want it."""
    gen = torch.Generator().manual_seed(seed)
    n = image_mask.numel()
    k = 0.01 * torch.randn(1, n, dim, generator=gen)
    q = torch.zeros(n_heads, n, dim)
    directions = {}
    for r in range(n):
        group = frozenset(targets_by_row(r))
        if not group:
            continue
        d = directions.setdefault(group, len(directions))
        assert d < dim, "too many distinct target groups for dim"
        for pos in group:
            k[0, pos, d] = strength
        q[:, r, d] = 1.0
    return q, k


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("reduce", ["sum", "mean", "visible"])
def test_attention_received_matches_dense(heads, kv_heads, reduce):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    n, d = 23, 8
    q, k, scale = torch.randn(heads, n, d, generator=gen), torch.randn(kv_heads, n, d, generator=gen), d ** -0.5
    row_sets = [torch.arange(n), torch.tensor([n - 1]), torch.tensor([20, 3, 11, 7, 15]), torch.tensor([0])]
    for rows in row_sets:
        want = dense_received(q, k, scale, rows, reduce=reduce)
        for block in (1, 3, 256):
            got = attention_received(q, k, scale, rows, reduce=reduce, block=block)
            assert got.dtype == torch.float32 and got.shape == (heads, n)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_attention_received_key_subset_normalises_over_the_subset():
    gen = torch.Generator().manual_seed(1)
    n, d = 17, 4
    q, k = torch.randn(2, n, d, generator=gen), torch.randn(1, n, d, generator=gen)
    keys = torch.arange(4, 12)
    rows = torch.tensor([2, 9, 16])  # row 2 sees no allowed key and must contribute nothing
    got = attention_received(q, k, 0.5, rows, keys=keys, block=2)
    torch.testing.assert_close(got.double(), dense_received(q, k, 0.5, rows, keys=keys), rtol=1e-5, atol=1e-6)
    outside = torch.ones(n, dtype=torch.bool)
    outside[keys] = False
    assert float(got[:, outside].abs().sum()) == 0.0
    torch.testing.assert_close(got.sum(-1), torch.full((2,), 2.0))  # rows 9 and 16 each put 1.0 on the subset


def test_attention_received_row_sums_and_visible_counts():
    n = 9
    q, k = torch.randn(3, n, 4), torch.randn(3, n, 4)
    rows = torch.arange(n)
    total = attention_received(q, k, 1.0, rows)
    torch.testing.assert_close(total.sum(-1), torch.full((3,), float(n)))  # each row's softmax sums to 1
    counts = visible_row_counts(torch.tensor([1, 5, 8]), n)
    assert counts.tolist() == [3, 3, 2, 2, 2, 2, 1, 1, 1]


def test_query_rows_named_sets_and_bad_shapes():
    with pytest.raises(ValueError):
        attention_received(torch.randn(3, 5, 4), torch.randn(2, 5, 4), 1.0, torch.arange(5))
    with pytest.raises(ValueError):
        attention_received(torch.randn(2, 5, 4), torch.randn(1, 5, 4), 1.0, torch.tensor([5]))
    mask = layout(2, 4, 3)
    assert query_rows("last", mask).tolist() == [8]
    assert query_rows("image", mask).tolist() == [2, 3, 4, 5]
    assert query_rows("text", mask).tolist() == [6, 7, 8]  # the system prompt before the image is not "text"
    assert query_rows("all", mask).tolist() == list(range(9))
    with pytest.raises(ValueError):
        query_rows("first", mask)


def test_fastv_keeps_the_tokens_that_receive_the_most_attention():
    mask = layout(2, 10, 3)
    positions = mask.nonzero().flatten()
    targets = [1, 4, 6, 9]  # image-token indices that everybody attends to
    target_pos = {int(positions[i]) for i in targets}
    q, k = peaked_qk(mask, lambda r: {p for p in target_pos if p <= r})
    fastv = method_named("fastv")
    for rows in ("all", "last"):
        spec = fastv.attention(rows=rows)
        ctx = TokenContext(image_mask=mask, received=received_for(spec, q, k, 1.0, mask))
        sel = fastv.select(ctx, len(targets), rows=rows)
        assert sel.kept.tolist() == targets
        fewer = fastv.select(ctx, 2, rows=rows)
        assert fewer.kept.numel() == 2 and set(fewer.kept.tolist()) <= set(targets)


def test_row_sets_decide_the_ranking_fastv_all_versus_pyramiddrop_last():
    mask = layout(1, 8, 4)
    positions = mask.nonzero().flatten()
    last = mask.numel() - 1
    wanted_by_last = {int(positions[i]) for i in (0, 2)}
    wanted_by_others = {int(positions[i]) for i in (5, 7)}
    q, k = peaked_qk(mask, lambda r: wanted_by_last if r == last else {p for p in wanted_by_others if p <= r})
    pdrop, fastv = method_named("pyramiddrop"), method_named("fastv")
    ctx = TokenContext(image_mask=mask)
    ctx.received.update(received_for(pdrop.attention(), q, k, 1.0, mask))
    ctx.received.update(received_for(fastv.attention(rows="all"), q, k, 1.0, mask))
    assert pdrop.select(ctx, 2).kept.tolist() == [0, 2]
    assert fastv.select(ctx, 2, rows="all").kept.tolist() == [5, 7]


def test_pyramiddrop_schedule_gives_the_staged_counts():
    pdrop = method_named("pyramiddrop")
    for num_layers, lam in ((32, 0.5), (40, 0.5), (24, 0.6)):
        stages = pdrop.schedule(num_layers, keep=lam)
        # the LM is cut into 4 equal stages; each boundary drops after its last layer
        assert [s.layer for s in stages] == [num_layers * s // 4 - 1 for s in (1, 2, 3)]
        counts = [count_for(s.keep, 576) for s in stages]
        assert counts == [math.floor(576 * lam ** s + 1e-9) for s in (1, 2, 3)]
        for before, after in zip([576] + counts, counts):
            assert after == pytest.approx(before * lam, abs=1)  # each stage keeps lambda of the previous
    assert [count_for(s.keep, 576) for s in pdrop.schedule(32)] == [288, 144, 72]  # paper: 50/25/12.5 %
    spec = pdrop.attention()
    assert spec.rows == ("last",) and spec.layer_offset == 1 and spec.rope
    assert pdrop.schedule(32, layers=[3, 9])[1] == Stage(9, 0.25)
    with pytest.raises(InputError):
        pdrop.schedule(3)  # too shallow for four stages


def test_feather_uniform_sampling_keeps_both_halves_where_fastv_loses_one():
    rows, cols, n, mask = 6, 6, 36, layout(1, 36, 3)
    scores = torch.rand(n, generator=(gen := torch.Generator().manual_seed(3))) * 0.01
    scores[n // 2:] += 1.0 + torch.rand(n // 2, generator=gen)  # attention concentrated on the bottom half
    received = torch.zeros(mask.numel())
    received[mask] = scores
    ctx = TokenContext(image_mask=mask, received={"last": received, "all": received}, grid=[(rows, cols)])
    feather, fastv = method_named("feather"), method_named("fastv")
    keep_count = count_for(feather.DEFAULTS["keep"], n)
    top_half = lambda kept: [i for i in kept.tolist() if i // cols < rows // 2]  # noqa: E731

    lost = fastv.select(ctx, keep_count)
    assert lost.kept.numel() == keep_count and top_half(lost.kept) == []

    sel = feather.select(ctx, keep_count, stage=0)
    kept = set(sel.kept.tolist())
    grid = {r * cols + c for r in range(0, rows, 3) for c in range(0, cols, 3)}  # every 3rd row and column
    assert grid <= kept and set(lost.kept.tolist()) <= kept
    assert kept == grid | set(lost.kept.tolist())
    assert top_half(sel.kept) and len(kept) > keep_count
    assert sel.kept.tolist() == sorted(kept)

    # stage 1: only the survivors are left; keep keep**2 of them by score alone
    survivors = ~mask
    survivors[mask.nonzero().flatten()[sel.kept]] = True
    mask2, received2 = mask[survivors], received[survivors]
    second = feather.select(TokenContext(image_mask=mask2, received={"last": received2}), 0, stage=1)
    expected = math.floor(feather.DEFAULTS["keep"] ** 2 * int(mask2.sum()) + 1e-9)
    assert second.kept.numel() == expected
    assert second.kept.tolist() == sorted(torch.topk(received2[mask2], expected).indices.tolist())

    spec = feather.attention()
    assert spec.rope is False and spec.keys == "image" and spec.rows == ("last",) and spec.layer_offset == 1
    assert [s.layer for s in feather.schedule(32)] == [7, 15]  # before layers 8 and 16


def test_feather_grid_per_image_and_fallbacks():
    feather = method_named("feather")
    mask = layout(0, 16 + 9 + 10, 1)
    image_index = torch.tensor([0] * 16 + [1] * 9 + [2] * 10)
    ctx = TokenContext(image_mask=mask, image_index=image_index, grid=[(4, 4), (3, 3), (2, 5)])
    want = [r * 4 + c for r in (0, 2) for c in (0, 2)] + [16 + r * 3 + c for r in (0, 2) for c in (0, 2)]
    assert feather.uniform_tokens(ctx, 2).tolist() == sorted(want + [25, 27, 29])  # (2, 5): row 0, cols 0/2/4
    no_grid = TokenContext(image_mask=layout(0, 10, 1))  # not a square: every stride**2-th token
    assert feather.uniform_tokens(no_grid, 2).tolist() == [0, 4, 8]


def zipvl_reference_count(values: list[float], tau: float) -> int:
    total, running = sum(values), 0.0
    for p, value in enumerate(sorted(values, reverse=True), start=1):
        running += value
        if running >= tau * total - 1e-12:
            return p
    return len(values)


def test_zipvl_count_is_the_smallest_prefix_holding_tau_of_the_mass():
    zipvl = method_named("zipvl")
    gen = torch.Generator().manual_seed(5)
    n, mask = 40, layout(3, 40, 2)
    for concentration in (0.5, 2.0, 6.0):
        scores = torch.rand(n, generator=gen) ** concentration * torch.rand(n, generator=gen) * 5
        received = torch.zeros(mask.numel())
        received[mask] = scores
        ctx = TokenContext(image_mask=mask, received={"all": received})
        for tau in (0.5, 0.9, 0.975):
            want = zipvl_reference_count(scores.tolist(), tau)
            sel = zipvl.select(ctx, keep_count=1, tau=tau, rows="all")  # keep_count is ignored: the count is adaptive
            assert sel.kept.numel() == want
            assert set(sel.kept.tolist()) == set(torch.topk(scores, want).indices.tolist())
            assert float(scores[sel.kept].sum()) >= tau * float(scores.sum()) - 1e-6
            shorter = torch.topk(scores, want - 1).values.sum() if want > 1 else torch.tensor(0.0)
            assert float(shorter) < tau * float(scores.sum())
    received = torch.zeros(mask.numel())
    received[mask] = 0.001
    received[mask.nonzero().flatten()[[3, 17]]] = 1.0
    sel = zipvl.select(TokenContext(image_mask=mask, received={"all": received}), keep_count=n, rows="all")
    assert sel.kept.tolist() == [3, 17]  # concentrated attention: few tokens, whatever keep_count says
    assert zipvl.attention().reduce == "visible"


def clustered(sizes=(5, 5, 5), dim=16, seed=0, norms=(10.0, 1.0, 1.0)):
    """Tokens in well-separated clusters around orthogonal centres; cluster 0 has the largest norms."""
    gen = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, size in enumerate(sizes):
        feats.append((torch.eye(dim)[c] + 0.05 * torch.randn(size, dim, generator=gen)) * norms[c])
        labels += [c] * size
    perm = torch.randperm(sum(sizes), generator=gen)
    return torch.cat(feats)[perm], torch.tensor(labels)[perm]


def context_with_hidden(features, system=2, text=3, **extra):
    mask = layout(system, features.shape[0], text)
    hidden = torch.randn(mask.numel(), features.shape[1])
    hidden[mask] = features
    return TokenContext(image_mask=mask, hidden=hidden, **extra)


def test_divprune_picks_one_token_per_cluster():
    feats, labels = clustered()
    ctx = context_with_hidden(feats)
    sel = method_named("divprune").select(ctx, 3)
    assert sorted(labels[sel.kept].tolist()) == [0, 1, 2]  # a norm- or attention-based rule would take cluster 0
    order = greedy_diverse(feats, 6)  # pick order: the first three cover the three clusters
    assert sorted(labels[order[:3]].tolist()) == [0, 1, 2]
    nearest = nearest_neighbour_distance(torch.nn.functional.normalize(feats, dim=-1))
    assert int(order[0]) == int(torch.argmax(nearest))  # DivPrune's start: the most isolated token
    assert method_named("divprune").select(ctx, 6).kept.tolist() == sorted(order.tolist())


def test_todre_diversity_starts_from_the_pivot_and_covers_every_cluster():
    feats, labels = clustered(sizes=(4, 6, 5), seed=2)
    todre = method_named("todre")
    pivot = int((labels == 2).nonzero()[1])
    vision_attention = torch.nn.functional.one_hot(torch.tensor(pivot), feats.shape[0]).float()
    ctx = context_with_hidden(feats, vision_attention=vision_attention)
    for objective in ("k_center", "max_sum"):
        sel = todre.select(ctx, 3, stage=0, objective=objective)
        assert pivot in sel.kept.tolist()
        assert sorted(labels[sel.kept].tolist()) == [0, 1, 2]
    no_cls = context_with_hidden(feats)
    assert sorted(labels[todre.select(no_cls, 3, stage=0).kept].tolist()) == [0, 1, 2]


def test_todre_relevance_stage_drops_all_image_tokens_only_when_attention_has_migrated():
    todre = method_named("todre")
    mask = layout(3, 6, 4)
    positions = mask.nonzero().flatten()
    spec = todre.attention(stage=1)
    assert spec.rows == ("text", "image") and todre.schedule(32)[1].layer == 28
    text_rows = set(query_rows("text", mask).tolist())
    # migrated: the instruction attends to the system prompt, not to the image
    q, k = peaked_qk(mask, lambda r: {0, 1} if r in text_rows else set())
    ctx = TokenContext(image_mask=mask, received=received_for(spec, q, k, 1.0, mask))
    assert todre.select(ctx, 0, stage=1).kept.numel() == 0
    # still looking at the image: nothing is dropped
    q, k = peaked_qk(mask, lambda r: {int(positions[1]), int(positions[4])} if r in text_rows else set())
    ctx = TokenContext(image_mask=mask, received=received_for(spec, q, k, 1.0, mask))
    assert todre.select(ctx, 0, stage=1).kept.tolist() == list(range(6))
    no_text = TokenContext(image_mask=layout(3, 6, 0), received={"text": torch.zeros(9), "image": torch.zeros(9)})
    assert todre.select(no_text, 0, stage=1).kept.numel() == 6  # nothing to measure against: keep all


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_group_means():
    visionzip, n, dim, dominant = method_named("visionzip"), 12, 6, [2, 7, 11]
    gen = torch.Generator().manual_seed(7)
    vision_attention = torch.rand(n, generator=gen) * 0.1
    vision_attention[dominant] = torch.tensor([0.9, 0.8, 0.95])
    rest = [i for i in range(n) if i not in dominant]  # 9 tokens; with 2 targets: step 4, targets rest[0], rest[4]
    cluster_a = {rest[i] for i in (0, 1, 3, 6, 8)}
    centres = torch.eye(dim)[:2] * 3.0
    embeddings = torch.randn(n, dim, generator=gen)
    for i in rest:
        embeddings[i] = centres[0 if i in cluster_a else 1] + 0.1 * torch.randn(dim, generator=gen)
    ctx = context_with_hidden(embeddings, vision_attention=vision_attention)
    sel = visionzip.select(ctx, 5, contextual_share=0.4)  # 5 = 3 dominant + 2 contextual
    assert sel.kept.tolist() == dominant
    assert sel.merged_slots.tolist() == [rest[0], rest[4]] and sel.count == 5
    torch.testing.assert_close(sel.merged[0], embeddings[sorted(cluster_a)].mean(0))  # target + its members
    torch.testing.assert_close(sel.merged[1], embeddings[[i for i in rest if i not in cluster_a]].mean(0))
    with pytest.raises(InputError):
        visionzip.select(context_with_hidden(embeddings), 5)  # no vision attention


def test_visionzip_defaults_split_like_the_paper():
    visionzip = method_named("visionzip")
    for budget, dominant in ((64, 54), (128, 108), (192, 162)):
        assert visionzip.split(budget, visionzip.DEFAULTS["contextual_share"]) == (dominant, budget - dominant)
    assert count_for(visionzip.schedule(32)[0].keep, 576) == 64


def test_registry_every_module_has_the_full_interface():
    registry = methods()
    assert tuple(registry) == METHOD_NAMES
    assert methods() is not registry and methods() == registry  # fresh dict each call
    registry.pop("fastv")
    assert "fastv" in methods()
    for name, module in methods().items():
        assert all(hasattr(module, attribute) for attribute in INTERFACE), name
        assert module.NAME == name and module.WHERE in ("before_lm", "in_lm") and module.PAPER
        assert "keep" in module.DEFAULTS and module.__doc__ and len(module.__doc__) > 200
        stages = module.schedule(32)
        layers = [s.layer for s in stages if isinstance(s, Stage)]
        assert len(layers) == len(stages) and layers == sorted(set(layers)) and -1 <= layers[0] and layers[-1] <= 30
        assert (layers[0] == -1) == (module.WHERE == "before_lm")
        for i, _ in enumerate(stages):
            spec = module.attention(stage=i)
            assert spec is None or isinstance(spec, AttentionSpec)
            assert ("received" in module.needs(stage=i)) == (spec is not None)


def test_method_named_and_parameter_errors():
    assert method_named("FastV").NAME == "fastv"
    with pytest.raises(InputError) as info:
        method_named("tome")
    assert all(name in info.value.hint for name in METHOD_NAMES)
    with pytest.raises(InputError):
        method_named("fastv").schedule(32, ratio=0.5)
    with pytest.raises(InputError):
        method_named("fastv").schedule(32, keep=1.5)
    with pytest.raises(InputError):
        method_named("feather").schedule(2)


def test_every_method_returns_a_valid_selection_on_a_random_context():
    gen = torch.Generator().manual_seed(11)
    n_image, dim = 36, 12
    mask = layout(4, n_image, 5)
    q, k = torch.randn(4, mask.numel(), dim, generator=gen), torch.randn(2, mask.numel(), dim, generator=gen)
    for name, module in methods().items():
        for i, stage in enumerate(module.schedule(16)):
            spec = module.attention(stage=i)
            ctx = TokenContext(image_mask=mask, hidden=torch.randn(mask.numel(), dim, generator=gen),
                               vision_attention=torch.rand(n_image, generator=gen), grid=[(6, 6)],
                               received={} if spec is None else received_for(spec, q, k, dim ** -0.5, mask),
                               layer=stage.layer, num_layers=16)
            sel = module.select(ctx, count_for(stage.keep, n_image), stage=i)
            kept = sel.kept.tolist() if isinstance(sel, Selection) else None
            assert kept == sorted(set(kept)) and all(0 <= j < n_image for j in kept), name
            if sel.merged_slots is not None:
                assert sel.merged.shape == (sel.merged_slots.numel(), dim)
                assert not set(sel.merged_slots.tolist()) & set(kept)


def test_importing_the_package_is_light():
    code = "import sys, vlsparse.tokens as t; t.method_named; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
