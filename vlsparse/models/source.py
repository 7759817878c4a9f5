"""Resolve a MODEL argument (``demo``, a local folder, or a hub id) to a checked local folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlsparse.errors import ModelLoadError, param
from vlsparse.safetensors_header import TensorEntry

DEMO_NAMES = ("demo",)
SMOLLM2_NAMES = ("smollm2",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SUB_CONFIGS = ("text_config", "vision_config")
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "image_size", "patch_size", "num_channels",
                "embed_dim", "depth", "num_heads", "spatial_merge_size", "temporal_patch_size", "in_chans",
                "in_channels", "out_hidden_size", "window_size")
_PAIR_FIELDS = ("image_size", "patch_size")
"""Sizes a config may give as [height, width] (InternVL's vision tower)."""


def demo_folder() -> Path:
    """The packaged demo model's folder (``vlsparse/demo/weights``)."""
    from vlsparse.demo.build import demo_path

    path = demo_path()
    if not (path / "config.json").is_file():
        raise ModelLoadError("the embedded demo model's weights are missing from this install",
                             "reinstall vlsparse, or train them with `python scripts/train_demo.py`")
    return path


def resolve_model_folder(model: str | Path) -> Path:
    """Return a local folder for ``model``; a hub id is downloaded where a hub is reachable."""
    text = str(model).strip()
    if not text:
        raise ModelLoadError("no model given", "pass a model folder, a hub id, or `demo`")
    if text in DEMO_NAMES:
        return demo_folder()
    if text in SMOLLM2_NAMES and not Path(text).exists():
        from vlsparse.smollm import smollm2_folder

        return smollm2_folder()
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {text} is a file, not a folder",
                                 "pass the folder that holds config.json and the weights")
        return path
    if _HUB_ID.match(text) and not text.startswith("."):
        return _download(text)
    raise ModelLoadError(f"model folder {text} not found", "check the path, or pass `demo` for the embedded model")


def model_name(model: str | Path, folder: Path) -> str:
    """The name a loaded model goes by: ``demo`` for the embedded model, else its folder's name."""
    return "demo" if str(model) in DEMO_NAMES else folder.name


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.jinja", "*.tiktoken"])
    except Exception as exc:  # offline, unknown repo, gated: all become one line
        raise ModelLoadError(
            f"model {repo_id} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__})",
            "check the path, or download the model where a hub is reachable and pass its folder",
        ) from exc
    return Path(local)


def check_model_folder(path: Path, allow_pickle: bool = False) -> dict:
    """Check a model folder before loading; return its parsed (and type-checked) config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model folder",
                             "pass the folder that holds config.json and the weights")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON", "re-save the model with save_pretrained") from exc
    check_config(config, config_file)
    files = [p.name for p in path.iterdir() if p.is_file()]
    has_safetensors = any(f.endswith(".safetensors") and f != "vlsparse.safetensors" for f in files)
    has_pickle = any(f.endswith(_PICKLE_SUFFIXES) for f in files)
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelLoadError(
                f"{path} has only pickle weights (.bin/.pt), which can run arbitrary code when loaded",
                f"convert them to safetensors, or pass {param('allow_pickle')} if you trust the source",
            )
        if not has_pickle:
            raise ModelLoadError(f"{path} has no weight files (*.safetensors)", "check that the download completed")
    return config


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(config, config_file: Path) -> None:
    """A JSON object whose size fields are positive integers and whose sub-configs are objects.

    A vision-language config must carry its language model's and vision tower's settings:
    without them transformers silently builds its *default* model of that family (for LLaVA
    a 7B Llama plus CLIP-L, for Qwen2-VL a 72B model), billions of random parameters that
    the checkpoint does not fill and that exhaust memory while being created.
    """
    hint = "fix config.json, or re-save the model with save_pretrained"
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} holds {_kind(config)}, not a JSON object of model settings", hint)
    if not isinstance(config.get("model_type", ""), str):
        raise ModelLoadError(f"{config_file}: model_type should be a string, got {config['model_type']!r}", hint)
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ModelLoadError(f"{config_file}: architectures should be a list of class names, got {architectures!r}",
                             hint)
    sections = [("", config)]
    for key in _SUB_CONFIGS:
        sub = config.get(key)
        if sub is not None and not isinstance(sub, dict):
            raise ModelLoadError(f"{config_file}: {key} should be a JSON object, got {_kind(sub)}", hint)
        if sub is not None:
            sections.append((f"{key}.", sub))
    for prefix, section in sections:
        for field in _SIZE_FIELDS:
            value = section.get(field)
            pair = field in _PAIR_FIELDS and isinstance(value, list) and len(value) == 2
            if value is not None and not all(_positive_int(v) for v in (value if pair else [value])):
                what = "a [height, width] pair of positive integers" if pair else "a positive integer"
                raise ModelLoadError(f"{config_file}: {prefix}{field} should be {what}, got {value!r}", hint)
    _check_sub_configs(config, config_file)


def _check_sub_configs(config: dict, config_file: Path) -> None:
    from vlsparse.models.families import registry

    model_type = config.get("model_type", "")
    family = registry().get(model_type)
    if family is None:
        return
    missing = [key for key in family.required_sub_configs(config) if not isinstance(config.get(key), dict)]
    if missing:
        part = "language model" if missing[0] == "text_config" else "vision tower"
        raise ModelLoadError(
            f"{config_file} ({model_type}) has no {missing[0]}, so transformers would silently build its default "
            f"{part} (billions of parameters) instead of this checkpoint's",
            f"add the checkpoint's {missing[0]} to config.json (as save_pretrained writes it)")


def check_weight_files(path: Path) -> dict[str, TensorEntry]:
    """Check every safetensors header in ``path`` (and the shard index); return all tensors by name."""
    from vlsparse.safetensors_header import read_tensors

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid shard index", "re-download the model") from exc
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map", "re-download the model")
        absent = sorted({str(f) for f in weight_map.values()} - {p.name for p in path.iterdir()})
        if absent:
            raise ModelLoadError(f"{index} names {len(absent)} shard(s) that are missing, first {absent[0]}",
                                 "re-download the model: the download is incomplete")
    tensors: dict[str, TensorEntry] = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name != "vlsparse.safetensors":
            tensors.update(read_tensors(file))
    return tensors


def resolved_config(path: Path, trust_remote_code: bool = False) -> dict:
    """config.json as transformers reads it, defaults filled in (``ModelLoadError`` if it refuses it)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    except (ValueError, TypeError, KeyError, AttributeError, OSError, StrictDataclassError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"transformers cannot read {path / 'config.json'}: {reason}",
                             "fix config.json, or re-save the model with save_pretrained") from exc
