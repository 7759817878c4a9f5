"""``load()``: a model folder, hub id or ``demo`` -> (model, processor, adapter)."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from vlsparse.errors import InputError, ModelLoadError, param
from vlsparse.memory import LOAD_MARGIN, LOAD_OVERHEAD, check_fits, parameter_count
from vlsparse.models.families import Adapter, family_for, family_named
from vlsparse.models.packed_reader import is_packed, unpack_state_dict
from vlsparse.models.source import (check_model_folder, check_weight_files, model_name, resolve_model_folder,
                                    resolved_config)

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
    offload: dict | None = None
    """With ``max_memory_mb``: where accelerate put the modules (``{"resident": n, "disk": n, "folder": ...}``)."""

    def prepare(self, images: list, question: str):
        """Processed inputs on the model's device."""
        return self.adapter.prepare(self.processor, images, question).to(self.device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}", "use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{param('device', 'cuda')} was asked for but no CUDA GPU is available", f"use {param('device', 'cpu')}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are ~100x slower on these CPUs) and bf16 on GPUs."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def model_class(family: str):
    """The transformers auto class that builds models of the family named ``family``."""
    return family_named(family).auto_model_class()


def _from_pretrained(cls, folder: Path, kwargs: dict):
    """(model, loading info) by stock ``from_pretrained``; a ``vlsparse prune --pack`` folder is unpacked
    by our own reader first."""
    kwargs = {**kwargs, "output_loading_info": True}
    if not is_packed(folder):
        return cls.from_pretrained(folder, **kwargs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    concrete = cls._model_mapping[type(config)]  # the auto classes need a path; the concrete one takes None
    kwargs = {k: v for k, v in kwargs.items() if k not in ("use_safetensors", "trust_remote_code")}
    return concrete.from_pretrained(None, config=config, state_dict=unpack_state_dict(folder), **kwargs)


def check_weights_fit(folder: Path, name: str, config: dict, tensors: dict, dtype: torch.dtype) -> None:
    """Refuse a model whose weights (as ``dtype``) would not fit in the available memory, before building it.

    Parameters: the larger of the config's count (what transformers builds, defaults included)
    and the checkpoint's tensors; a packed checkpoint is held twice (unpacked state dict + model).
    """
    parameters = max(parameter_count(config), sum(t.numel for t in tensors.values()))
    copies = 2 if is_packed(folder) else 1
    need = int(parameters * dtype.itemsize * copies * LOAD_MARGIN) + LOAD_OVERHEAD
    count = f"{parameters / 1e9:.1f} billion" if parameters >= 1e9 else f"{parameters / 1e6:.1f} million"
    hint = "use a smaller model or a machine with more memory"
    if dtype.itemsize > 2:
        hint = f"use {param('dtype', 'bfloat16')} (half the memory), a smaller model, or a machine with more memory"
    check_fits(need, f"loading {name} ({count} parameters as {str(dtype).removeprefix('torch.')})", hint,
               error=ModelLoadError)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_missing_weights(folder: Path, info: dict) -> None:
    """Refuse a model some of whose parameters the checkpoint lacks (transformers would initialise them randomly)."""
    missing = sorted(info.get("missing_keys") or (), key=_natural)
    if missing:
        raise ModelLoadError(f"the checkpoint in {folder} lacks {len(missing)} of the weights its config.json "
                             f"describes (first: {missing[0]}), which transformers would fill with random values",
                             "use the config.json saved with these weights, or re-save the model completely")


def load(model: str | Path = "demo", device: str = "cpu", dtype: str = "auto", allow_pickle: bool = False,
         trust_remote_code: bool = False, attn_implementation: str | None = None,
         max_memory_mb: float | None = None, offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a supported model for inference; every user error is a one-line ``VlsparseError``.

    Checked before anything is built: config.json (types, sub-configs), every safetensors
    header, and that the weights fit in memory; right after loading: that the checkpoint
    held every weight the model needs.

    ``max_memory_mb``: a model larger than memory. accelerate's ``device_map="auto"`` keeps at
    most that many MiB of weights resident and puts the rest in ``offload_folder`` (needed
    then), reading each offloaded module from disk while it runs. The memory check is skipped.
    """
    folder = resolve_model_folder(model)
    config = check_model_folder(folder, allow_pickle=allow_pickle)
    family = family_for(config)
    tensors = check_weight_files(folder)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = model_name(model, folder)
    if max_memory_mb is None:
        check_weights_fit(folder, name, resolved_config(folder, trust_remote_code), tensors, torch_dtype)
    processor = family.load_processor(folder, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "use_safetensors": not allow_pickle or None}
    if max_memory_mb is not None:
        kwargs.update(offload_arguments(folder, torch_device, max_memory_mb, offload_folder))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        net, info = _from_pretrained(family.auto_model_class(), folder, kwargs)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"the pickle weights in {folder} hold objects other than tensors, which safe "
                             "(weights-only) loading refuses",
                             "convert them to safetensors where you trust the file, or use a safetensors "
                             "download of the model") from exc
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load the weights in {folder}: {str(exc).splitlines()[0][:200]}",
                             "check that the folder was saved completely with save_pretrained") from exc
    check_missing_weights(folder, info)
    offload = None
    if max_memory_mb is None:
        net = net.to(torch_device)
    else:
        placed = list(getattr(net, "hf_device_map", {}).values())
        offload = {"max_memory_mb": max_memory_mb, "folder": str(offload_folder),
                   "resident": sum(1 for p in placed if p != "disk"), "disk": placed.count("disk")}
    return LoadedModel(model=net.eval(), processor=processor, adapter=family(net, name=name), name=name,
                       path=folder, device=torch_device, dtype=torch_dtype, offload=offload)


def offload_arguments(folder: Path, device: torch.device, max_memory_mb: float,
                      offload_folder: str | Path | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that keep at most ``max_memory_mb`` MiB of weights resident (accelerate)."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise InputError(f"{param('max_memory_mb')} offloads weights with accelerate, which is not installed",
                         "pip install 'vlsparse[offload]'")
    if not max_memory_mb > 0:
        raise InputError(f"{param('max_memory_mb')} must be above 0, got {max_memory_mb}")
    if offload_folder is None:
        raise InputError(f"{param('max_memory_mb')} needs a folder for the offloaded weights",
                         f"pass {param('offload_folder', 'DIR')}")
    if device.type != "cpu":
        raise InputError(f"{param('max_memory_mb')} offloads from the CPU only",
                         f"drop {param('max_memory_mb')}, or use {param('device', 'cpu')}")
    if is_packed(folder):
        raise InputError(f"{folder} is a packed checkpoint, which cannot be offloaded",
                         f"prune again without {param('pack')} to run it with {param('max_memory_mb')}")
    return {"device_map": "auto", "max_memory": {"cpu": int(max_memory_mb * 2**20)},
            "offload_folder": str(offload_folder)}
