"""The token-reduction runtime (kernels/token_runtime.py, kernels/token_drop.py) on tiny 4-layer LLaVA and Qwen2-VL
(and Qwen3-VL, whose DeepStack features must follow the survivors; the dropped-token oracle also on InternVL,
Idefics3, SmolVLM, LLaVA-NeXT and LLaVA-OneVision).

Survivors keep their rotary positions, multi-stage drops keep nested subsets, prefill and
decoding equal a dense model whose layers cannot see the dropped tokens, every method
attaches, generates and detaches (dense again), and VisionZip reads the real [CLS] attention.
"""

from __future__ import annotations

import pytest
import torch

from vlsparse.compat import attn_implementation, cache_layer_keys, cache_length, cache_of_call, cache_of_output
from vlsparse.errors import InputError
from vlsparse.kernels.token_runtime import attach_tokens, detach_tokens
from vlsparse.models import load
from vlsparse.profile.tokens import resolve_settings
from vlsparse.tokens import METHOD_NAMES
from prompts import generate_with_logits, textured_inputs

# parameters that fit a 4-layer LM (ToDRE's default relevance layer, 7L/8 = 3, is the last one)
FIT = {"fastv": {"k": 1}, "zipvl": {"k": 1}, "todre": {"layers": [1]}}


class _Loaded(dict):
    """Models loaded on first use: a test of one family builds and loads only that family's model."""

    def __init__(self, request, fixtures: dict[str, str]):
        super().__init__()
        self.request, self.fixtures = request, fixtures

    def __missing__(self, key):
        self[key] = load(self.request.getfixturevalue(self.fixtures[key]))
        return self[key]


@pytest.fixture(scope="module")
def models(request):
    return _Loaded(request, {"llava": "llava4_dir", "qwen2_vl": "qwen2_vl4_dir", "qwen3_vl": "qwen3_vl_dir",
                             "internvl": "internvl_dir", "idefics3": "idefics3_dir", "smolvlm": "smolvlm_dir",
                             "llava_next": "llava_next_dir", "llava_onevision": "llava_onevision_dir"})


def _inputs(loaded, n_images=4):
    return textured_inputs(loaded, n_images, second_pixel=True)


def _generate(loaded, inputs, n=4):
    return generate_with_logits(loaded, inputs, n)


def _settings(loaded, method, keep=0.5, **params):
    return resolve_settings(method, keep, loaded.adapter.num_layers, {**FIT.get(method, {}), **params})


def _image_mask(loaded, inputs):
    n = inputs["input_ids"].shape[1]
    mask = torch.zeros(n, dtype=torch.bool)
    for span in loaded.adapter.image_spans(inputs):
        mask[span.start:span.end] = True
    return mask


def _capture_positions(loaded, store: dict):
    handles = []
    for index, layer in enumerate(loaded.adapter.lm_layers()):
        def hook(module, args, kwargs, index=index):
            store.setdefault(index, [t.clone() for t in kwargs["position_embeddings"]])
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _oracle_hooks(loaded, layer_keep: dict[int, torch.Tensor], prompt_len: int):
    """Dense model whose layer l cannot see the prompt tokens outside ``layer_keep[l]`` (additive 4-D masks)."""

    def make(keep, first):
        dropped = torch.ones(prompt_len, dtype=torch.bool)
        dropped[keep] = False

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            q = hidden.shape[1]
            past = cache_of_call(kwargs)
            # layers after 0 run when layer 0 already holds this step's tokens
            k = q if past is None else cache_length(past, 0) + (q if first else 0)
            q_pos = torch.arange(k - q, k)[:, None]
            k_pos = torch.arange(k)[None, :]
            blocked = torch.nn.functional.pad(dropped, (0, k - prompt_len))[None, :] & (k_pos != q_pos)
            allowed = (k_pos <= q_pos) & ~blocked
            kwargs["attention_mask"] = torch.zeros(1, 1, q, k, dtype=hidden.dtype).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min)
            return args, kwargs

        return hook

    layers = loaded.adapter.lm_layers()
    return [layers[i].register_forward_pre_hook(make(keep, i == 0), with_kwargs=True) for i, keep in layer_keep.items()]


CASES = [("fastv", "llava"), ("pyramiddrop", "llava"), ("divprune", "llava"), ("fastv", "qwen2_vl"),
         ("pyramiddrop", "qwen2_vl"), ("divprune", "qwen2_vl"), ("fastv", "qwen3_vl"), ("pyramiddrop", "qwen3_vl"),
         ("divprune", "qwen3_vl"), *[(method, key) for key in ("internvl", "idefics3", "smolvlm", "llava_next",
                                                               "llava_onevision") for method in ("fastv", "divprune")]]
"""Qwen3-VL: its DeepStack features (layers 0 and 1) must follow the survivors for the oracle to match.
The other families have 2 LM layers (FastV drops after layer 0) and several spans per image: Idefics3/SmolVLM's
tiles and global image, LLaVA-NeXT/OneVision's base image and newline-ended any-res rows (InternVL's 16-pixel
test images take one tile each)."""


@pytest.mark.parametrize("method,key", CASES)
def test_dropped_tokens_keep_positions_and_match_a_dense_model_that_cannot_see_them(models, method, key):
    loaded = models[key]
    inputs = _inputs(loaded)
    n = inputs["input_ids"].shape[1]
    image = _image_mask(loaded, inputs)
    dense_pe: dict = {}
    handles = _capture_positions(loaded, dense_pe)
    with torch.inference_mode():
        loaded.model(**inputs, use_cache=False)
    for h in handles:
        h.remove()

    runtime = attach_tokens(loaded, _settings(loaded, method))
    sparse_pe: dict = {}
    handles = _capture_positions(loaded, sparse_pe)
    with torch.inference_mode():
        out = loaded.model(**inputs, use_cache=True)
    for h in handles:
        h.remove()
    layer_keep = {layer: keep.clone() for layer, keep in runtime.drop.layer_keep.items()}
    final = runtime.drop.keep.clone()
    st = runtime.stats()
    assert st["image_tokens_total"] == int(image.sum())
    assert 0 < st["image_tokens_kept"] < st["image_tokens_total"]
    assert int(image[final].sum()) == st["image_tokens_kept"]
    assert set((~image).nonzero().flatten().tolist()) <= set(final.tolist())  # every text token survives
    first = min(layer_keep)
    assert first == (0 if method == "divprune" else runtime.stages[0].drop_after + 1)
    assert set(layer_keep) == set(range(first, loaded.adapter.num_layers))
    for layer, keep in layer_keep.items():  # survivors reach every later layer with their original positions
        for full, short in zip(dense_pe[layer], sparse_pe[layer]):
            assert short.shape[-2] == len(keep) < n
            assert torch.equal(short, full.index_select(-2, keep))
    for layer in range(first):
        assert all(torch.equal(a, b) for a, b in zip(dense_pe[layer], sparse_pe[layer]))
    cache = cache_of_output(out)
    for layer in range(loaded.adapter.num_layers):  # each layer's KV cache holds only its survivors
        assert cache_layer_keys(cache, layer).shape[-2] == len(layer_keep.get(layer, range(n)))
    assert out.logits.shape[:2] == (1, len(final))
    ids, logits = _generate(loaded, inputs, n=4)
    assert [r["kept"] for r in runtime.stats()["stages"]] == [r["kept"] for r in st["stages"]]  # same choice
    detach_tokens(loaded, runtime)

    handles = _oracle_hooks(loaded, layer_keep, n)
    with torch.inference_mode():
        oracle = loaded.model(**inputs, use_cache=False).logits
    oracle_ids, oracle_logits = _generate(loaded, inputs, n=4)
    for h in handles:
        h.remove()
    assert (out.logits - oracle.index_select(1, final)).abs().max() < 1e-4
    assert torch.equal(ids, oracle_ids)
    assert (logits - oracle_logits).abs().max() < 1e-4


@pytest.mark.parametrize("key", ["llava", "qwen2_vl"])
def test_pyramiddrop_stages_keep_nested_subsets_of_the_original_count(models, key):
    loaded = models[key]
    inputs = _inputs(loaded)
    image = _image_mask(loaded, inputs)
    total = int(image.sum())
    runtime = attach_tokens(loaded, _settings(loaded, "pyramiddrop", keep=0.5))
    try:
        with torch.inference_mode():
            out = loaded.model(**inputs, use_cache=True)
        stages = runtime.stats()["stages"]
        keeps = runtime.drop.layer_keep
    finally:
        detach_tokens(loaded, runtime)
    # PyramidDrop scores with the next layer's attention: here with layer L+1's own, cutting after it (documented)
    assert [s["layer"] for s in stages] == [0, 1] and [s["drop_after"] for s in stages] == [1, 2]
    assert [s["kept"] for s in stages] == [total // 2, total // 4]  # floor(n * lambda^s) of the ORIGINAL count
    assert [s["total"] for s in stages] == [total, total // 2]
    schedule = runtime.stats()["schedule"]
    assert [s["drop_after"] for s in schedule] == [1, 2, None]  # the third would cut after the last layer
    assert "skipped" in runtime.stats()["note"]
    assert set(keeps) == {2, 3}
    assert set(keeps[3].tolist()) < set(keeps[2].tolist())  # nested, in full-prompt indices
    assert int(image[keeps[2]].sum()) == total // 2 and int(image[keeps[3]].sum()) == total // 4
    assert out.logits.shape[1] == len(keeps[3])
    cache = cache_of_output(out)
    assert [cache_layer_keys(cache, i).shape[-2] for i in range(4)] == [len(image), len(image), len(keeps[2]),
                                                                        len(keeps[3])]


@pytest.mark.parametrize("key", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_attaches_generates_and_detaches_to_dense(models, key, method):
    loaded = models[key]
    inputs = _inputs(loaded)
    before = attn_implementation(loaded.model)
    dense_ids, dense_logits = _generate(loaded, inputs)
    if method == "visionzip" and key == "qwen2_vl":
        with pytest.raises(InputError, match=r"\[CLS\]"):  # Qwen2-VL's ViT has no [CLS] token: refused, not faked
            attach_tokens(loaded, _settings(loaded, method))
        assert attn_implementation(loaded.model) == before
        return
    runtime = attach_tokens(loaded, _settings(loaded, method))
    ids, _ = _generate(loaded, inputs)
    st = runtime.stats()
    detach_tokens(loaded, runtime)
    assert ids.shape == dense_ids.shape
    assert st["method"] == method and len(st["stages"]) == sum(s["drop_after"] is not None for s in st["schedule"])
    assert st["image_tokens_total"] == (64 if key == "llava" else 16)
    if method not in ("zipvl", "todre"):  # adaptive rules may keep everything on a random tiny model
        assert st["image_tokens_kept"] < st["image_tokens_total"]
    assert "image tokens kept" in runtime.describe()
    assert attn_implementation(loaded.model) == before
    ids, logits = _generate(loaded, inputs)
    assert torch.equal(ids, dense_ids) and (logits - dense_logits).abs().max() < 1e-6


def _layer0_input(loaded, store: dict):
    def hook(module, args, kwargs):
        store.setdefault("x", (args[0] if args else kwargs["hidden_states"])[0].clone())

    return loaded.adapter.lm_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_visionzip_ranks_by_the_towers_real_cls_attention_and_writes_merged_tokens(models, llava4_dir):
    loaded = models["llava"]
    inputs = _inputs(loaded, n_images=2)
    image = _image_mask(loaded, inputs)
    eager = load(llava4_dir, attn_implementation="eager")  # the reference: the tower's own attention weights
    with torch.inference_mode():
        tower = eager.adapter.vision_tower()(inputs["pixel_values"], output_attentions=True)
    cls = tower.attentions[-1][:, :, 0, 1:].sum(dim=1)  # feature layer -1: the last layer's [CLS] row, heads summed
    dense: dict = {}
    handle = _layer0_input(loaded, dense)
    with torch.inference_mode():
        loaded.model(**inputs)
    handle.remove()
    runtime = attach_tokens(loaded, _settings(loaded, "visionzip", keep=0.5, contextual_share=0.25))
    seen: dict = {}
    per_token = runtime.vision.per_token
    runtime.vision.per_token = lambda n: seen.setdefault("v", per_token(n))
    short: dict = {}
    handle = _layer0_input(loaded, short)  # registered after the runtime's hook: sees the survivors
    try:
        with torch.inference_mode():
            loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
        detach_tokens(loaded, runtime)
    attention, _ = seen["v"]
    assert torch.allclose(attention, cls.flatten(), atol=1e-5)  # read through the registry, not made up
    keep = runtime.drop.keep
    assert int(image[keep].sum()) == runtime.stats()["image_tokens_kept"] == 16  # 50% of 2 x 16
    image_positions = image.nonzero().flatten()
    dominant = set()
    for i in range(2):  # per image: budget 8 = 6 dominant (the [CLS]'s favourites) + 2 contextual means
        members = image_positions[16 * i:16 * (i + 1)]
        dominant |= set(members[torch.topk(cls[i], 6).indices].tolist())
    assert dominant <= set(keep.tolist())
    slots = set(keep.tolist()) & set(image_positions.tolist()) - dominant
    assert len(slots) == 4
    changed = (short["x"] - dense["x"][keep]).abs().amax(dim=-1) > 1e-6
    assert set(keep[changed].tolist()) <= slots and changed.any()  # merged means at their slots, nothing else
    unchanged = [i for i, pos in enumerate(keep.tolist()) if pos not in slots]
    assert torch.equal(short["x"][unchanged], dense["x"][keep[unchanged]])


def test_decode_positions_without_position_ids_after_a_before_lm_drop(models):
    loaded = models["qwen2_vl"]
    inputs = _inputs(loaded)
    runtime = attach_tokens(loaded, _settings(loaded, "divprune", keep=0.25))
    try:
        ids, logits = _generate(loaded, inputs, n=3)
        with torch.inference_mode():  # a hand-written loop: no position_ids after the prefill
            out = loaded.model(**inputs, use_cache=True)
            cache, manual = cache_of_output(out), [out.logits[:, -1].float()]
            for step in range(2):
                nxt = manual[-1].argmax(-1, keepdim=True)
                out = loaded.model(input_ids=nxt, cache=cache, use_cache=True)
                manual.append(out.logits[:, -1].float())
    finally:
        detach_tokens(loaded, runtime)
    assert (torch.stack(manual) - logits).abs().max() < 1e-4


def test_one_dropper_per_model_and_text_models_refused(models, llama_dir):
    from vlsparse.kernels.core_runtime import attach_core, detach_core
    from vlsparse.profile.core import CoreSettings

    loaded = models["llava"]
    core = attach_core(loaded, CoreSettings(token_layer=0), neurons=False)
    try:
        with pytest.raises(InputError, match="already dropped"):
            attach_tokens(loaded, _settings(loaded, "fastv"))
    finally:
        detach_core(loaded, core)
    runtime = attach_tokens(loaded, _settings(loaded, "fastv"))
    detach_tokens(loaded, runtime)
    text = load(llama_dir)
    with pytest.raises(InputError, match="vision-language"):
        attach_tokens(text, resolve_settings("fastv", 0.5, 2, {"k": 1}))


def test_sparse_runtime_sees_the_survivors_image_spans(models):
    from vlsparse.kernels.runtime import attach, detach
    from vlsparse.profile import AttentionProfile, HeadProfile, Profile

    loaded = models["llava"]
    inputs = _inputs(loaded)
    heads = [[HeadProfile("dense") for _ in range(4)] for _ in range(4)]
    sparse = attach(loaded, Profile(model=loaded.adapter.fingerprint(), attention=AttentionProfile(layers=heads)))
    runtime = attach_tokens(loaded, _settings(loaded, "fastv", keep=0.25), sparse_runtime=sparse)
    try:
        with torch.inference_mode():
            loaded.model(**inputs)
        image = _image_mask(loaded, inputs)[runtime.drop.keep]
        assert sum(e - s for s, e in sparse.spans) == int(image.sum()) == 16
        assert all(bool(image[s:e].all()) for s, e in sparse.spans)
    finally:
        detach_tokens(loaded, runtime)
        detach(loaded, sparse)
    assert attn_implementation(loaded.model) == "sdpa"


@pytest.mark.parametrize("method", ["pyramiddrop", "divprune"])
def test_a_padded_prompt_decodes_with_mask_columns_gathered_per_layer(models, method):
    """Left padding keeps a 4-D mask in every decode step: its key columns must follow each layer's keep set."""
    loaded = models["llava"]
    inputs = dict(_inputs(loaded))
    pad = 3
    inputs["input_ids"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["attention_mask"]], dim=1)
    n = inputs["input_ids"].shape[1]
    runtime = attach_tokens(loaded, _settings(loaded, method))
    masks: list = []
    layer = loaded.adapter.lm_layers()[-1]
    handle = layer.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        ids, logits = _generate(loaded, inputs, n=3)
    finally:
        handle.remove()
        detach_tokens(loaded, runtime)
    layer_keep = {i: keep.clone() for i, keep in runtime.drop.layer_keep.items()}
    assert all(m is not None and m.dim() == 4 for m in masks)  # the padding mask reaches every step
    assert masks[1].shape[-1] == len(layer_keep[loaded.adapter.num_layers - 1]) + 1  # decode: gathered columns
    keep_padding_hidden = {i: keep[keep >= pad] for i, keep in layer_keep.items()}  # the oracle blocks pads itself
    handles = _oracle_hooks(loaded, keep_padding_hidden, n)
    try:
        oracle_ids, oracle_logits = _generate(loaded, inputs, n=3)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ids, oracle_ids)
    assert (logits - oracle_logits).abs().max() < 1e-4
