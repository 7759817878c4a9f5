"""Processors and prompt formats for each family (offline, without torchvision)."""

from __future__ import annotations

from pathlib import Path

from vlsparse.compat import image_only_qwen2_vl_processor_class, pil_image_processor_class
from vlsparse.errors import InputError, ModelLoadError


def load_processor(folder: Path, family: str, trust_remote_code: bool = False):
    """The processor (VLMs) or tokenizer (LMs) saved in ``folder``."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        if family == "causal_lm":
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if family in ("qwen2_vl", "qwen2_5_vl"):
            return _qwen_processor(folder, trust_remote_code)
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the processor/tokenizer from {folder}: {str(exc).splitlines()[0][:160]}",
                             "the folder needs the tokenizer and preprocessor files saved by save_pretrained") from exc


def _qwen_processor(folder: Path, trust_remote_code: bool):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ImportError:  # the video processor wants torchvision: use the image-only subclass
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    image_processor = pil_image_processor_class("Qwen2VL").from_pretrained(folder)
    chat_template = getattr(tokenizer, "chat_template", None)
    return image_only_qwen2_vl_processor_class()(image_processor, tokenizer, chat_template=chat_template)


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _chat_template(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(_tokenizer_of(processor), "chat_template", None)


def format_prompt(processor, family: str, question: str, n_images: int) -> str:
    """The prompt in the model's own format: its chat template, else the family's convention."""
    template = _chat_template(processor)
    if template:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        if family == "causal_lm":
            content = question
        messages = [{"role": "user", "content": content}]
        try:
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot take this message falls back below
            pass
    if family == "llava":
        token = getattr(processor, "image_token", "<image>")
        return "USER: " + "".join(f"{token}\n" for _ in range(n_images)) + f"{question} ASSISTANT:"
    if family in ("qwen2_vl", "qwen2_5_vl"):
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        return f"<|im_start|>user\n{image * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"
    return question


def prepare_inputs(processor, family: str, images: list, question: str):
    """Model inputs (a ``BatchFeature`` of tensors) for images + question."""
    if not question or not question.strip():
        raise InputError("the question is empty", "pass the question as the last argument, in quotes")
    if images and family == "causal_lm":
        raise InputError("this model is a text-only language model and cannot take images",
                         "drop the image argument, or use a vision-language model")
    prompt = format_prompt(processor, family, question.strip(), len(images))
    if family == "causal_lm":
        return processor(prompt, return_tensors="pt", add_special_tokens=not _chat_template(processor))
    kwargs = {"images": images} if images else {}
    try:
        return processor(text=[prompt], return_tensors="pt", **kwargs)
    except ValueError as exc:
        raise InputError(f"the processor rejected the input: {str(exc).splitlines()[0][:160]}",
                         "check the number of images against the prompt") from exc
