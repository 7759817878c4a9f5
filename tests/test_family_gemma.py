"""Gemma 3 and PaliGemma on tiny random models: image layout, the sparse runtime under their masks
(sliding windows, bidirectional image blocks, PaliGemma's bidirectional prefix), pruning, token dropping."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from prompts import COLOURS, generate_with_logits
from vlsparse.compat import cache_layer_keys, cache_of_output
from vlsparse.kernels import runtime as sparse_runtime
from vlsparse.kernels.core_runtime import attach_core, detach_core
from vlsparse.kernels.runtime import attach, detach
from vlsparse.models import load
from vlsparse.models.families.base import tokenizer_of
from vlsparse.profile import AttentionProfile, HeadProfile, Profile
from vlsparse.profile.core import CoreSettings

EVERYTHING = HeadProfile("block_sparse", {"blocks": 1.0})
"""Every causal block: exact causal attention on the rows the kernels run."""


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    return load(gemma3_dir)


@pytest.fixture(scope="module")
def paligemma(paligemma_dir):
    return load(paligemma_dir)


def _images(count: int) -> list:
    return [Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]) for i in range(count)]


def _logits(loaded, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(**inputs).logits.float()


def _all_covering(loaded):
    adapter = loaded.adapter
    layers = [[EVERYTHING] * adapter.num_heads for _ in range(adapter.num_layers)]
    return attach(loaded, Profile(model=adapter.fingerprint(), attention=AttentionProfile(layers=layers)),
                  min_len=0, dense_above=1.0)


def _sparse_logits(loaded, inputs, ignore_mask: bool = False, monkeypatch=None):
    """Logits with the all-covering profile attached; ``ignore_mask``: as if the runtime took every row as causal."""
    if ignore_mask:
        monkeypatch.setattr(sparse_runtime, "off_causal_rows", lambda mask, n: torch.zeros(n, dtype=torch.bool))
    runtime = _all_covering(loaded)
    try:
        return _logits(loaded, inputs), [c.index is not None for c in runtime.calls]
    finally:
        detach(loaded, runtime)
        if ignore_mask:
            monkeypatch.undo()


# ----------------------------------------------------------------------------- layout


def test_gemma3_spans_are_the_soft_tokens_between_boi_and_eoi(gemma3):
    config = gemma3.model.config
    inputs = gemma3.prepare(_images(3), "what color is this ?")
    ids = inputs["input_ids"][0].tolist()
    per_image = config.mm_tokens_per_image
    side = int(per_image ** 0.5)
    starts = [i + 1 for i, t in enumerate(ids) if t == config.boi_token_id]  # the processor's own markers
    assert len(starts) == 3
    expected = [(s, s + per_image) for s in starts]
    assert all(ids[end] == config.eoi_token_id for _, end in expected)
    for inputs_seen in (inputs, {"input_ids": inputs["input_ids"]}):  # generate's later calls: no pixel_values
        spans = gemma3.adapter.image_spans(inputs_seen)
        assert [(s.start, s.end) for s in spans] == expected
        assert all((s.rows, s.cols, s.grid_start) == (side, side, s.start) for s in spans)
    image = torch.zeros(len(ids), dtype=torch.long)
    for start, end in expected:
        image[start:end] = 1
    assert torch.equal(inputs["token_type_ids"][0], image)  # the model's bidirectional blocks are the spans


def test_paligemma_spans_open_the_prompt_and_the_prefix_is_bidirectional(paligemma):
    vision = paligemma.model.config.vision_config
    side = vision.image_size // vision.patch_size
    inputs = paligemma.prepare(_images(2), "what color is this ?")
    ids = inputs["input_ids"][0]
    spans = paligemma.adapter.image_spans(inputs)
    assert [(s.start, s.end, s.rows, s.cols) for s in spans] == [(0, side * side, side, side),
                                                                  (side * side, 2 * side * side, side, side)]
    assert int(ids[2 * side * side]) == tokenizer_of(paligemma.processor).bos_token_id
    assert "labels" not in inputs and bool((inputs["token_type_ids"] == 0).all())  # all prefix
    # the prefix really is bidirectional: the first token's logits change with a later word of the prompt
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -2] = tokenizer_of(paligemma.processor).convert_tokens_to_ids("square")
    assert int(inputs["input_ids"][0, -2]) != int(changed["input_ids"][0, -2])
    assert (_logits(paligemma, inputs)[0, 0] - _logits(paligemma, changed)[0, 0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- runtime under the model's masks


def test_gemma3_sliding_window_is_respected(gemma3, monkeypatch):
    """A text prompt a little longer than layer 0's window: its first rows run sparse, the rest under the window."""
    window = gemma3.model.config.text_config.sliding_window
    words = "what is this color shape circle square red blue green the a of in image".split()
    inputs = gemma3.adapter.prepare_text(gemma3.processor, " ".join(words))
    n = inputs["input_ids"].shape[1]
    assert window < n <= 2 * window  # most rows inside the window: the layer is not simply run dense
    assert gemma3.model.config.text_config.layer_types[0] == "sliding_attention"
    dense = _logits(gemma3, inputs)
    sparse, indexed = _sparse_logits(gemma3, inputs)
    assert indexed == [True, True]  # both layers ran the kernels
    assert (sparse - dense).abs().max() < 1e-4
    ignored, _ = _sparse_logits(gemma3, inputs, ignore_mask=True, monkeypatch=monkeypatch)
    assert (ignored - dense).abs().max() > 1e-3  # the window matters here: ignoring it is caught


def test_gemma3_scaling_is_query_pre_attn_scalar(gemma3):
    text = gemma3.model.config.text_config
    assert text.query_pre_attn_scalar ** -0.5 != pytest.approx(text.head_dim ** -0.5)  # a case where it differs
    seen = []
    module = gemma3.adapter.attention(gemma3.adapter.lm_layers()[0])
    sparse_runtime.set_observer(module, lambda m, q, k, mask, kwargs: seen.append(kwargs.get("scaling")))
    runtime = _all_covering(gemma3)
    try:
        _logits(gemma3, gemma3.adapter.prepare_text(gemma3.processor, "what is this"))
    finally:
        detach(gemma3, runtime)
        sparse_runtime.set_observer(module, None)
    assert seen == [pytest.approx(text.query_pre_attn_scalar ** -0.5)]


def test_soft_capped_attention_is_not_run_uncapped(gemma3):
    """The kernels do not soft-cap logits: a call given ``softcap`` (Gemma 2 layers) goes to the model's own
    attention (transformers' SDPA refuses it, as it does without vlsparse), never to the kernels."""
    module = gemma3.adapter.attention(gemma3.adapter.lm_layers()[1])
    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    runtime = _all_covering(gemma3)
    try:
        with torch.inference_mode():
            with pytest.raises(ValueError, match="softcap"):
                sparse_runtime.vlsparse_attention(module, q, k, v, None, scaling=0.25, softcap=5.0)
            assert runtime.calls == []
            sparse_runtime.vlsparse_attention(module, q, k, v, None, scaling=0.25)
            assert [c.index is not None for c in runtime.calls] == [True]
    finally:
        detach(gemma3, runtime)


def test_gemma3_image_blocks_run_as_the_model_runs_them(gemma3, monkeypatch):
    inputs = gemma3.prepare(_images(2), "what color is the circle ? " * 3)
    dense = _logits(gemma3, inputs)
    sparse, indexed = _sparse_logits(gemma3, inputs)
    assert indexed == [False, True]  # sliding layer 0: the window cuts most rows (dense); global layer 1: sparse
    assert (sparse - dense).abs().max() < 1e-4
    ignored, _ = _sparse_logits(gemma3, inputs, ignore_mask=True, monkeypatch=monkeypatch)
    assert (ignored - dense).abs().max() > 1e-3


def test_paligemma_prefix_rows_run_under_the_models_mask(paligemma, monkeypatch):
    """With a long suffix the causal rows are the majority and run sparse; the prefix keeps its bidirectional rows."""
    prompt = paligemma.adapter.format_prompt(paligemma.processor, "what color is this ?", 1)
    suffix = " ".join(["red blue green the circle square"] * 6)
    inputs = paligemma.processor(text=[prompt], images=_images(1), suffix=[suffix], return_tensors="pt")
    inputs.pop("labels")
    assert 2 * int((inputs["token_type_ids"] == 0).sum()) < inputs["input_ids"].shape[1]
    dense = _logits(paligemma, inputs)
    sparse, indexed = _sparse_logits(paligemma, inputs)
    assert indexed == [True, True]
    assert (sparse - dense).abs().max() < 1e-4
    ignored, _ = _sparse_logits(paligemma, inputs, ignore_mask=True, monkeypatch=monkeypatch)
    assert (ignored - dense).abs().max() > 1e-3
    # a plain prompt is all prefix: every layer runs dense, exactly as the model
    plain = paligemma.prepare(_images(1), "what color is this ?")
    sparse, indexed = _sparse_logits(paligemma, plain)
    assert indexed == [False, False] and torch.equal(sparse, _logits(paligemma, plain))


def test_profile_says_where_the_mask_is_not_causal(gemma3):
    from vlsparse.search.api import profile_model
    from vlsparse.search.calibration import calibration_from

    lines: list[str] = []
    profile_model(gemma3, calibration_from(gemma3, None, samples=1, seq_len=128), progress=lines.append)
    notes = [line for line in lines if line.startswith("note: the model's mask is not causal")]
    assert len(notes) == 1 and "layers 1 (" in notes[0] and ", 2 (" in notes[0]  # window; image blocks


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("fixture", ["gemma3_dir", "paligemma_dir"])
def test_pruned_checkpoint_loads_alike_in_stock_transformers_and_vlsparse(fixture, request, tmp_path):
    from vlsparse.compress.api import PruneConfig, prune_model

    folder = request.getfixturevalue(fixture)
    result = prune_model(str(folder), tmp_path / "pruned",
                         PruneConfig(ratio=0.5, allocation="uniform", samples=2, ecoflap_samples=2, seq_len=16))
    assert abs(result.achieved - 0.5) <= 0.001
    assert {g["tower"] for g in result.groups} >= {"vision", "lm"}
    ours = load(result.out)
    stock = type(ours.model).from_pretrained(result.out).eval()
    q = stock.model.language_model.layers[0].self_attn.q_proj.weight
    assert 0.3 < float((q == 0).float().mean()) < 0.7
    inputs = ours.prepare(_images(2), "what color is this ?")
    with torch.inference_mode():
        pruned_logits = ours.model(**inputs).logits
        assert torch.equal(stock(**inputs).logits, pruned_logits)
    assert (pruned_logits - _logits(load(folder), inputs)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- token dropping


@pytest.fixture(scope="module")
def gemma3_sws(tmp_path_factory):
    """A 3-layer tiny Gemma 3: sliding, global, sliding (window 8)."""
    from tiny_families_gemma import tiny_gemma3

    return load(tiny_gemma3(tmp_path_factory.mktemp("gemma3-3"), layers=3))


def _oracle_logits(loaded, inputs, generated: torch.Tensor, after: int, keep: torch.Tensor,
                   generated_type: int = 0) -> torch.Tensor:
    """Logits of one cache-free forward over the prompt and ``generated`` tokens (``token_type_ids``
    ``generated_type``, as ``generate`` gives them) where the layers after ``after`` cannot see the dropped
    prompt tokens: the model's own mask (sliding window, image blocks, prefix) with those key columns taken out."""
    n = inputs["input_ids"].shape[1]
    total = n + generated.shape[1]
    dropped = torch.ones(total, dtype=torch.bool)
    dropped[keep] = False
    dropped[n:] = False
    blocked = dropped[None, :] & ~torch.eye(total, dtype=torch.bool)

    def hook(module, args, kwargs):
        kwargs["attention_mask"] = kwargs["attention_mask"] & ~blocked
        return args, kwargs

    longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], generated], 1),
                  attention_mask=torch.ones(1, total, dtype=torch.long),
                  token_type_ids=torch.nn.functional.pad(inputs["token_type_ids"], (0, generated.shape[1]),
                                                                value=generated_type))
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in loaded.adapter.lm_layers()[after + 1:]]
    try:
        with torch.inference_mode():
            return loaded.model(**longer, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()


def _capture_positions(loaded, layer: int, store: list):
    return loaded.adapter.lm_layers()[layer].register_forward_pre_hook(
        lambda m, args, kwargs: store.append([t.clone() for t in kwargs["position_embeddings"]]), with_kwargs=True)


def _drop_and_decode(loaded, inputs, steps: int, positions: list | None = None):
    """Core tokens dropped after layer 0: the prefill's output, the keep set, the image tokens kept and
    ``steps`` greedy tokens with their logits; ``positions`` receives layer 1's rotary tables at prefill."""
    runtime = attach_core(loaded, CoreSettings(token_layer=0, min_keep=0.25, max_keep=0.5, score="text"),
                          neurons=False)
    try:
        handle = _capture_positions(loaded, 1, positions if positions is not None else [])
        with torch.inference_mode():
            out = loaded.model(**inputs, use_cache=True)
        handle.remove()
        keep = runtime.keep.clone()
        kept = runtime.stats()["image_tokens_kept"]
        ids, logits = generate_with_logits(loaded, inputs, steps)
    finally:
        detach_core(loaded, runtime)
    return out, keep, kept, ids, logits


def test_gemma3_dropped_tokens_keep_positions_and_sliding_windows(gemma3_sws, monkeypatch):
    """Images last, so that at decode the sliding layer 2's window still reaches dropped image tokens."""
    loaded = gemma3_sws
    assert loaded.model.config.text_config.layer_types == ["sliding_attention", "full_attention",
                                                           "sliding_attention"]
    images = _images(4)
    for i, image in enumerate(images):
        image.putpixel((i, 3 * i % 16), (255, 0, 255))
    inputs = loaded.processor(text=["what color is the circle ? " + loaded.processor.boi_token * 4], images=images,
                              return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    spans = loaded.adapter.image_spans(inputs)
    n_image = sum(s.length for s in spans)
    assert n - spans[-1].end < loaded.model.config.text_config.sliding_window
    positions: list = []
    handle = _capture_positions(loaded, 1, positions)
    with torch.inference_mode():
        loaded.model(**inputs, use_cache=False)
    handle.remove()
    out, keep, kept, ids, logits = _drop_and_decode(loaded, inputs, 4, positions)
    assert n_image // 4 <= kept <= n_image // 2 < n_image and len(keep) == n - n_image + kept
    for full, short in zip(positions[0], positions[1]):  # survivors keep their rotary positions
        assert torch.equal(short, full.index_select(-2, keep))
    assert out.logits.shape[:2] == (1, len(keep))
    assert cache_layer_keys(cache_of_output(out), 1).shape[-2] == len(keep)

    oracle = _oracle_logits(loaded, inputs, ids[:, n:n + 3], 0, keep)
    assert (out.logits - oracle[:, keep]).abs().max() < 1e-4
    assert torch.equal(ids[0, n:], oracle[0, n - 1:].argmax(-1))
    assert (logits[:, 0] - oracle[0, n - 1:]).abs().max() < 1e-4
    # without the family's decode-time window, the sliding layer reaches dropped tokens' neighbours
    monkeypatch.setattr(type(loaded.adapter), "follow_token_drop", lambda self, drop: [])
    *_, unfollowed = _drop_and_decode(loaded, inputs, 4)
    assert (unfollowed[:, 0] - oracle[0, n - 1:]).abs().max() > 1e-3


def test_paligemma_dropped_tokens_keep_the_bidirectional_prefix(paligemma):
    images = _images(2)
    for i, image in enumerate(images):
        image.putpixel((i, 3 * i % 16), (255, 0, 255))
    inputs = paligemma.prepare(images, "what color is the circle ?")
    n = inputs["input_ids"].shape[1]
    out, keep, kept, ids, logits = _drop_and_decode(paligemma, inputs, 3)
    assert 0 < kept < sum(s.length for s in paligemma.adapter.image_spans(inputs))
    oracle = _oracle_logits(paligemma, inputs, ids[:, n:n + 2], 0, keep, generated_type=1)
    assert (out.logits - oracle[:, keep]).abs().max() < 1e-4
    assert torch.equal(ids[0, n:], oracle[0, n - 1:].argmax(-1))
    assert (logits[:, 0] - oracle[0, n - 1:]).abs().max() < 1e-4

