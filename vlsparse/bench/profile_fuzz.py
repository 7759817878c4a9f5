"""Profile fuzzing: mutate a valid profile and check that it either runs or is one ``ProfileError``.

A case is a valid profile (YAML data and sidecar tensors, from ``base_profile``) with one to
three mutations: wrong types, numbers as strings, NaN/inf, negative or huge numbers, lists for
scalars, deep nesting, missing and extra keys, unhashable values, shared values (YAML aliases),
wrong mask tensors, a sidecar that does not belong to the YAML, and raw-text damage (alias
bombs, deep flow nesting, truncation, tags, unhashable keys). Some mutations keep the profile
valid but change it (patterns, budgets, block size, masks), so that loaded cases exercise the
runtime. ``run_case`` loads a case and, if it loads, runs a prefill and one decode step with the sparse
runtime (and the core runtime, when the profile has a core section) attached. Shared by
``tests/test_profile_fuzz.py`` and ``benchmarks/fuzz_profiles.py``.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlsparse.profile import (PATTERN_BUDGETS, PATTERNS, AttentionProfile, Calibration, HeadProfile, Profile,
                              head_to_dict)

RAN, PROFILE_ERROR = "ran", "ProfileError"
CORE = {"version": 1, "neurons": {"alpha": 0.2, "beta": 0.5, "layers": {"first": 0, "last": 1}, "sample_tokens": 64},
        "tokens": {"layer": 0, "min_keep": 0.1, "max_keep": 0.5, "score": "text"},
        "layers": [{"layer": 0, "threshold": 0.01}, {"layer": 1, "threshold": 0.02}]}
TOKENS = {"version": 1, "method": "fastv", "keep": 0.5, "params": {"k": 1, "rows": "all"},
          "schedule": [{"layer": 0, "keep": 0.5}], "guard": {"auto": False, "candidates": []}}


@dataclass
class FuzzCase:
    """One mutated profile: what was done, the YAML bytes, and the sidecar bytes (None: no sidecar)."""

    mutations: list[str]
    text: bytes
    sidecar: bytes | None


@dataclass
class Outcome:
    """What a case did: ``RAN``, ``PROFILE_ERROR`` or another exception's type name."""

    case: FuzzCase
    result: str
    message: str
    parse_seconds: float


def random_head(rng: random.Random, mask_name: str | None = None) -> HeadProfile:
    """A valid head of a random pattern (``static`` only when a mask name is given)."""
    patterns = [p for p in PATTERNS if p != "static" or mask_name]
    pattern = rng.choice(patterns)
    names = PATTERN_BUDGETS[pattern]
    if pattern == "block_sparse":
        names = (rng.choice(names),)
    budget = {name: rng.choice([0.0, 1.0, round(rng.random(), 4)]) for name in names}
    params = {"stride": rng.randint(1, 40), "phase": rng.randint(0, 40)} if pattern == "grid" else {}
    return HeadProfile(pattern, budget, {name: rng.randint(0, 500) for name in budget}, params,
                       recall_min=rng.random(), recall_mean=rng.random(), density=rng.choice([0.0, 1.0, rng.random()]),
                       mask=mask_name if pattern == "static" else None)


def random_mask(rng: random.Random):
    import torch

    side = rng.randint(1, 9)
    dtype = rng.choice([torch.bool, torch.uint8, torch.int64])
    return (torch.rand(side, side, generator=torch.Generator().manual_seed(rng.randrange(2**31))) < 0.4).to(dtype)


def base_profile(fingerprint, seed: int = 0) -> Profile:
    """A valid profile for a model with this fingerprint: every pattern, a static mask, core, tokens and pruning."""
    rng = random.Random(seed)
    layers = [[random_head(rng, f"static.l{li}.h{hi}") for hi in range(fingerprint.num_heads)]
              for li in range(fingerprint.num_layers)]
    layers[0][0] = HeadProfile("static", {"select": 0.3}, {"select": 2}, mask="static.l0.h0", density=0.3)
    layers[0][1] = HeadProfile("grid", {"local": 0.05}, {"local": 6}, {"stride": 8, "phase": 1}, density=0.2)
    tensors = {h.mask: random_mask(rng) for layer in layers for h in layer if h.mask}
    core = copy.deepcopy(CORE)
    core["neurons"]["layers"]["last"] = core["tokens"]["layer"] = fingerprint.num_layers - 1
    core["layers"] = core["layers"][: fingerprint.num_layers]
    return Profile(model=fingerprint, calibration=Calibration("fuzz", 2, 256, 0),
                   attention=AttentionProfile(layers=layers, tail_recall_target=0.9), core=core,
                   tokens=copy.deepcopy(TOKENS),
                   pruning={"method": "wanda", "ratio": 0.5, "groups": [{"group": "lm.0", "sparsity": 0.5}]},
                   tensors=tensors)


# ----------------------------------------------------------------------------- mutations of the data


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def odd_value(rng: random.Random) -> Any:
    """A value of a wrong type or out of range (or, now and then, a plausible one)."""
    makers = [
        lambda: rng.choice(["", "x", "0.5", "64", "1e3", "nan", "true", "null", "static", "a" * 300]),
        lambda: rng.choice([float("nan"), float("inf"), -float("inf"), 1e300, -1e-300]),
        lambda: -rng.randint(1, 10**6), lambda: 10 ** rng.randint(10, 40), lambda: rng.uniform(-10, 10),
        lambda: rng.choice([0, 1, -1, 0.0, 1.0, 2, 64, 64.0, 7.5, -3]), lambda: rng.choice([True, False]),
        lambda: None, lambda: rng.choice([[1, 2], [], ["static"], {"a": 1}, {}, {"mask": [1]}]),
        lambda: nested(rng.randint(2, 60)), lambda: rng.randint(0, 300), lambda: rng.random(),
    ]
    return rng.choice(makers)()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a YAML-like value (mappings and lists)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, prefix + (i,))
    return out


def _node(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def mutate_data(rng: random.Random, data: dict) -> str:
    """One change to ``data`` in place; returns its description."""
    paths = [p for p in _paths(data) if p]
    path = rng.choice(paths)
    parent, key = _node(data, path[:-1]), path[-1]
    op = rng.choice(["replace", "replace", "replace", "delete", "extra", "list", "share", "deep"])
    where = ".".join(map(str, path))
    if op == "replace":
        parent[key] = odd_value(rng)
    elif op == "delete":
        del parent[key]
    elif op == "extra":
        target = parent if isinstance(parent, dict) else data
        target[rng.choice(["extra", "mask", "budget", "params", "seed", "unknown_key"])] = odd_value(rng)
    elif op == "list":
        lists = [p for p in paths if isinstance(_node(data, p), list)]
        path = rng.choice(lists) if lists else path
        target = _node(data, path)
        if isinstance(target, list) and target:
            if rng.random() < 0.5:
                target.pop(rng.randrange(len(target)))
            else:
                target.append(copy.deepcopy(rng.choice(target)))
        where = ".".join(map(str, path))
    elif op == "share":  # the same object twice: yaml.safe_dump writes an anchor and an alias (no cycles)
        other = rng.choice([p for p in paths if p[: len(path)] != path and path[: len(p)] != p] or [path])
        parent[key] = _node(data, other) if other != path else parent[key]
    else:
        parent[key] = nested(rng.randint(20, 80))
    return f"{op} {where}"


def mutate_valid(rng: random.Random, data: dict, tensors: dict) -> str:
    """A change that keeps the profile valid: a head, the block size, the tail settings, a mask."""
    att = data.get("attention")
    if not isinstance(att, dict) or not isinstance(att.get("layers"), list):
        return "valid: nothing (no attention)"
    choice = rng.choice(["head", "head", "block_size", "tail", "mask"])
    if choice == "block_size":
        att["block_size"] = rng.choice([16, 32, 64, 128, 256])
    elif choice == "tail":
        att["dense_tail"], att["last_q"] = rng.choice([True, False]), rng.choice([1, 7, 64, 500])
    elif choice == "mask" and tensors:
        tensors[rng.choice(sorted(tensors))] = random_mask(rng)
    else:
        layer = rng.choice([x for x in att["layers"] if isinstance(x, dict)] or [None])
        heads = layer.get("heads") if isinstance(layer, dict) else None
        if isinstance(heads, list) and heads:
            index = rng.randrange(len(heads))
            name = f"fuzz.mask{index}"
            head = random_head(rng, name)
            if head.mask:
                tensors[name] = random_mask(rng)
            heads[index] = head_to_dict(index, head)
    return f"valid {choice}"


def mutate_tensors(rng: random.Random, tensors: dict) -> str:
    """Replace, rename or drop a sidecar tensor (wrong dtype, shape, values), or add an unrelated one."""
    import torch

    name = rng.choice(sorted(tensors)) if tensors else "none"
    bad = {
        "float": lambda: torch.rand(4, 4), "3d": lambda: torch.ones(2, 4, 4, dtype=torch.bool),
        "1d": lambda: torch.ones(4, dtype=torch.bool), "empty": lambda: torch.ones(0, 0, dtype=torch.bool),
        "0x3": lambda: torch.ones(0, 3, dtype=torch.bool), "scalar": lambda: torch.tensor(True),
        "non_square": lambda: torch.ones(3, 4, dtype=torch.bool), "twos": lambda: torch.full((4, 4), 2, dtype=torch.uint8),
        "negative": lambda: -torch.ones(4, 4, dtype=torch.int32), "half": lambda: torch.ones(4, 4, dtype=torch.float16),
        "huge_side": lambda: torch.ones(1, 20000, dtype=torch.bool),
    }
    op = rng.choice([*bad, "rename", "drop", "extra"])
    if op in bad:
        tensors[name] = bad[op]()
    elif op == "rename" and tensors:
        tensors[name + ".renamed"] = tensors.pop(name)
    elif op == "drop" and tensors:
        del tensors[name]
    else:
        tensors["unrelated"] = torch.randn(3)
    return f"tensor {op} {name}"


# ----------------------------------------------------------------------------- mutations of the files


def mutate_text(rng: random.Random, text: str) -> str:
    """Damage the YAML text: alias bombs, deep nesting, truncation, tags, odd keys, stray characters."""
    bomb = "bomb0: &b0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]\n" for i in range(1, rng.randint(2, 10)))
    depth = rng.choice([31, 33, 100, 3000])
    additions = {
        "alias_bomb": bomb,
        "deep_flow": "deep: " + "[" * depth + "]" * depth + "\n",
        "deep_block": "deep:\n" + "".join("  " * i + "-\n" for i in range(1, rng.choice([30, 40, 500]))),
        "tag": rng.choice(["x: !!python/object/apply:os.system ['true']\n", "x: !!binary aGVsbG8=\n",
                           "x: !!set {a, b}\n", "x: !!omap [{a: 1}]\n", "x: 2001-12-14\n", "x: !custom 1\n"]),
        "unhashable_key": "? [a, b]\n: 1\n",
        "second_document": "---\nversion: 1\n",
        "big_int": "x: " + "9" * 5000 + "\n",
    }
    op = rng.choice([*additions, "truncate", "garbage", "replace_number"])
    if op in additions:
        return text + additions[op]
    if op == "truncate":
        return text[: rng.randrange(len(text) + 1)]
    if op == "replace_number":
        return text.replace(rng.choice([": 0.", ": 64", ": 1.0", ": 0\n"]), rng.choice([": '0.", ": .nan #", ": -9", ": [0"]), 1)
    chars = list(text)
    for _ in range(rng.randint(1, 5)):
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(list(":[]{}&*!|>-#%@`\t\n\"'\\,?")))
    return "".join(chars)


def make_case(rng: random.Random, data: dict, tensors: dict) -> FuzzCase:
    """A mutated copy of a valid profile (``data`` from ``profile_to_dict``, ``tensors`` its sidecar)."""
    from safetensors.torch import save

    from vlsparse.profile.checks import sha256_hex

    data, tensors, done = copy.deepcopy(data), dict(tensors), []
    families = rng.choices(["data", "valid", "tensors", "sidecar", "text"], weights=[10, 4, 2, 1, 2],
                           k=rng.choice([1, 1, 1, 2, 3]))
    for family in families:
        if family == "data":
            done.append(mutate_data(rng, data))
        elif family == "valid":
            done.append(mutate_valid(rng, data, tensors))
        elif family == "tensors":
            done.append(mutate_tensors(rng, tensors))
    blob = save({k: v.contiguous() for k, v in tensors.items()}) if tensors else None
    if blob is not None and isinstance(data, dict):
        data["sidecar_sha256"] = sha256_hex(blob)
    if "sidecar" in families:
        op = rng.choice(["stale_hash", "no_hash", "truncated", "garbage", "missing"])
        done.append(f"sidecar {op}")
        if op == "stale_hash" and isinstance(data, dict):
            data["sidecar_sha256"] = sha256_hex(b"another sidecar")
        elif op == "no_hash" and isinstance(data, dict):
            data.pop("sidecar_sha256", None)
        elif op == "truncated" and blob:
            blob = blob[: rng.randrange(len(blob))]
        elif op == "garbage":
            blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        elif op == "missing":
            blob = None
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    if "text" in families:
        text = mutate_text(rng, text)
        done.append("text")
    raw = text.encode()
    if rng.random() < 0.01:
        raw, done = raw[:40] + b"\xff\xfe" + raw[40:], done + ["invalid utf-8"]
    return FuzzCase(done, raw, blob)


# ----------------------------------------------------------------------------- running


def _run_prefill(loaded, profile, inputs) -> None:
    """Attach the sparse runtime (sparse in every layer), the core runtime and the token runtime (which
    replaces core tokens, as in ``vlsparse run``), run a prefill and a decode step, detach."""
    import torch

    from vlsparse.kernels.core_runtime import attach_profile_core, detach_core
    from vlsparse.kernels.runtime import attach, detach
    from vlsparse.kernels.token_runtime import attach_profile_tokens, detach_tokens

    runtime = core = tokens = None
    try:
        runtime = attach(loaded, profile, min_len=0, dense_above=1.0)
        core = attach_profile_core(loaded, profile, tokens=profile.tokens is None, sparse_runtime=runtime)
        tokens = attach_profile_tokens(loaded, profile, sparse_runtime=runtime)
        with torch.inference_mode():  # the prefill, then one decode step (where core neurons apply)
            loaded.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        if tokens is not None:
            detach_tokens(loaded, tokens)
        if core is not None:
            detach_core(loaded, core)
        if runtime is not None:
            detach(loaded, runtime)


def run_case(case: FuzzCase, folder: Path, loaded, inputs) -> Outcome:
    """Write ``case`` to ``folder``, load it and, if it loads, run a prefill on ``loaded`` with ``inputs``."""
    from vlsparse.errors import ProfileError
    from vlsparse.profile import load_profile, sidecar_path

    path = Path(folder) / "case.yaml"
    path.write_bytes(case.text)
    side = sidecar_path(path)
    if case.sidecar is None:
        side.unlink(missing_ok=True)
    else:
        side.write_bytes(case.sidecar)
    start = time.perf_counter()
    try:
        try:
            profile = load_profile(path)
        finally:
            seconds = time.perf_counter() - start
        _run_prefill(loaded, profile, inputs)
    except ProfileError as exc:
        return Outcome(case, PROFILE_ERROR, exc.one_line(), seconds)
    except Exception as exc:  # noqa: BLE001 - the point: anything else is a finding
        return Outcome(case, type(exc).__name__, f"{type(exc).__name__}: {exc}"[:300], seconds)
    return Outcome(case, RAN, "", seconds)


def prompt_inputs(loaded, images: int = 6):
    """A prompt with ``images`` small coloured images (text only for a language model)."""
    from PIL import Image

    colours = ["red", "blue", "green", "white", "black", "yellow"]
    pictures = [Image.new("RGB", (16, 16), colours[i % len(colours)]) for i in range(images)]
    if not loaded.adapter.is_vlm:
        return loaded.prepare([], "what color is the circle ? " * 8 * images)
    return loaded.prepare(pictures, "what color is the circle ?")


def fuzz(loaded, inputs, folder: Path, n: int, seed: int = 0):
    """Yield the outcome of ``n`` cases (case ``i`` uses ``random.Random(f"{seed}:{i}")``)."""
    from vlsparse.profile import profile_to_dict

    base = base_profile(loaded.adapter.fingerprint(), seed)
    data = profile_to_dict(base)
    for i in range(n):
        yield run_case(make_case(random.Random(f"{seed}:{i}"), data, base.tensors), folder, loaded, inputs)
