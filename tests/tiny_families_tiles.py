"""Tiny random models of the tiling families, built and saved in the test (no network).

Idefics3 / SmolVLM (tiles + a global image per image), Mllama (images through
cross-attention layers), LLaVA-NeXT and LLaVA-OneVision (any-res tiles after a base
image). Each builder saves with plain transformers ``save_pretrained``; sizes are
chosen so that the test images are split into several tiles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import _text_config, word_tokenizer
from vlsparse.compat import pil_image_processor_class

TILE_MARKERS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
"""Idefics3's tile markers, one special token each (as in the released tokenizers)."""


def _idefics3_tokenizer():
    return word_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                           *TILE_MARKERS])


def _idefics3_parts(tok, layers: int) -> dict:
    """Config parts shared by Idefics3 and SmolVLM: SigLIP-like tower (tile 16, patch 4), pixel shuffle 2
    (4 tokens per tile), Llama LM."""
    return dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=16, patch_size=4),
                text_config=_text_config(len(tok), num_hidden_layers=layers, model_type="llama"),
                image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=0)


def _idefics3_image_processor(family: str):
    """Images resized to a longest edge of 32, split into 16 x 16 tiles (2 x 2 at most) + the global image."""
    return pil_image_processor_class(family)(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                             do_image_splitting=True)


def tiny_idefics3(tmp_path: Path, seed: int = 0, layers: int = 2) -> Path:
    """Idefics3: tiles of 4 image tokens (2 x 2 after the pixel shuffle) wrapped in marker tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    torch.manual_seed(seed)
    tok = _idefics3_tokenizer()
    model = Idefics3ForConditionalGeneration(Idefics3Config(**_idefics3_parts(tok, layers))).eval()
    processor = Idefics3Processor(image_processor=_idefics3_image_processor("Idefics3"), tokenizer=tok,
                                  image_seq_len=4)
    out = Path(tmp_path) / ("tiny-idefics3" + (f"-{layers}" if layers != 2 else ""))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_smolvlm(tmp_path: Path, seed: int = 0) -> Path:
    """SmolVLM: Idefics3's layout; its processor (video half: torchvision, num2words) is saved as parts."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    tok = _idefics3_tokenizer()
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**_idefics3_parts(tok, 2))).eval()
    out = Path(tmp_path) / "tiny-smolvlm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _idefics3_image_processor("SmolVLM").save_pretrained(out)
    (out / "processor_config.json").write_text('{"processor_class": "SmolVLMProcessor", "image_seq_len": 4}')
    return out


def tiny_mllama(tmp_path: Path, seed: int = 0) -> Path:
    """Mllama: 4 LM layers, layer 1 and 3 cross-attention; tower of 1 local + 1 global layer on 16 x 16 tiles
    (patch 4), at most 2 tiles per image."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    torch.manual_seed(seed)
    tok = word_tokenizer(["<|image|>", "<|python_tag|>"])
    text = _text_config(len(tok), num_hidden_layers=4, cross_attention_layers=[1, 3])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                  image_size=16, patch_size=4, max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    model = MllamaForConditionalGeneration(config).eval()
    improc = pil_image_processor_class("Mllama")(size={"height": 16, "width": 16}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=improc, tokenizer=tok)
    out = Path(tmp_path) / "tiny-mllama"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
"""The any-res resolutions of the tiny LLaVA-NeXT/OneVision (height, width): 16 x 16 tiles, up to 2 x 2."""


def _llava_next_parts(tok) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig

    return dict(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=16, patch_size=4),
                text_config=LlamaConfig(**_text_config(len(tok))), image_token_index=tok.convert_tokens_to_ids("<image>"),
                image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-1)


def tiny_llava_next(tmp_path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: CLIP tower (16 x 16 tiles, patch 4: a 4 x 4 base grid), any-res up to 2 x 2 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    torch.manual_seed(seed)
    tok = word_tokenizer(["<image>"])
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**_llava_next_parts(tok))).eval()
    improc = pil_image_processor_class("LlavaNext")(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                    image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=4,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    out = Path(tmp_path) / "tiny-llava-next"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_llava_onevision(tmp_path: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: the tiny NeXT's sizes with a SigLIP tower (no CLS: strategy ``full``) and
    ``anyres_max_1``, so grids above one crop's worth are shrunk; its processor's video half needs
    torchvision, so the tokenizer and image processor are saved as parts."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    tok = word_tokenizer(["<image>", "<video>"])
    parts = _llava_next_parts(tok)
    parts.update(vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                 vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4))
    model = LlavaOnevisionForConditionalGeneration(
        LlavaOnevisionConfig(**parts, video_token_index=tok.convert_tokens_to_ids("<video>"))).eval()
    improc = pil_image_processor_class("LlavaOnevision")(size={"height": 16, "width": 16},
                                                         image_grid_pinpoints=PINPOINTS)
    out = Path(tmp_path) / "tiny-llava-onevision"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    (out / "processor_config.json").write_text(
        '{"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": '
        '"full", "vision_aspect_ratio": "anyres_max_1"}')
    return out
