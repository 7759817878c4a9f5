"""Shared fixtures: tiny random models of each family, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def llava_dir(tiny_dir):
    from tiny_models import tiny_llava

    return tiny_llava(tiny_dir)


@pytest.fixture(scope="session")
def llava_full_dir(tiny_dir):
    from tiny_models import tiny_llava

    return tiny_llava(tiny_dir, strategy="full")


@pytest.fixture(scope="session")
def qwen2_vl_dir(tiny_dir):
    from tiny_models import tiny_qwen2_vl

    return tiny_qwen2_vl(tiny_dir)


@pytest.fixture(scope="session")
def llava4_dir(tiny_dir):
    """A 4-layer tiny LLaVA: room for multi-stage token dropping."""
    from tiny_models import tiny_llava

    return tiny_llava(tiny_dir, layers=4)


@pytest.fixture(scope="session")
def qwen2_vl4_dir(tiny_dir):
    """A 4-layer tiny Qwen2-VL (multimodal RoPE)."""
    from tiny_models import tiny_qwen2_vl

    return tiny_qwen2_vl(tiny_dir, layers=4)


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tiny_dir):
    from tiny_models import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(tiny_dir)


@pytest.fixture(scope="session")
def llama_dir(tiny_dir):
    from tiny_models import tiny_llama

    return tiny_llama(tiny_dir)


@pytest.fixture(scope="session")
def vlm_dirs(llava_dir, llava_full_dir, qwen2_vl_dir, qwen2_5_vl_dir):
    return {"llava": llava_dir, "llava-full": llava_full_dir, "qwen2_vl": qwen2_vl_dir, "qwen2_5_vl": qwen2_5_vl_dir}


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    """A 48x32 RGB PNG with random pixels (so that truncating it breaks its data)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def llama(llama_dir):
    """The tiny Llama, loaded once per test module."""
    from vlsparse.models import load

    return load(str(llama_dir))


@pytest.fixture(scope="module")
def llava(llava_dir):
    """The tiny LLaVA, loaded once per test module."""
    from vlsparse.models import load

    return load(str(llava_dir))
