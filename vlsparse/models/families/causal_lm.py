"""The causal-LM family: Llama-style decoder-only language models (``*ForCausalLM``).

Llama, Mistral, Qwen2/3, SmolLM3, Granite, OLMo 2, Phi-3 and Gemma 1/2 checkpoints:
``model.model`` holds the decoder layers, there is no vision part, and the
"processor" is the tokenizer. Prompts are the chat template's when there is one,
else the question itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from vlsparse.errors import InputError
from vlsparse.models.families.base import Adapter, ImageSpan, chat_template, check_question


class CausalLMAdapter(Adapter):
    """A text-only decoder-only LM: no vision tower, no projector, no images."""

    family: ClassVar[str] = "causal_lm"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2",
                                              "phi3", "gemma", "gemma2")
    SUPPORTED: ClassVar[str] = "Llama-style *ForCausalLM"
    is_vlm: ClassVar[bool] = False

    @classmethod
    def accepts(cls, config: dict) -> bool:
        """Only the ``*ForCausalLM`` heads (a config without architectures is taken as one)."""
        return any(a.endswith("ForCausalLM") for a in config.get("architectures") or ["ForCausalLM"])

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)

    @classmethod
    def chat_content(cls, question: str, n_images: int):
        return question

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        return question

    @classmethod
    def prepare_inputs(cls, processor, images: list, question: str):
        check_question(question)
        if images:
            raise InputError("this model is a text-only language model and cannot take images",
                             "drop the image argument, or use a vision-language model")
        prompt = cls.format_prompt(processor, question.strip(), 0)
        return processor(prompt, return_tensors="pt", add_special_tokens=not chat_template(processor))

    def language_model(self) -> nn.Module:
        return self.model.model

    def vision_tower(self) -> None:
        return None

    def vision_layers(self) -> list[nn.Module]:
        return []

    def projector(self) -> None:
        return None

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        return []
