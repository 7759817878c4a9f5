"""Tiny random Gemma 3 and PaliGemma models, built and saved in the test (no network).

Like ``tiny_models.py``: plain transformers classes and ``save_pretrained``, so the
loader reads folders it did not write. Both use a SigLIP vision tower (image 16,
patch 4 -> a 4 x 4 patch grid) and the word-level tokenizer of ``tiny_models``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import word_tokenizer
from vlsparse.compat import pil_image_processor_class

SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
"""The vision tower of both families: 16 x 16 images, 4 x 4 patches."""

GEMMA_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _gemma3_tokenizer():
    """The word tokenizer with Gemma 3's image tokens, named as ``Gemma3Processor`` reads them."""
    from transformers import PreTrainedTokenizerFast

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    words = word_tokenizer(list(named.values()))
    return PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", extra_special_tokens=named)


def tiny_gemma3(tmp_path: Path, seed: int = 0, sliding_window: int = 8, tokens_per_image: int = 4,
                layers: int = 2) -> Path:
    """Gemma 3: SigLIP tower pooled to ``tokens_per_image`` tokens; ``layers`` LM layers, sliding ones
    (window ``sliding_window``) alternating with global ones, the first sliding."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    torch.manual_seed(seed)
    tok = _gemma3_tokenizer()
    text = dict(GEMMA_TEXT, vocab_size=len(tok), num_hidden_layers=layers, sliding_window=sliding_window,
                query_pre_attn_scalar=24, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                       for i in range(layers)])
    cfg = Gemma3Config(text_config=text, vision_config=dict(SIGLIP), mm_tokens_per_image=tokens_per_image,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers starts the projection at zero: images would not reach the LM
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight,
                              std=SIGLIP["hidden_size"] ** -0.5)
    improc = pil_image_processor_class("Gemma3")(size={"height": 16, "width": 16})
    processor = Gemma3Processor(image_processor=improc, tokenizer=tok, image_seq_length=tokens_per_image)
    out = Path(tmp_path) / (f"tiny-gemma3-w{sliding_window}" + (f"-{layers}" if layers != 2 else ""))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_paligemma(tmp_path: Path, seed: int = 0, layers: int = 2) -> Path:
    """PaliGemma (1): SigLIP tower (16 image tokens), linear projector, Gemma LM with GQA 4/2."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    torch.manual_seed(seed)
    tok = word_tokenizer([])
    improc = pil_image_processor_class("Siglip")(size={"height": 16, "width": 16})
    improc.image_seq_length = (SIGLIP["image_size"] // SIGLIP["patch_size"]) ** 2
    processor = PaliGemmaProcessor(image_processor=improc, tokenizer=tok)  # adds <image> and the loc/seg tokens
    text = dict(GEMMA_TEXT, model_type="gemma", vocab_size=len(tok), num_hidden_layers=layers)
    cfg = PaliGemmaConfig(text_config=text, vision_config=dict(SIGLIP, projection_dim=64),
                          image_token_index=processor.image_token_id, projection_dim=64, hidden_size=64)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    out = Path(tmp_path) / ("tiny-paligemma" + (f"-{layers}" if layers != 2 else ""))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
