"""The one module that names transformers' internals.

vlsparse hooks into transformers in a handful of places that are not its
stable public API (``from_pretrained``, ``generate``, the config and model
classes). Each such place is one function here, and each function has a test
in ``tests/test_compat.py`` that fails when a release changes what it relies on.
Nothing else in the project imports from ``transformers.integrations``,
``transformers.masking_utils``, ``transformers.cache_utils``,
``transformers.processing_utils``, ``transformers.core_model_loading`` or
``transformers.conversion_mapping``, nor reads the cache argument by name.

What moved, and when (checked against the installed sources):

- 5.25 hands the KV cache to a model's forward as ``cache=`` (earlier:
  ``past_key_values=``), and model outputs carry it as ``.cache``; a caller
  may still pass the old name, which a decorator renames *inside* the forward,
  so a forward pre-hook can see either.
- v5 image processors have a torchvision backend (``XxxImageProcessor``) and a
  PIL one (``XxxImageProcessorPil``); only the PIL one works without torchvision.
- ``Qwen2VLProcessor.__init__`` insists on a video processor, which needs
  torchvision (so do ``Qwen3VLProcessor`` and ``InternVLProcessor``).
- Qwen3-VL's decoder stack takes its DeepStack features as the forward arguments
  ``visual_pos_masks`` and ``deepstack_visual_embeds`` and adds them itself between layers.
"""

from __future__ import annotations

from typing import Any, Callable

# ----------------------------------------------------------------------------- KV cache

CACHE_ARGUMENTS = ("cache", "past_key_values")  # newest first


def cache_of_call(kwargs: dict) -> Any | None:
    """The KV cache a model's forward was called with, under either of its names, or None."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_of_output(output: Any) -> Any | None:
    """The KV cache a model's forward returned (``output.cache``, earlier ``output.past_key_values``)."""
    for name in CACHE_ARGUMENTS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes the KV cache (``cache`` since 5.25, else ``past_key_values``)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])


def new_dynamic_cache(model) -> Any:
    """An empty ``DynamicCache`` for ``model`` (its layers typed from the text config, as ``generate`` makes it)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens a transformers ``Cache`` already holds in ``layer`` (0 for None or an empty cache)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length(layer))


def cache_layer_keys(cache: Any, layer: int):
    """The key tensor [B, Hkv, T, D] a transformers ``Cache`` holds for ``layer``."""
    return cache.layers[layer].keys


def cache_nbytes(cache: Any) -> int:
    """Bytes of the key and value tensors a transformers ``Cache`` holds (its ``layers``' ``keys``/``values``;
    a vlsparse layer's own count, ``held_nbytes()``, of what it really allocated)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", None) or ():
        if hasattr(layer, "held_nbytes"):
            total += layer.held_nbytes()
            continue
        for name in ("_quantized_keys", "_quantized_values"):  # transformers' QuantizedLayer (quanto, HQQ)
            total += _tensor_bytes(getattr(layer, name, None))
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _tensor_bytes(value: Any) -> int:
    """Bytes of a tensor, of a tensor subclass's inner tensors (quanto's ``__tensor_flatten__``) or of a tuple."""
    import torch

    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def cache_layer_base() -> type:
    """A base class for one layer of KV cache: transformers' ``cache_utils.CacheLayerMixin`` (``Cache`` treats
    a layer that is not one as a linear-attention layer), with its maximum-length method under both of its
    names (``get_max_cache_shape`` up to 5.2x, ``get_max_length`` since), answered by ``get_max_length``.

    A subclass implements ``lazy_initialization``, ``update(keys, values) -> (keys, values)`` (what the
    attention function receives), ``get_seq_length`` (tokens seen: positions count from it),
    ``get_mask_sizes(query_length) -> (kv_length, kv_offset)`` (the keys the attention reads) and
    ``get_max_length`` (-1: no maximum). Call it once per module that subclasses it.
    """
    from transformers.cache_utils import CacheLayerMixin

    class CacheLayer(CacheLayerMixin):
        def get_max_length(self) -> int:
            return -1

        def get_max_cache_shape(self) -> int:
            return self.get_max_length()

    return CacheLayer


def replace_full_attention_layers(cache: Any, make_layer: Callable[[int], Any], num_layers: int,
                                  only: set[int] | None = None) -> list[int]:
    """Put ``make_layer(i)`` in place of every plain full-attention layer ``i`` of an empty ``DynamicCache``
    (of those in ``only``, when given: e.g. not the cross-attention layers of Mllama, whose cache holds the image).

    Those are ``DynamicLayer`` instances (sliding-window, static, quantised and linear-attention layers
    are left alone); a cache that creates its layers on first use gets all ``num_layers`` now.
    Returns the replaced indices (none for a cache that holds tokens already or is not dynamic).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or layers is None or cache_length(cache):
        return []
    if not layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        layers.extend(DynamicLayer() for _ in range(num_layers))
    replaced = [i for i, layer in enumerate(layers) if type(layer) is DynamicLayer and (only is None or i in only)]
    for i in replaced:
        layers[i] = make_layer(i)
    return replaced


# ----------------------------------------------------------------------------- attention registry


def register_attention(name: str, function: Callable) -> None:
    """Register ``function(module, query, key, value, attention_mask, **kwargs) -> (out [B,N,H,D], weights)``.

    ``query`` is [B, H, N, D]; ``key``/``value`` are [B, Hkv, N, D] (not repeated for GQA).
    The mask function of the new name is transformers' SDPA mask, so the function
    receives the same ``attention_mask`` SDPA would (None when causal without padding).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def attn_implementation(model) -> str | None:
    """The attention implementation a model runs now (``config._attn_implementation``: "sdpa", "eager", ...)."""
    return getattr(model.config, "_attn_implementation", None)


def attention_scale(module, query, kwargs: dict) -> float:
    """The softmax scale of a registered attention call: its ``scaling`` keyword, else the module's
    ``scaling`` attribute, else 1/sqrt(head dim)."""
    value = kwargs.get("scaling")
    if value is None:
        value = getattr(module, "scaling", None)
    return float(value) if value is not None else query.shape[-1] ** -0.5


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention function, with the registry's signature."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# ----------------------------------------------------------------------------- processors


def pil_image_processor_class(name: str):
    """The PIL (torchvision-free) image processor class of a family, e.g. ``"CLIP"``, ``"Qwen2VL"``."""
    import transformers

    return getattr(transformers, f"{name}ImageProcessorPil")


def image_only_qwen2_vl_processor_class():
    """A Qwen2-VL processor without the video processor (which needs torchvision).

    Takes only the image processor, tokenizer and chat template and sets the
    image/video token attributes ``Qwen2VLProcessor`` would set itself.
    """
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def image_only_processor_class(name: str):
    """``transformers.<name>`` (``"Qwen3VLProcessor"``, ``"InternVLProcessor"``) without its video processor.

    Those processors' ``__init__`` takes ``(image_processor, tokenizer, video_processor, ...)``
    and sets its own token attributes; the subclass takes no ``video_processor`` (its
    signature is what ``ProcessorMixin`` reads as the list of sub-processors) and passes None.
    """
    import transformers

    parent = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        parent.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{name}", (parent,), {"__init__": __init__, "__doc__": f"{name} without videos."})


def image_only_smolvlm_processor_class():
    """A SmolVLM processor without the video processor (torchvision) and without ``num2words``
    (which ``SmolVLMProcessor.__init__`` demands, for video prompts only).

    Sets the token attributes ``SmolVLMProcessor`` would set itself (the tokenizer's, else the
    released names) and ``image_seq_len``.
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    tokens = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
              "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>",
              "video_token": "<video>"}

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                     **kwargs):
            for attr, default in tokens.items():
                setattr(self, attr, getattr(tokenizer, attr, None) or default)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.image_seq_len = image_seq_len
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlySmolVLMProcessor


# ----------------------------------------------------------------------------- DeepStack (Qwen3-VL)

DEEPSTACK_ARGUMENTS = ("visual_pos_masks", "deepstack_visual_embeds")


def take_deepstack(kwargs: dict):
    """Take Qwen3-VL's DeepStack arguments out of a decoder-stack call (a forward pre-hook's ``kwargs``).

    Returns ``(visual mask [B, N] bool, [one [n_visual, D] tensor per early layer])`` and leaves
    None in their place, so the stack adds nothing and the caller adds feature ``j`` to the visual
    positions after layer ``j`` itself; None (kwargs untouched) when the call carries none.
    """
    mask, features = (kwargs.get(name) for name in DEEPSTACK_ARGUMENTS)
    if mask is None or not features:
        return None
    for name in DEEPSTACK_ARGUMENTS:
        kwargs[name] = None
    return mask, list(features)


# ----------------------------------------------------------------------------- checkpoint keys


class NeedsConversion(Exception):
    """A checkpoint tensor that transformers fuses or splits on load (not a plain rename)."""


def checkpoint_key_map(model, checkpoint_keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, by transformers' own load-time renaming.

    E.g. LLaVA's ``language_model.model.layers.0...`` -> ``model.language_model.layers.0...``.
    Raises ``NeedsConversion`` naming the first key that transformers would fuse or split.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = dict(model.state_dict(keep_vars=True))
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if pattern is not None:
            raise NeedsConversion(key)
        out.setdefault(target, key)
    return out


# ----------------------------------------------------------------------------- logging


def transformers_logging():
    """transformers' logging module (verbosity and progress-bar switches)."""
    from transformers.utils import logging

    return logging
