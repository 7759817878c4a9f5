"""The tiling families on tiny models: Idefics3/SmolVLM tiles, LLaVA-NeXT/OneVision any-res, Mllama cross-attention.

Spans are checked against layouts computed by hand from the test images' sizes; pruning
against stock ``from_pretrained``; Mllama's refusals against their one-line errors.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlsparse.compress.api import PruneConfig, prune_model
from vlsparse.errors import InputError
from vlsparse.models import load

IMAGES = ((40, 24), (24, 48))  # (width, height) of the two test images


def _prepare(loaded):
    return loaded.prepare([Image.new("RGB", IMAGES[0], "red"), Image.new("RGB", IMAGES[1], "blue")],
                          "what color is this ?")


@pytest.mark.parametrize("fixture", ["idefics3_dir", "smolvlm_dir"])
def test_idefics3_spans_are_the_tiles_then_the_global_image(fixture, request):
    loaded = load(request.getfixturevalue(fixture))
    inputs = _prepare(loaded)
    ids = inputs["input_ids"][0]
    tok = loaded.processor.tokenizer
    # by hand: 40x24 -> longest edge 32 -> 32x32 after rounding to 16: 2 x 2 tiles; 24x48 -> 16x32: 2 rows x 1 col
    markers = [["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "<global-img>"],
               ["<row_1_col_1>", "<row_2_col_1>", "<global-img>"]]
    expected = []
    for image, names in enumerate(markers):
        for name in names:
            marker = tok.convert_tokens_to_ids(name)
            position = (ids == marker).nonzero().flatten().tolist()[image] + 1  # each marker once per image
            expected.append((image, position, position + 4, "global" if name == "<global-img>" else "tile"))
    spans = loaded.adapter.image_spans(inputs)
    assert [(s.image_index, s.start, s.end, s.part) for s in spans] == expected
    assert all((s.rows, s.cols, s.grid_start) == (2, 2, s.start) for s in spans)  # 16/4 patches, pixel shuffle 2
    assert all(bool((ids[s.start:s.end] == loaded.adapter.image_token_id).all()) for s in spans)


def test_an_unsplit_idefics3_image_is_one_image_span(idefics3_dir):
    loaded = load(idefics3_dir)
    loaded.processor.image_processor.do_image_splitting = False
    inputs = loaded.prepare([Image.new("RGB", (40, 24), "red")], "what is this ?")
    spans = loaded.adapter.image_spans(inputs)
    assert [(s.image_index, s.length, s.part) for s in spans] == [(0, 4, "image")]


@pytest.mark.parametrize("fixture, anyres", [("llava_next_dir", [(4, 8), (8, 4)]),
                                             ("llava_onevision_dir", [(2, 5), (5, 2)])])
def test_anyres_spans_are_the_base_grid_then_the_stitched_tiles(fixture, anyres, request):
    # by hand, 16-pixel crops of 4x4 tokens: 40x24 fits the 32x32 pinpoint best (2x2 crops, 8x8 tokens), cropped
    # back to its aspect ratio: 4 rows of 8; 24x48 fits 32x16 (2x1 crops, 8 rows of 4), nothing to crop.
    # OneVision's anyres_max_1 shrinks both by sqrt(32 / 16): int(4 // 1.41) = 2, int(8 // 1.41) = 5.
    loaded = load(request.getfixturevalue(fixture))
    inputs = _prepare(loaded)
    ids = inputs["input_ids"][0]
    start = int((ids == loaded.adapter.image_token_id).nonzero()[0])
    expected = []
    for image, (rows, cols) in enumerate(anyres):
        expected.append((image, start, start + 16, 4, 4, "base"))
        start += 16
        expected.append((image, start, start + rows * (cols + 1), rows, cols + 1, "anyres"))
        start += rows * (cols + 1)
    spans = loaded.adapter.image_spans(inputs)
    assert [(s.image_index, s.start, s.end, s.rows, s.cols, s.part) for s in spans] == expected
    assert int((ids == loaded.adapter.image_token_id).sum()) == start - expected[0][1]
    without_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    assert [(s.rows, s.cols) for s in loaded.adapter.image_spans(without_sizes)] == [(0, 0)]  # one run, no grid


def test_onevision_processor_loads_without_torchvision_or_says_so(llava_onevision_dir):
    loaded = load(llava_onevision_dir)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert type(loaded.processor).__name__ == "ImageOnlyLlavaOnevisionProcessor"
    assert loaded.processor.vision_aspect_ratio == "anyres_max_1"


def test_mllama_has_no_image_spans_and_refuses_token_methods(mllama_dir):
    from vlsparse.kernels.token_runtime import attach_tokens
    from vlsparse.profile.tokens import resolve_settings

    loaded = load(mllama_dir)
    inputs = _prepare(loaded)
    assert loaded.adapter.image_spans(inputs) == [] and not loaded.adapter.image_tokens
    assert loaded.adapter.cross_attention_layers() == [1, 3]
    with pytest.raises(InputError, match="cross-attention") as info:
        attach_tokens(loaded, resolve_settings("fastv", 0.5, loaded.adapter.num_layers, None))
    assert "\n" not in str(info.value)


def test_mllama_demo_calibration_gives_a_few_images_not_one_per_wanted_token(mllama_dir, llava_next_dir):
    """An image adds one marker token to an Mllama prompt: filling --seq-len with images would ask for thousands."""
    from vlsparse.search.calibration import CROSS_ATTENTION_IMAGES, calibration_from, demo_images

    loaded = load(mllama_dir)
    assert demo_images(loaded, 4096) == demo_images(loaded, 128) == CROSS_ATTENTION_IMAGES == 4
    assert all(len(s.images) == 4 for s in calibration_from(loaded, samples=2, seq_len=4096).samples)
    llava_next = load(llava_next_dir)
    assert demo_images(llava_next, 4096) > 4 * demo_images(llava_next, 128)  # image tokens fill the length


FAST = dict(samples=2, ecoflap_samples=2, allocation="uniform")


@pytest.mark.parametrize("fixture, auto", [("idefics3_dir", "Idefics3ForConditionalGeneration"),
                                           ("mllama_dir", "MllamaForConditionalGeneration"),
                                           ("llava_next_dir", "LlavaNextForConditionalGeneration")])
def test_pruned_checkpoint_loads_with_stock_from_pretrained(fixture, auto, request, tmp_path):
    import transformers

    folder = request.getfixturevalue(fixture)
    result = prune_model(str(folder), tmp_path / "out", PruneConfig(ratio=0.5, **FAST))
    loaded = load(result.out)
    stock = getattr(transformers, auto).from_pretrained(result.out).eval()
    inputs = _prepare(loaded)
    with torch.inference_mode():
        assert torch.equal(loaded.model(**inputs).logits, stock(**inputs).logits)
        dense = load(folder).model(**inputs).logits
    assert not torch.equal(dense, stock(**inputs).logits)
    if auto.startswith("Mllama"):  # the cross-attention projections were pruned too
        weights = {k: v for f in result.out.glob("*.safetensors") for k, v in load_file(f).items()}
        cross = [v for k, v in weights.items() if ".cross_attn." in k and k.endswith("proj.weight")]
        assert len(cross) == 8 and all(abs(float((w == 0).float().mean()) - 0.5) < 0.01 for w in cross)
