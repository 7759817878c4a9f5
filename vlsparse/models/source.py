"""Resolve a MODEL argument (``demo``, a local folder, or a hub id) to a checked local folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlsparse.errors import ModelLoadError

DEMO_NAMES = ("demo",)
SMOLLM2_NAMES = ("smollm2",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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
    """Check a model folder before loading; return its parsed config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model folder",
                             "pass the folder that holds config.json and the weights")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON", "re-save the model with save_pretrained") from exc
    files = [p.name for p in path.iterdir() if p.is_file()]
    has_safetensors = any(f.endswith(".safetensors") and f != "vlsparse.safetensors" for f in files)
    has_pickle = any(f.endswith(_PICKLE_SUFFIXES) for f in files)
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelLoadError(
                f"{path} has only pickle weights (.bin/.pt), which can run arbitrary code when loaded",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        if not has_pickle:
            raise ModelLoadError(f"{path} has no weight files (*.safetensors)", "check that the download completed")
    return config
