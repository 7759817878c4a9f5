"""Tiny random models of each supported family, built and saved in the test (no network).

Each builder saves with plain transformers ``save_pretrained`` (model, tokenizer,
image processor) so the loader is tested on folders it did not write itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlsparse.compat import pil_image_processor_class

WORDS = ("what is this color shape circle square red blue green the a of in image picture how many "
         "describe there yes no one two three left right top bottom").split()


def word_tokenizer(extra_specials: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS plus the given special tokens."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", *extra_specials]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    for ch in "?.,:!\n":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=extra_specials)
    return fast


def _text_config(vocab_size: int, **extra) -> dict:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    base.update(extra)
    return base


def tiny_llava(tmp_path: Path, strategy: str = "default", seed: int = 0, layers: int = 2) -> Path:
    """LLaVA: CLIP tower (image 16, patch 4 -> 16 patches), Llama LM with GQA 4/2 (``layers`` deep)."""
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              CLIPVisionConfig)

    torch.manual_seed(seed)
    tok = word_tokenizer(["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=4),
        text_config=LlamaConfig(**_text_config(len(tok), num_hidden_layers=layers)),
        image_token_index=image_token_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    improc = pil_image_processor_class("CLIP")(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=4,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1)
    out = Path(tmp_path) / (f"tiny-llava-{strategy}" + (f"-{layers}" if layers != 2 else ""))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                           "<|im_start|>", "<|im_end|>"])


def _save_qwen(model, tok, out: Path) -> Path:
    improc = pil_image_processor_class("Qwen2VL")(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4,
                                                  merge_size=2, temporal_patch_size=2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    return out


def _qwen_ids(tok) -> dict:
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def tiny_qwen2_vl(tmp_path: Path, seed: int = 0, layers: int = 2) -> Path:
    """Qwen2-VL: multimodal RoPE (sections 2,3,3 of head dim 16), patch 4, merge 2 (``layers`` LM layers)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    cfg = Qwen2VLConfig(
        text_config=_text_config(len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                                 num_hidden_layers=layers),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3),
        **_qwen_ids(tok),
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return _save_qwen(model, tok, Path(tmp_path) / ("tiny-qwen2-vl" + (f"-{layers}" if layers != 2 else "")))


def tiny_qwen2_5_vl(tmp_path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: as Qwen2-VL with windowed vision attention and a SwiGLU vision MLP."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=_text_config(len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                           window_size=16, fullatt_block_indexes=[1]),
        **_qwen_ids(tok),
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return _save_qwen(model, tok, Path(tmp_path) / "tiny-qwen2_5-vl")


def tiny_llama(tmp_path: Path, seed: int = 0) -> Path:
    """A Llama-style decoder-only LM with GQA 4/2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer([])
    model = LlamaForCausalLM(LlamaConfig(**_text_config(len(tok)))).eval()
    out = Path(tmp_path) / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
