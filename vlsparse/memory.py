"""Up-front memory estimates: refuse work that cannot fit before it starts, instead of being killed.

Estimates in bytes, deliberately simple (within tens of percent, not exact):

- weights: parameters x bytes per parameter. ``parameter_count`` counts a config
  (language model: embeddings, attention, gated MLP, norms, an untied head; a CLIP/SigLIP
  or Qwen vision tower; the projector); callers take the larger of that and the
  checkpoint's own tensor shapes.
- one forward over N tokens (``forward_bytes``): per token the residual stream and norms
  (4 h), one layer's queries, keys, values and attention output (2 (H + H_kv) d), one MLP's
  gate, up and activation plus room for a hook's copies (5 I); logits (x 2: the fp32
  upcast) only for the positions that get them. PyTorch's SDPA works in tiles on CPU (and
  transformers passes no mask for an unpadded causal prompt), so there is no N x N term.
- KV cache (``kv_cache_bytes``): 2 x layers x H_kv x d x N.

Available memory (``available_bytes``): ``MemAvailable`` from ``/proc/meminfo``, capped by a
cgroup v2 limit when there is one, else ``os.sysconf``; unknown means no check.
``VLSPARSE_SKIP_MEMORY_CHECK=1`` turns every check off (e.g. with plenty of swap).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlsparse.errors import InputError, VlsparseError, param

SKIP_ENV = "VLSPARSE_SKIP_MEMORY_CHECK"
LOAD_MARGIN = 1.1
"""Weights x this: allocator slack and the transient copies of loading."""
LOAD_OVERHEAD = 256 << 20
"""Bytes on top of the weights for a short prompt's forward."""


@dataclass(frozen=True)
class TextDims:
    """The language model's sizes that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False


def _number(section: dict, key: str, default: float) -> float:
    value = section.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def _int(section: dict, key: str, default: int) -> int:
    return int(_number(section, key, default))


def text_section(config: dict) -> dict:
    """The language model's part of a config dict: ``text_config`` if there is one, else the top level."""
    sub = config.get("text_config")
    return sub if isinstance(sub, dict) else config


def text_dims(config: dict) -> TextDims:
    """``TextDims`` of a (resolved, i.e. defaults filled in) config dict."""
    text = text_section(config)
    hidden = _int(text, "hidden_size", 0)
    heads = _int(text, "num_attention_heads", max(1, hidden // 64))
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return TextDims(hidden=hidden, layers=_int(text, "num_hidden_layers", 0),
                    intermediate=_int(text, "intermediate_size", 4 * hidden), vocab=_int(text, "vocab_size", 0),
                    heads=heads, kv_heads=_int(text, "num_key_value_heads", heads),
                    head_dim=_int(text, "head_dim", max(1, hidden // heads)), tied=bool(tied))


def layer_parameters(dims: TextDims) -> int:
    """One decoder layer: q/o (h x H d), k/v (h x H_kv d), gated MLP (3 h I), two norms."""
    attention = 2 * dims.hidden * dims.heads * dims.head_dim + 2 * dims.hidden * dims.kv_heads * dims.head_dim
    return attention + 3 * dims.hidden * dims.intermediate + 2 * dims.hidden


def text_parameters(dims: TextDims) -> int:
    """Embeddings (and an untied head), every layer and the final norm."""
    embeddings = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    return embeddings + dims.layers * layer_parameters(dims) + dims.hidden


def vision_parameters(vision: dict) -> int:
    """A vision tower: Qwen2-VL (``embed_dim``, ``depth``), Qwen2.5-VL (``depth``) or CLIP/SigLIP-style."""
    patch = _int(vision, "patch_size", 14)
    if "depth" in vision:
        qwen2 = "embed_dim" in vision
        width = _int(vision, "embed_dim" if qwen2 else "hidden_size", 1280)
        mlp = int(width * _number(vision, "mlp_ratio", 4)) if qwen2 else _int(vision, "intermediate_size", 4 * width)
        out = _int(vision, "hidden_size" if qwen2 else "out_hidden_size", width)
        merged = width * _int(vision, "spatial_merge_size", 2) ** 2
        channels = _int(vision, "in_chans", _int(vision, "in_channels", 3))
        block = 4 * width * width + (2 if qwen2 else 3) * width * mlp + 9 * width
        stem = channels * _int(vision, "temporal_patch_size", 2) * patch * patch * width
        return stem + _int(vision, "depth", 0) * block + merged * merged + merged * out
    width = _int(vision, "hidden_size", 0)
    mlp = _int(vision, "intermediate_size", 4 * width)
    positions = (_int(vision, "image_size", 224) // patch) ** 2 + 1
    block = 4 * width * width + 2 * width * mlp + 10 * width + mlp
    stem = _int(vision, "num_channels", 3) * patch * patch * width + positions * width
    return stem + _int(vision, "num_hidden_layers", 0) * block


def parameter_count(config: dict) -> int:
    """Parameters of the model a resolved config dict describes (language model, vision tower, projector)."""
    dims = text_dims(config)
    total = text_parameters(dims)
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        total += vision_parameters(vision)
        if "depth" not in vision:  # LLaVA's two-layer projector (Qwen's merger is counted with the tower)
            width = _int(vision, "hidden_size", 0)
            total += width * dims.hidden + dims.hidden * dims.hidden + 2 * dims.hidden
    return total


def forward_bytes(dims: TextDims, tokens: int, rows: int = 1, logits_tokens: int = 1, dtype_bytes: int = 4) -> int:
    """Working memory of one forward over ``rows`` sequences of ``tokens`` tokens (see the module docstring)."""
    per_token = 4 * dims.hidden + 2 * (dims.heads + dims.kv_heads) * dims.head_dim + 5 * dims.intermediate
    return dtype_bytes * rows * (tokens * per_token + logits_tokens * 2 * dims.vocab)


def kv_cache_bytes(dims: TextDims, tokens: int, dtype_bytes: int = 4) -> int:
    """Keys and values of every layer for ``tokens`` positions."""
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * tokens * dtype_bytes


def streamed_prune_bytes(dims: TextDims, samples: int, tokens: int, batch: int, dtype_bytes: int = 4) -> int:
    """``vlsparse prune``'s peak: the stem and one block resident, every sample's hidden states kept
    (twice: a block's inputs and outputs), one forward over a batch, and one sample's full logits."""
    stem = dims.vocab * dims.hidden * (1 if dims.tied else 2) * dtype_bytes
    block = layer_parameters(dims) * dtype_bytes
    kept = 2 * samples * tokens * dims.hidden * dtype_bytes
    return stem + block + kept + forward_bytes(dims, tokens, rows=min(batch, samples), logits_tokens=0,
                                               dtype_bytes=dtype_bytes) + 3 * tokens * dims.vocab * dtype_bytes


def check_prune_fits(config: dict, samples: int, tokens: int, batch: int) -> None:
    """``vlsparse prune`` of a resolved config with ``samples`` text windows of ``tokens`` (0 for VLMs,
    whose prompts are used as they are) must fit; checked before the model is built."""
    need = streamed_prune_bytes(text_dims(config), samples, tokens, batch)
    if tokens:
        check_fits(need, f"pruning with {param('samples', samples)} and {param('seq_len', f'{tokens:,}')}",
                   f"use a shorter {param('seq_len')} or fewer {param('samples')}")
    else:
        check_fits(need, "pruning", "use a smaller model or a machine with more memory")


# ----------------------------------------------------------------------------- available memory


def meminfo_available(text: str) -> int | None:
    """Bytes of ``MemAvailable`` in the text of ``/proc/meminfo`` (None if absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under a cgroup v2 memory limit (None without one)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = (root / "memory.current").read_text().strip()
    except OSError:
        return None
    if not limit.isdigit() or not current.isdigit():
        return None
    return max(0, int(limit) - int(current))


def available_bytes() -> int | None:
    """Memory this process can still take without swapping, or None if unknown."""
    try:
        found = meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        found = None
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = cgroup_available()
    return found if limit is None else min(found, limit)


def gib(n: int | float) -> str:
    """Bytes as GiB with one decimal: ``31.2 GiB``."""
    return f"{n / 2**30:,.1f} GiB"


def check_fits(need: int, what: str, hint: str, error: type[VlsparseError] = InputError) -> None:
    """Raise ``error`` when ``need`` bytes exceed the available memory (no check if that is unknown)."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    available = available_bytes()
    if available is None or need <= available:
        return
    raise error(f"{what} needs about {gib(need)} of memory, {gib(available)} available",
                f"{hint}; {SKIP_ENV}=1 skips this check")


def calibration_tokens(calibration) -> int:
    """Tokens of the longest input of a ``search.calibration.CalibrationSet`` as far as known before
    it is prepared: the asked-for ``seq_len``, or a longer text window."""
    texts = [int(s.input_ids.numel()) for s in calibration.samples if s.input_ids is not None]
    return max([int(calibration.seq_len), *texts])


def check_sequence_fits(loaded, tokens: int, option: str = param("seq_len"), kv_cache: bool = False,
                        logits_tokens: int = 1) -> None:
    """For a loaded model: one forward over ``tokens`` tokens (plus its KV cache) must fit."""
    dims = text_dims(loaded.model.config.get_text_config().to_dict())
    width = loaded.dtype.itemsize
    need = forward_bytes(dims, tokens, logits_tokens=logits_tokens, dtype_bytes=width)
    if kv_cache:
        need += kv_cache_bytes(dims, tokens, width)
    check_fits(need, f"a forward over {tokens:,} tokens of {loaded.name}",
               f"use a shorter {option} or shorter calibration inputs")
