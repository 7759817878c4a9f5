"""Checks behind ``vlsparse.profile``: bounded YAML, typed fields, sidecar integrity, mask tensors.

Every problem is a one-line ``ProfileError`` naming the field; ``load_profile`` adds the file.
Nothing here converts a value with ``int()``/``float()``: a field has the right type or is refused
(``bool`` is not a number), numbers are finite and inside their range.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from vlsparse.errors import ProfileError

REGENERATE = "regenerate it with `vlsparse profile`"
MAX_YAML_BYTES = 64 * 2**20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 2_000_000
MAX_INT = 2**31 - 1
MAX_COUNT = 4096
"""Most layers, heads, KV heads or head dimension a fingerprint may give."""
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
"""``block_size`` is a power of two in this range (the kernels' tile; vlsparse writes 64)."""
MAX_LAST_Q = 2**20
MAX_MASK_BLOCKS = 16384
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
REQUIRED = object()


def describe(value: Any, limit: int = 40) -> str:
    """A short ``repr`` for messages (large or nested values are cut)."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a huge integer"
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- YAML


def _yaml_loader() -> type:
    return yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


def _check_yaml_shape(text: str, name: str) -> None:
    """Walk the parser's events (no recursion, no construction): refuse aliases, deep nesting, too many nodes."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, yaml.AliasEvent):
            raise ProfileError(f"profile {name} uses a YAML alias (*{event.anchor}), which vlsparse does not read",
                               "write the value out in full, or " + REGENERATE)
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ProfileError(f"profile {name} has more than {MAX_YAML_NODES:,} YAML nodes", REGENERATE)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ProfileError(f"profile {name} nests deeper than {MAX_YAML_DEPTH} levels", REGENERATE)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of ``path``, bounded: size, nesting depth and node count are checked first."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ProfileError(f"profile {path} is {size / 2**20:.0f} MiB, more than a profile can be "
                               f"({MAX_YAML_BYTES // 2**20} MiB)", "give the YAML written by `vlsparse profile`")
        with path.open("rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"profile {path} cannot be read ({exc.strerror or exc})", "check the path and its permissions") from exc
    if len(raw) > MAX_YAML_BYTES:
        raise ProfileError(f"profile {path} is larger than {MAX_YAML_BYTES // 2**20} MiB", REGENERATE)
    try:
        text = raw.decode("utf-8")
        _check_yaml_shape(text, str(path))
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a safe loader (SafeConstructor)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, OverflowError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        problem = getattr(exc, "problem", None) or (None if isinstance(exc, yaml.YAMLError) else describe(str(exc), 80))
        where = ", ".join(([f"line {line + 1}"] if line is not None else []) + ([problem] if problem else []))
        where = f" ({where})" if where else ""
        raise ProfileError(f"profile {path} is not valid YAML{where}", REGENERATE) from exc


# ----------------------------------------------------------------------------- typed fields


def value_of(mapping: Any, key: str, where: str, default: Any = REQUIRED) -> Any:
    """``mapping[key]``; a missing or null optional field gives ``default``."""
    if not isinstance(mapping, dict):
        raise ProfileError(f"{where} should be a mapping, got {describe(mapping)}")
    value = mapping.get(key)
    if value is None:
        if default is REQUIRED:
            raise ProfileError(f"missing `{key}` in {where}")
        return default
    return value


def integer(mapping: Any, key: str, where: str, low: int = 0, high: int = MAX_INT, default: Any = REQUIRED) -> int:
    value = value_of(mapping, key, where, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProfileError(f"`{key}` in {where} should be an integer in [{low}, {high}], got {describe(value)}")
    return value


def number(mapping: Any, key: str, where: str, low: float = 0.0, high: float = 1.0, default: Any = REQUIRED,
           what: str | None = None) -> float:
    """A finite int or float in ``[low, high]`` (default: a fraction), as float."""
    value = value_of(mapping, key, where, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        what = what or f"a number in [{low:g}, {high:g}]"
        raise ProfileError(f"`{key}` in {where} should be {what}, got {describe(value)}")
    return float(value)


def text(mapping: Any, key: str, where: str, default: Any = REQUIRED) -> str:
    value = value_of(mapping, key, where, default)
    if not isinstance(value, str):
        raise ProfileError(f"`{key}` in {where} should be a string, got {describe(value)}")
    return value


def flag(mapping: Any, key: str, where: str, default: bool) -> bool:
    value = value_of(mapping, key, where, default)
    if not isinstance(value, bool):
        raise ProfileError(f"`{key}` in {where} should be true or false, got {describe(value)}")
    return value


def sub_mapping(mapping: Any, key: str, where: str, default: Any = REQUIRED) -> dict:
    value = value_of(mapping, key, where, default)
    if value is default:
        return value
    if not isinstance(value, dict):
        raise ProfileError(f"`{key}` in {where} should be a mapping, got {describe(value)}")
    return value


def sequence(mapping: Any, key: str, where: str) -> list:
    value = value_of(mapping, key, where)
    if not isinstance(value, list):
        raise ProfileError(f"`{key}` in {where} should be a list, got {describe(value)}")
    return value


def named_values(mapping: dict, allowed: tuple[str, ...], field: str, where: str, pattern: str) -> None:
    """Refuse keys of ``mapping`` (a head's budget, budget_abs or params) that ``pattern`` does not have."""
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        names = ", ".join(sorted(describe(key) for key in unknown))
        raise ProfileError(f"{where}: {field} [{names}] does not apply to pattern {pattern}"
                           f" (it has: {', '.join(allowed) or 'none'})")


def block_size(mapping: dict, where: str) -> int:
    value = integer(mapping, "block_size", where, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, default=64)
    if value & (value - 1):
        raise ProfileError(f"`block_size` in {where} should be a power of two in [{MIN_BLOCK_SIZE}, "
                           f"{MAX_BLOCK_SIZE}], got {value}", REGENERATE)
    return value


def method_params(section: dict, where: str, method: Any, check: Any, excluded: tuple[str, ...] = ()) -> dict:
    """The ``params`` mapping of a profile section naming a registered ``method`` module (``tokens``, ``kv``):
    each key one of ``method.DEFAULTS`` (less ``excluded``, which the section holds elsewhere), each value
    one that ``check(key, value)`` passes (it returns None, or what the value should be); else ``ProfileError``."""
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ProfileError(f"{where}.params should be a mapping, got {describe(params)}")
    for key, value in params.items():
        if key not in method.DEFAULTS or key in excluded:
            known = ", ".join(sorted(k for k in method.DEFAULTS if k not in excluded)) or "none"
            raise ProfileError(f"{where}.params: {method.NAME} has no parameter {describe(key)} "
                               f"(its parameters: {known})")
        wanted = check(key, value)
        if wanted is not None:
            raise ProfileError(f"{where}.params.{key} should be {wanted}, got {describe(value)}")
    return params


def optional_mappings(section: dict, where: str, keys: tuple[str, ...]) -> None:
    """``ProfileError`` unless each of ``keys`` in ``section`` is absent, null or a mapping."""
    for key in keys:
        if section.get(key) is not None and not isinstance(section[key], dict):
            raise ProfileError(f"{where}.{key} should be a mapping, got {describe(section[key])}")


def plain_data(value: Any, where: str) -> None:
    """Free-form sections (``pruning``, ``core``): only mappings, lists, strings, numbers, booleans and nulls,
    at most ``MAX_YAML_DEPTH`` deep and ``MAX_YAML_NODES`` large (an explicit stack: no recursion)."""
    stack, seen = [(value, where, 1)], 0
    while stack:
        item, at, depth = stack.pop()
        seen += 1
        if depth > MAX_YAML_DEPTH or seen > MAX_YAML_NODES:
            raise ProfileError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels or is too large", REGENERATE)
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise ProfileError(f"{at} has a key {describe(key)}; keys should be names", REGENERATE)
                stack.append((child, f"{at}.{key}", depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]", depth + 1) for i, child in enumerate(item))
        elif not isinstance(item, (str, int, float, bool, type(None))):
            raise ProfileError(f"{at} holds a {type(item).__name__}; profiles hold only mappings, lists, "
                               "strings, numbers, booleans and nulls", REGENERATE)


# ----------------------------------------------------------------------------- sidecar and masks


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def recorded_sidecar_hash(data: Any) -> str | None:
    """The sidecar's sha256 recorded in the YAML (``sidecar_sha256``), or None for older profiles."""
    value = data.get("sidecar_sha256") if isinstance(data, dict) else None
    if value is not None and (not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value)):
        raise ProfileError(f"`sidecar_sha256` should be 64 lowercase hex digits, got {describe(value)}", REGENERATE)
    return value


def read_sidecar(side: Path, recorded: str | None, yaml_name: str) -> dict[str, Any]:
    """The sidecar's tensors, after checking that it is the one the YAML was written with (if recorded).

    No sidecar: no tensors (a mask the YAML refers to is then reported missing)."""
    if not side.is_file():
        return {}
    try:
        blob = side.read_bytes()
    except OSError as exc:
        raise ProfileError(f"profile sidecar {side} cannot be read ({exc.strerror or exc})",
                           "check its permissions") from exc
    if recorded is not None and sha256_hex(blob) != recorded:
        raise ProfileError(f"profile sidecar {side} does not belong to {yaml_name} (its sha256 differs from the "
                           "one the YAML records; the two were not written together)",
                           "restore the pair that `vlsparse profile` wrote, or " + REGENERATE)
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ProfileError(f"profile sidecar {side} is unreadable", "regenerate the profile") from exc


def mask_tensor(tensor: Any, name: str, where: str) -> None:
    """A static head's tile mask: 2-D, square, non-empty, bool or 0/1 integers (the runtime resizes it
    to each prompt's block grid by nearest neighbour, ``kernels.indices.resize_block_mask``)."""
    import torch

    what = f"mask {name!r} of {where}"
    integers = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in integers:
        dtype = getattr(tensor, "dtype", type(tensor).__name__)
        raise ProfileError(f"{what} is {dtype}; a static mask holds booleans or 0/1 integers", REGENERATE)
    shape = tuple(tensor.shape)
    if tensor.dim() != 2 or shape[0] != shape[1]:
        raise ProfileError(f"{what} has shape {list(shape)}; the runtime needs a square [blocks, blocks] tile mask",
                           REGENERATE)
    if not 1 <= shape[0] <= MAX_MASK_BLOCKS:
        raise ProfileError(f"{what} has shape {list(shape)}; a tile mask has 1 to {MAX_MASK_BLOCKS} blocks a side",
                           REGENERATE)
    if tensor.dtype != torch.bool and not bool(((tensor == 0) | (tensor == 1)).all()):
        raise ProfileError(f"{what} holds values other than 0 and 1", REGENERATE)


def masks_present(layers: list, tensors: dict[str, Any], side_name: str) -> None:
    """Every head's ``mask`` names a valid tile mask among the sidecar ``tensors``."""
    for li, heads in enumerate(layers):
        for hi, head in enumerate(heads):
            if head.mask is None:
                continue
            if head.mask not in tensors:
                raise ProfileError(f"attention.layers[{li}].heads[{hi}] refers to mask {head.mask!r} missing "
                                   f"from {side_name}", "keep the .safetensors file beside the YAML")
            mask_tensor(tensors[head.mask], head.mask, f"attention.layers[{li}].heads[{hi}]")
