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
def gemma3_dir(tiny_dir):
    """A tiny Gemma 3: sliding-window layer 0 (window 8), global layer 1, 4 tokens per image."""
    from tiny_families_gemma import tiny_gemma3

    return tiny_gemma3(tiny_dir)


@pytest.fixture(scope="session")
def paligemma_dir(tiny_dir):
    """A tiny PaliGemma: 16 image tokens at the prompt start, a bidirectional prefix."""
    from tiny_families_gemma import tiny_paligemma

    return tiny_paligemma(tiny_dir)


@pytest.fixture(scope="session")
def idefics3_dir(tiny_dir):
    from tiny_families_tiles import tiny_idefics3

    return tiny_idefics3(tiny_dir)


@pytest.fixture(scope="session")
def smolvlm_dir(tiny_dir):
    from tiny_families_tiles import tiny_smolvlm

    return tiny_smolvlm(tiny_dir)


@pytest.fixture(scope="session")
def mllama_dir(tiny_dir):
    from tiny_families_tiles import tiny_mllama

    return tiny_mllama(tiny_dir)


@pytest.fixture(scope="session")
def llava_next_dir(tiny_dir):
    from tiny_families_tiles import tiny_llava_next

    return tiny_llava_next(tiny_dir)


@pytest.fixture(scope="session")
def llava_onevision_dir(tiny_dir):
    from tiny_families_tiles import tiny_llava_onevision

    return tiny_llava_onevision(tiny_dir)


@pytest.fixture(scope="session")
def qwen3_vl_dir(tiny_dir):
    """A tiny Qwen3-VL: 4 LM layers, DeepStack features into layers 0 and 1."""
    from tiny_families_qwen3_internvl import tiny_qwen3_vl

    return tiny_qwen3_vl(tiny_dir)


@pytest.fixture(scope="session")
def internvl_dir(tiny_dir):
    """A tiny InternVL: 16 tokens per 32-pixel tile, up to 4 tiles plus a thumbnail per image."""
    from tiny_families_qwen3_internvl import tiny_internvl

    return tiny_internvl(tiny_dir)


@pytest.fixture(scope="session")
def vlm_dirs(llava_dir, llava_full_dir, qwen2_vl_dir, qwen2_5_vl_dir, idefics3_dir, smolvlm_dir, mllama_dir,
             llava_next_dir, llava_onevision_dir, qwen3_vl_dir, internvl_dir, gemma3_dir, paligemma_dir):
    return {"llava": llava_dir, "llava-full": llava_full_dir, "qwen2_vl": qwen2_vl_dir, "qwen2_5_vl": qwen2_5_vl_dir,
            "idefics3": idefics3_dir, "smolvlm": smolvlm_dir, "mllama": mllama_dir, "llava_next": llava_next_dir,
            "llava_onevision": llava_onevision_dir, "qwen3_vl": qwen3_vl_dir, "internvl": internvl_dir,
            "gemma3": gemma3_dir, "paligemma": paligemma_dir}


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
