"""``load()``: a model folder, hub id or ``demo`` -> (model, processor, adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlsparse.errors import InputError, ModelLoadError
from vlsparse.models.adapter import Adapter, family_of
from vlsparse.models.processors import load_processor, prepare_inputs
from vlsparse.models.source import check_model_folder, resolve_model_folder

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to run, with its processor (or tokenizer) and adapter."""

    model: Any
    processor: Any
    adapter: Adapter
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype

    def prepare(self, images: list, question: str):
        """Processed inputs on the model's device."""
        return prepare_inputs(self.processor, self.adapter.family, images, question).to(self.device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}", "use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are ~100x slower on these CPUs) and bf16 on GPUs."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def model_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if family == "causal_lm" else AutoModelForImageTextToText


def _from_pretrained(cls, folder: Path, kwargs: dict):
    """Stock ``from_pretrained``; a ``vlsparse prune --pack`` folder is unpacked by our own reader first."""
    from vlsparse.compress.packed import is_packed, unpack_state_dict

    if not is_packed(folder):
        return cls.from_pretrained(folder, **kwargs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    concrete = cls._model_mapping[type(config)]  # the auto classes need a path; the concrete one takes None
    kwargs = {k: v for k, v in kwargs.items() if k not in ("use_safetensors", "trust_remote_code")}
    return concrete.from_pretrained(None, config=config, state_dict=unpack_state_dict(folder), **kwargs)


def load(model: str | Path = "demo", device: str = "cpu", dtype: str = "auto", allow_pickle: bool = False,
         trust_remote_code: bool = False, attn_implementation: str | None = None) -> LoadedModel:
    """Load a supported model for inference; every user error is a one-line ``VlsparseError``."""
    folder = resolve_model_folder(model)
    config = check_model_folder(folder, allow_pickle=allow_pickle)
    family = family_of(config)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    processor = load_processor(folder, family, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "use_safetensors": not allow_pickle or None}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        net = _from_pretrained(model_class(family), folder, kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the weights in {folder}: {str(exc).splitlines()[0][:200]}",
                             "check that the folder was saved completely with save_pretrained") from exc
    net = net.to(torch_device).eval()
    name = "demo" if str(model) == "demo" else folder.name
    return LoadedModel(model=net, processor=processor, adapter=Adapter(net, family, name=name), name=name,
                       path=folder, device=torch_device, dtype=torch_dtype)
