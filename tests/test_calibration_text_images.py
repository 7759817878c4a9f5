"""pydoc+images: real English with images, the default calibration of a vision-language model whose tokenizer
reads English (vlsparse.calibration, search and prune alike)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from vlsparse.calibration import IMAGE_COUNTS, IMAGE_SIDES, TEXT_AND_IMAGES, parse_calib, read_calib
from vlsparse.errors import InputError
from vlsparse.models.processors import reads_english


def test_default_follows_the_tokenizer(llava):
    assert not reads_english(llava.processor)  # the tiny word-level vocabulary, like the demo model's
    assert parse_calib(None, vlm=True, default_tasks=("vqa",)).kind == "demo"
    assert parse_calib(None, vlm=True, default_tasks=("vqa",), real_text=True).name == TEXT_AND_IMAGES
    assert parse_calib(TEXT_AND_IMAGES, vlm=True, default_tasks=()).kind == "mixed"
    with pytest.raises(InputError, match="needs a vision-language model"):
        parse_calib(TEXT_AND_IMAGES, vlm=False, default_tasks=())


def test_a_byte_level_tokenizer_reads_english():
    from transformers import PreTrainedTokenizerFast

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    byte_level.decoder = decoders.ByteLevel()
    byte_level.add_tokens([chr(c) for c in range(256)])  # every byte: no word is unknown
    assert reads_english(PreTrainedTokenizerFast(tokenizer_object=byte_level))


def test_items_hold_real_text_and_images_of_every_size():
    from vlsparse.perplexity import pydoc_text

    items = read_calib(parse_calib(TEXT_AND_IMAGES, vlm=True, default_tasks=()), samples=9, seed=0).items
    sizes = {(len(item.images), item.images[0].size[0]) for item in items}
    assert sizes == {(c, s) for c in IMAGE_COUNTS for s in IMAGE_SIDES}  # every count at every size
    calib_text = pydoc_text("calib")
    for item in items:
        assert len(item.prompt) >= 2400 and item.prompt.split("\n\n")[0] in calib_text and item.answer
        assert item.prompt.split("\n\n")[0] not in pydoc_text("heldout")  # never the held-out text
    again = read_calib(parse_calib(TEXT_AND_IMAGES, vlm=True, default_tasks=()), samples=9, seed=0).items
    assert [i.prompt for i in again] == [i.prompt for i in items]  # seeded


def test_search_sizes_samples_and_profile_records_the_source(llava):
    from vlsparse.search.calibration import calibration_from, prepare_sample

    calibration = calibration_from(llava, TEXT_AND_IMAGES, samples=3, seq_len=256)
    assert calibration.source == TEXT_AND_IMAGES
    lengths = [prepare_sample(llava, s)["input_ids"].shape[1] for s in calibration.samples]
    assert all(200 <= n <= 300 for n in lengths)  # images, then text up to about seq_len


def test_prune_takes_it(llava):
    from vlsparse.compress.calibration import build_calibration

    batches = build_calibration(llava.adapter, llava.processor, TEXT_AND_IMAGES, samples=3, seq_len=256, seed=0)
    assert batches.source == TEXT_AND_IMAGES and len(batches.batches) == 3
    image_id = llava.adapter.image_token_id
    for batch in batches.batches:
        labels = batch["labels"][0]
        assert (labels[batch["input_ids"][0] == image_id] == -100).all() and (labels != -100).sum() > 100
