"""Qwen3-VL and InternVL on tiny random models.

Image spans against layouts computed by hand from the processors' rules; InternVL's tile
tokens as the pixel-shuffled patch grid in raster order; Qwen3-VL's DeepStack features
following the surviving image tokens when tokens are dropped (and a refusal when they
cannot); pruned checkpoints read back by stock ``from_pretrained``; the pruning loop
calibrating Qwen3-VL's layers on inputs that hold their DeepStack features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlsparse.compat import cache_of_output
from vlsparse.compress.api import PruneConfig, prune_model
from vlsparse.errors import InputError
from vlsparse.kernels.token_drop import BEFORE_LM, Drop, TokenDrop, attach_drop, detach_drop, span_mask
from vlsparse.models import load
from vlsparse.models.families.base import tokenizer_of

FAST = dict(samples=2, ecoflap_samples=2, seq_len=16)


@pytest.fixture(scope="module")
def qwen3_vl(qwen3_vl_dir):
    return load(qwen3_vl_dir)


@pytest.fixture(scope="module")
def internvl(internvl_dir):
    return load(internvl_dir)


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- spans and grids


def test_qwen3_vl_spans_are_the_merged_patch_grids_between_vision_markers(qwen3_vl):
    # sizes that are multiples of patch 4 x merge 2 and inside the processor's pixel bounds: kept as they are
    sizes = [(40, 24), (24, 48), (64, 32)]
    inputs = qwen3_vl.prepare([noise(w, h, i) for i, (w, h) in enumerate(sizes)], "what is this ?")
    ids = inputs["input_ids"][0]
    tokenizer = tokenizer_of(qwen3_vl.processor)
    start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    spans = qwen3_vl.adapter.image_spans(inputs)
    assert [(s.rows, s.cols) for s in spans] == [(h // 8, w // 8) for w, h in sizes]
    assert inputs["image_grid_thw"].tolist() == [[1, h // 4, w // 4] for w, h in sizes]
    for span in spans:
        assert span.length == span.rows * span.cols and span.grid_start == span.start and span.part == "image"
        assert ids[span.start - 1] == start_id and ids[span.end] == end_id
        assert bool((ids[span.start:span.end] == qwen3_vl.adapter.image_token_id).all())


def test_internvl_spans_are_one_tile_grid_or_one_span_per_tile_then_the_thumbnail(internvl):
    # tiles of 32 pixels, at most 4: the arrangement (cols x rows) closest to the image's aspect ratio,
    # plus a thumbnail when it has more than one tile
    sizes = [(32, 32), (40, 24), (24, 48), (100, 20)]
    arrangements = [1, 2 * 1, 1 * 2, 4 * 1]  # 1:1 -> 1x1; 5:3 -> 2x1; 1:2 -> 1x2; 5:1 -> 4x1
    tiles = [a + (a > 1) for a in arrangements]
    inputs = internvl.prepare([noise(w, h, i) for i, (w, h) in enumerate(sizes)], "what is this ?")
    assert inputs["pixel_values"].shape[0] == sum(tiles)
    ids = inputs["input_ids"][0]
    tokenizer = tokenizer_of(internvl.processor)
    start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>"))
    spans = internvl.adapter.image_spans(inputs)
    side = (32 // 4) // 2  # 8 x 8 patches per tile, pixel-shuffled by 0.5
    for image, count in enumerate(tiles):
        own = [s for s in spans if s.image_index == image]
        assert [s.part for s in own] == (["image"] if count == 1 else ["tile"] * (count - 1) + ["global"])
        assert all((s.rows, s.cols, s.length, s.grid_start) == (side, side, side * side, s.start) for s in own)
        assert all(a.end == b.start for a, b in zip(own, own[1:]))  # the tiles follow each other
        assert ids[own[0].start - 1] == start_id and ids[own[-1].end] == end_id
    image = span_mask(spans, len(ids))
    assert torch.equal(image, ids == internvl.adapter.image_token_id)


def test_internvl_sizes_as_height_width_pairs_are_read_and_checked(internvl_dir, tmp_path):
    import json

    from vlsparse.errors import ModelLoadError
    from vlsparse.models.source import check_config

    config = json.loads((internvl_dir / "config.json").read_text())
    assert config["vision_config"]["image_size"] == [32, 32]  # as InternVL configs write it
    check_config(config, internvl_dir / "config.json")
    config["vision_config"]["patch_size"] = [4, 0]
    with pytest.raises(ModelLoadError, match=r"vision_config.patch_size should be a \[height, width\] pair"):
        check_config(config, tmp_path / "config.json")


def test_internvl_tile_tokens_are_the_pixel_shuffled_patch_grid_in_raster_order(internvl):
    model, adapter = internvl.model, internvl.adapter
    inputs = internvl.prepare([noise(32, 32, 0)], "what is this ?")
    span = adapter.image_spans(inputs)[0]
    seen = []

    def patch_numbers(module, args, output):  # each patch's first channel: its number (1-based), row-major
        hidden = torch.zeros_like(output.last_hidden_state)
        hidden[:, 1:, 0] = torch.arange(1, hidden.shape[1], dtype=hidden.dtype)  # index 0 is [CLS]
        output.last_hidden_state = hidden
        return output

    handles = [adapter.vision_tower().register_forward_hook(patch_numbers),
               adapter.projector().register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = seen[0][0]  # [tokens of the tile, 4 x vision width]
    width = tokens.shape[-1] // 4
    patches = 32 // 4
    assert tokens.shape[0] == span.rows * span.cols
    for token in range(tokens.shape[0]):
        row, col = divmod(token, span.cols)  # the span's grid, raster order
        got = {int(v) for v in tokens[token, ::width]}
        block = {(2 * row + i) * patches + (2 * col + j) + 1 for i in (0, 1) for j in (0, 1)}
        assert got == block, token


# ----------------------------------------------------------------------------- DeepStack and dropped tokens


def deepstack_features(loaded, inputs) -> list[torch.Tensor]:
    """The model's own DeepStack features: one [visual tokens, D] per fed layer, in prompt order."""
    with torch.no_grad():
        out = loaded.model.get_image_features(pixel_values=inputs["pixel_values"],
                                              image_grid_thw=inputs["image_grid_thw"])
    return [torch.cat(list(per_image)) for per_image in out.deepstack_features]


def attach_keep(loaded, stage: int, keep: torch.Tensor, image: torch.Tensor) -> TokenDrop:
    """A dropper keeping ``keep`` (indices into the prompt) at ``stage``, on the next prompt."""
    adapter = loaded.adapter
    drop = TokenDrop(lambda layer, hidden: Drop(keep), (stage,))
    attach_drop(loaded.model, adapter.language_model(), adapter.lm_layers(), drop, adapter=adapter)
    drop.start_prompt(len(image), image)
    return drop


@pytest.mark.parametrize("stage", [BEFORE_LM, 0])
def test_deepstack_features_follow_the_surviving_image_tokens(qwen3_vl, stage):
    loaded, adapter = qwen3_vl, qwen3_vl.adapter
    inputs = loaded.prepare([noise(40, 24, 1), noise(24, 48, 2)], "what is this ?")
    n = inputs["input_ids"].shape[1]
    image = span_mask(adapter.image_spans(inputs), n)
    image_rows = image.nonzero().flatten()
    kept_image = image_rows[1::3]  # not a prefix: features taken in order of the survivors would be wrong
    keep = torch.cat([(~image).nonzero().flatten(), kept_image]).sort().values
    features = deepstack_features(loaded, inputs)
    assert adapter.deepstack_layers == len(features) == 2
    layers = adapter.lm_layers()

    def positions_into(store):
        def hook(module, args, kwargs):
            store.append([t.clone() for t in kwargs["position_embeddings"]])
        return hook

    def into(store, index):
        def hook(module, args, *rest):  # a forward hook (output last) or a pre-hook with kwargs
            hidden = rest[-1] if isinstance(rest[-1], torch.Tensor) else (args[0] if args else
                                                                           rest[-1]["hidden_states"])
            store.setdefault(index, hidden.clone())
        return hook

    with torch.no_grad():
        dense_positions: list = []
        handle = layers[2].register_forward_pre_hook(positions_into(dense_positions), with_kwargs=True)
        loaded.model(**inputs, use_cache=False)
        handle.remove()

        drop = attach_keep(loaded, stage, keep, image)
        raw, received, positions = {}, {}, []
        # raw outputs: hooks put before the DeepStack adder (and the drop hook); inputs: after the drop's hooks
        handles = [layers[i].register_forward_hook(into(raw, i), prepend=True) for i in (0, 1)]
        handles += [layers[i].register_forward_pre_hook(into(received, i), with_kwargs=True) for i in (1, 2)]
        handles.append(layers[2].register_forward_pre_hook(positions_into(positions), with_kwargs=True))
        try:
            out = loaded.model(**inputs, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
            detach_drop(loaded.model, drop)

    assert out.logits.shape[1] == len(keep) and drop.keep.tolist() == keep.tolist()
    assert raw[0].shape[1] == (n if stage == 0 else len(keep))  # layer 0 ran on every token, or the survivors
    ordinal = torch.cumsum(image.long(), 0) - 1
    visual = image[keep]
    for layer in (0, 1):
        # what layer + 1 received minus what layer output (of the survivors): the DeepStack addition
        output = raw[layer] if raw[layer].shape[1] == len(keep) else raw[layer].index_select(1, keep)
        added = (received[layer + 1] - output)[0]
        expected = torch.zeros_like(added)
        expected[visual] = features[layer][ordinal[keep][visual]]  # each survivor: its own feature
        assert torch.allclose(added, expected, atol=1e-5), layer
        # the check would catch misaligned features: the first ones, in the survivors' order, differ
        misaligned = torch.zeros_like(added)
        misaligned[visual] = features[layer][: int(visual.sum())]
        assert not torch.allclose(misaligned, expected, atol=1e-3)
    # survivors keep their multimodal rotary positions
    for full, short in zip(dense_positions[0], positions[0]):
        assert torch.equal(short, full.index_select(-2, keep))
    assert cache_of_output(out) is not None


def test_keeping_every_token_through_the_deepstack_takeover_equals_the_model(qwen3_vl):
    inputs = qwen3_vl.prepare([noise(40, 24, 3)], "what is this ?")
    n = inputs["input_ids"].shape[1]
    image = span_mask(qwen3_vl.adapter.image_spans(inputs), n)
    with torch.no_grad():
        dense = qwen3_vl.model(**inputs).logits
        drop = attach_keep(qwen3_vl, 0, torch.arange(n), image)
        try:
            taken_over = qwen3_vl.model(**inputs).logits
        finally:
            detach_drop(qwen3_vl.model, drop)
    assert torch.equal(taken_over, dense)


def test_deepstack_features_that_do_not_match_the_dropped_prompt_are_refused(qwen3_vl):
    inputs = qwen3_vl.prepare([noise(40, 24, 4)], "what is this ?")
    n = inputs["input_ids"].shape[1]
    image = span_mask(qwen3_vl.adapter.image_spans(inputs), n + 1)  # a prompt one token longer than the call
    drop = attach_keep(qwen3_vl, 0, torch.arange(n), torch.cat([image, torch.zeros(1, dtype=torch.bool)]))
    try:
        with pytest.raises(InputError, match="DeepStack features cover") as info, torch.no_grad():
            qwen3_vl.model(**inputs)
        assert "without dropping image tokens" in info.value.hint
    finally:
        detach_drop(qwen3_vl.model, drop)


# ----------------------------------------------------------------------------- pruning


def checkpoint(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("key,structure,towers", [
    ("qwen3_vl", "unstructured", ("model.visual.blocks.", "model.visual.merger.", "model.language_model.")),
    ("internvl", "2:4", ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.")),
])
def test_pruned_checkpoint_loads_with_stock_from_pretrained_as_the_masked_model(vlm_dirs, tmp_path, key, structure,
                                                                                  towers):
    folder = vlm_dirs[key]
    config = PruneConfig(ratio=0.5, allocation="uniform", structure=structure, **FAST)
    result = prune_model(str(folder), tmp_path / "pruned", config)
    assert checkpoint(folder).keys() == checkpoint(result.out).keys()  # the checkpoint's own key layout
    loaded = load(folder)
    stock = type(loaded.model).from_pretrained(result.out).eval()
    dense, pruned = dict(loaded.model.named_parameters()), dict(stock.named_parameters())
    zeroed = [name for name in dense if not torch.equal(dense[name], pruned[name])]
    assert all(any(name.startswith(t) for name in zeroed) for t in towers)
    assert not any("deepstack" in name or "embed" in name or "norm" in name for name in zeroed)
    with torch.no_grad():
        for name in zeroed:
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], dense[name][kept])  # survivors untouched
            if structure == "2:4":
                assert bool(((kept.reshape(kept.shape[0], -1, 4)).sum(-1) <= 2).all()), name
            dense[name].mul_(kept)
        inputs = loaded.prepare([noise(40, 24, 5)], "what is this ?")
        assert torch.equal(stock(**inputs).logits, loaded.model(**inputs).logits)
    assert result.achieved == pytest.approx(0.5, abs=1e-3)


def test_pruning_calibrates_deepstack_layers_on_inputs_holding_their_features(qwen3_vl_dir, tmp_path):
    """Layer 1's masks equal Wanda on what layer 1 receives in the pruned model's own forward:
    pruned layer 0's output plus the DeepStack features the stack adds after it."""
    from vlsparse.compress.calibration import build_calibration
    from vlsparse.compress.wanda import update_sq_norm, wanda_mask

    result = prune_model(str(qwen3_vl_dir), tmp_path / "pruned", PruneConfig(ratio=0.5, allocation="uniform", **FAST))
    loaded = load(qwen3_vl_dir)
    dense_layer = loaded.adapter.lm_layers()[1]
    pruned = type(loaded.model).from_pretrained(result.out).eval()
    layer = pruned.model.language_model.layers[1]
    layer.load_state_dict(dense_layer.state_dict())  # layer 1 dense while its inputs are measured
    stats = [None, 0]

    def hook(module, args):
        stats[0], stats[1] = update_sq_norm(stats[0], stats[1], args[0])

    handle = layer.self_attn.q_proj.register_forward_pre_hook(hook)
    calib = build_calibration(loaded.adapter, loaded.processor, None, FAST["samples"], FAST["seq_len"], 0)
    with torch.no_grad():
        for batch in calib.batches:
            pruned(**batch, use_cache=False)
    handle.remove()
    weight = dense_layer.self_attn.q_proj.weight
    expected = wanda_mask(weight, stats[0], prune=weight.numel() // 2)
    got = checkpoint(result.out)["model.language_model.layers.1.self_attn.q_proj.weight"] != 0
    assert torch.equal(got, expected)
