"""Tiny random Qwen3-VL and InternVL models, built and saved in the test (no network).

Like ``tiny_models``: plain transformers classes, saved with ``save_pretrained`` (model,
tokenizer, PIL image processor) so the loader reads folders it did not write itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import _qwen_ids, _qwen_tokenizer, _text_config, word_tokenizer
from vlsparse.compat import pil_image_processor_class

INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "video_token": "<video>"}
"""The tokenizer attributes ``InternVLProcessor`` reads, and their tokens."""


def tiny_qwen3_vl(tmp_path: Path, seed: int = 0, layers: int = 4, deepstack: tuple[int, ...] = (0, 1)) -> Path:
    """Qwen3-VL: interleaved multimodal RoPE (sections 2,3,3 of head dim 16), patch 4, merge 2, and DeepStack:
    the vision blocks ``deepstack`` feed their merged features to the first ``len(deepstack)`` LM layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    text = _text_config(len(tok), num_hidden_layers=layers, head_dim=16,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=64, deepstack_visual_indexes=list(deepstack)),
        **_qwen_ids(tok),
    )
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    improc = pil_image_processor_class("Qwen2VL")(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4,
                                                  merge_size=2, temporal_patch_size=2)
    out = Path(tmp_path) / f"tiny-qwen3-vl-{layers}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    return out


def internvl_tokenizer():
    """A word-level tokenizer with InternVL's image tokens as named special tokens."""
    from transformers import PreTrainedTokenizerFast

    words = word_tokenizer(list(INTERNVL_SPECIALS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", extra_special_tokens=dict(INTERNVL_SPECIALS))


def tiny_internvl(tmp_path: Path, seed: int = 0, layers: int = 2, max_tiles: int = 4) -> Path:
    """InternVL: InternViT (tile 32, patch 4 -> 8 x 8 patches), pixel shuffle 0.5 -> 4 x 4 = 16 tokens per tile,
    Qwen2 LM with GQA 4/2; the processor cuts an image into up to ``max_tiles`` tiles plus a thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    tok = internvl_tokenizer()
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        text_config=dict(model_type="qwen2", **_text_config(len(tok), num_hidden_layers=layers)),
        image_token_id=tok.convert_tokens_to_ids(INTERNVL_SPECIALS["context_image_token"]),
        image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(cfg).eval()
    improc = pil_image_processor_class("GotOcr2")(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=max_tiles)
    out = Path(tmp_path) / f"tiny-internvl-{layers}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    # what InternVLProcessor.save_pretrained writes next to its parts (it cannot be built without torchvision)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 16,
                                                           "processor_class": "InternVLProcessor"}))
    return out
