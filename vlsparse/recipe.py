"""Recipes: the settings of a whole compression as one YAML file, replayed on any model.

A recipe lists the commands of a compression in order, each with its options under the
names of its command-line flags (``--seq-len`` -> ``seq_len``); an option left out takes
the command's default. Nothing in it is model-specific: no masks, no per-head results, no
paths of the model it was made on::

    vlsparse_recipe: 1
    steps:
      - profile: {calib: null, samples: 4, seq_len: 4096, seed: 0, recall: 0.95, tail_recall: 0.95,
                  dense_tail: true}
      - prune: {ratio: 0.5, method: wanda, allocation: ecoflap, structure: unstructured, scope: global,
                max_deviation: 0.1, calib: null, samples: 32, seq_len: 256, seed: 0, pack: false,
                ecoflap_samples: 8, epsilon: 0.001, draws: 1}
      - calibrate: {alpha: 0.2, beta: 0.4, neuron_layers: null, score: text, max_keep: [0.25, 0.5], ...}
      - calibrate: {tokens: fastv, keep: 0.5, token_param: {k: 2}, samples: 16, seq_len: 4096, ...}

``calib: null`` is the command's default data (demo scenes for a vision-language model, pydoc
text for a language model); a file name is read relative to the recipe's folder. A
``calibrate`` step with ``tokens`` calibrates that token-reduction method, one without it core
neurons and core tokens. Steps come in the order profile, prune, calibrate; each at most once
(calibrate: once per kind).

Replaying a recipe is ``vlsparse.recipe_apply``.

``recipe_from_profile`` reads a recipe out of any profile (every command records its options in
its section); ``save_recipe`` / ``load_recipe`` write and read the file (``load_recipe`` refuses
anything malformed with a one-line ``InputError``); ``apply_recipe`` replays it on a model:
profile -> ``WORKDIR/profile.yaml``; prune (carrying that profile) -> ``WORKDIR/checkpoint``;
calibrate on the pruned checkpoint, its sections added to the checkpoint's ``vlsparse.yaml``
(without a prune step: to ``WORKDIR/profile.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlsparse.errors import InputError, VlsparseError

RECIPE_VERSION = 1
RECIPE_KEY = "vlsparse_recipe"
LARGEST_RECIPE = 1 << 20
FIX = "fix the recipe (`vlsparse recipe export` writes a valid one)"

PROFILE_OPTIONS: dict[str, Any] = {"calib": None, "samples": 4, "seq_len": 4096, "seed": 0, "recall": 0.95,
                                   "tail_recall": None, "dense_tail": True}
PRUNE_OPTIONS: dict[str, Any] = {"ratio": 0.5, "method": "wanda", "allocation": None, "structure": "unstructured",
                                 "scope": "global", "max_deviation": 0.1, "calib": None, "samples": 32,
                                 "seq_len": 256, "seed": 0, "pack": False, "ecoflap_samples": 8, "epsilon": 1e-3,
                                 "draws": 1, "ecoflap_scores": "zeroth-order", "owl_m": 5.0, "owl_lambda": 0.08}
CORE_OPTIONS: dict[str, Any] = {"calib": None, "samples": 16, "seq_len": 4096, "seed": 0, "alpha": 0.2, "beta": 0.4,
                                "max_error": 0.5, "neuron_layers": None, "token_layers": None, "score": "text",
                                "min_keep": 0.1, "max_keep": [0.25, 0.5], "kl_budget": 0.1, "min_top1": 1.0,
                                "cats_sparsity": 0.5, "decode_tokens": 4, "guard_tokens": 32}
TOKEN_OPTIONS: dict[str, Any] = {"tokens": None, "keep": "auto", "token_param": {}, "calib": None, "samples": 16,
                                 "seq_len": 4096, "seed": 0, "guard_tokens": 32}
"""Each step's options and their defaults (the commands' defaults)."""

_INTS = {"samples", "seq_len", "seed", "ecoflap_samples", "draws", "decode_tokens", "guard_tokens"}
_NUMBERS = {"recall", "ratio", "max_deviation", "epsilon", "owl_m", "owl_lambda", "alpha", "beta", "max_error",
            "min_keep", "kl_budget", "min_top1", "cats_sparsity"}
_FRACTIONS = {"recall": (0, 1, False), "alpha": (0, 1, False), "beta": (0, 1, False), "min_keep": (0, 1, True),
              "min_top1": (0, 1, True), "tail_recall": (0, 1, True)}
_LEAST = {"samples": 1, "seq_len": 2, "ecoflap_samples": 1, "draws": 1, "decode_tokens": 1, "guard_tokens": 0}
_BOOLS = {"dense_tail", "pack"}
_TEXTS = {"method", "structure", "scope", "score", "tokens", "ecoflap_scores"}

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- from a profile


def _calib_option(source: str, default: str) -> str | None:
    """The ``calib`` option that reads ``source`` again: None for the command's default, a file name for a
    file (profiles record files by name only), the ``demo:`` name otherwise."""
    if source in ("pydoc", default):
        return None
    kind, _, name = source.partition(":")
    return name if kind in ("jsonl", "text") and name else source


def _layers_option(layers: list[int] | None) -> str | None:
    """``[2, 3, 4]`` -> ``"2-4"``, ``[1, 5]`` -> ``"1,5"``, ``[]`` -> ``"none"`` (the flags' spelling)."""
    if layers is None:
        return None
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _need(section: dict, key: str, name: str) -> Any:
    if not isinstance(section, dict) or key not in section:
        raise InputError(f"the profile's {name} section does not record `{key}`, so its command cannot be replayed",
                         "re-run that command with this version of vlsparse")
    return section[key]


def recipe_from_profile(profile) -> dict[str, Any]:
    """The recipe of the commands that made ``profile`` (a ``vlsparse.profile.Profile``): settings only."""
    from vlsparse.compress.calibration import DEMO_TASKS as PRUNE_TASKS
    from vlsparse.search.calibration import DEMO_TASKS as SEARCH_TASKS

    prune_default, search_default = f"demo:{'+'.join(PRUNE_TASKS)}", f"demo:{'+'.join(SEARCH_TASKS)}"
    steps: list[dict[str, Any]] = []
    if profile.attention is not None and profile.calibration is not None:
        c, a = profile.calibration, profile.attention
        steps.append({"profile": {
            "calib": _calib_option(c.source, search_default), "samples": c.samples,
            "seq_len": c.target_seq_len if c.target_seq_len is not None else c.seq_len, "seed": c.seed,
            "recall": a.recall_target,
            "tail_recall": a.recall_target if a.tail_recall_target is None else a.tail_recall_target,
            "dense_tail": bool(a.dense_tail)}})
    if profile.pruning is not None:
        p = profile.pruning
        c = _need(p, "calibration", "pruning")
        step = {key: _need(p, key, "pruning") for key in ("ratio", "method", "allocation", "structure", "scope",
                                                          "max_deviation")}
        step.update(calib=_calib_option(_need(c, "source", "pruning.calibration"), prune_default),
                    samples=_need(c, "samples", "pruning.calibration"),
                    seq_len=c.get("target_seq_len", _need(c, "seq_len", "pruning.calibration")),
                    seed=_need(c, "seed", "pruning.calibration"), pack=bool(p.get("packed", False)))
        if isinstance(p.get("ecoflap"), dict):
            e = p["ecoflap"]
            step.update(ecoflap_samples=e.get("samples", 8), epsilon=e.get("epsilon", 1e-3), draws=e.get("draws", 1))
            if e.get("scores", "zeroth-order") != "zeroth-order":
                step["ecoflap_scores"] = e["scores"]
        if isinstance(p.get("owl"), dict):
            step.update(owl_m=p["owl"].get("m", 5.0), owl_lambda=p["owl"].get("lam", 0.08))
        steps.append({"prune": step})
    if profile.core is not None:
        steps.append({"calibrate": _core_step(profile.core, search_default)})
    if profile.tokens is not None:
        t = profile.tokens
        c = _need(t, "calibration", "tokens")
        auto = bool((t.get("guard") or {}).get("auto", False))
        steps.append({"calibrate": {
            "tokens": _need(t, "method", "tokens"), "keep": "auto" if auto else _need(t, "keep", "tokens"),
            "token_param": dict(t.get("params") or {}),
            "calib": _calib_option(_need(c, "source", "tokens.calibration"), search_default),
            "samples": _need(c, "samples", "tokens.calibration"), "seq_len": _need(c, "seq_len", "tokens.calibration"),
            "seed": _need(c, "seed", "tokens.calibration"), "guard_tokens": c.get("max_new_tokens", 32)}})
    if not steps:
        raise InputError("the profile records no command's settings (no attention, pruning, core or tokens section)",
                         "export from a profile or checkpoint that vlsparse profile, prune or calibrate wrote")
    return {RECIPE_KEY: RECIPE_VERSION, "steps": steps}


def _core_step(core: dict, search_default: str) -> dict[str, Any]:
    c = _need(core, "calibration", "core")
    neurons, tokens = _need(core, "neurons", "core"), _need(core, "tokens", "core")
    options = core.get("options") or {}  # older profiles: what the section kept of each option
    guard = neurons.get("guard") or {}
    scores = options.get("score", [tokens.get("score", "text")])
    from vlsparse.profile.core import SCORE_RULES

    score = "auto" if len(scores) > 1 and sorted(scores) == sorted(SCORE_RULES) else scores[0]
    return {
        "calib": _calib_option(_need(c, "source", "core.calibration"), search_default),
        "samples": _need(c, "samples", "core.calibration"), "seq_len": _need(c, "seq_len", "core.calibration"),
        "seed": _need(c, "seed", "core.calibration"),
        "alpha": _need(neurons, "alpha", "core.neurons"), "beta": _need(neurons, "beta", "core.neurons"),
        "max_error": neurons.get("max_error", 0.5),
        "neuron_layers": _layers_option(options.get("neuron_layers")),
        "token_layers": _layers_option(options.get("token_layers")),
        "score": score, "min_keep": tokens.get("min_keep", 0.1),
        "max_keep": list(options.get("max_keep", [tokens.get("max_keep", 0.5)])),
        "kl_budget": tokens.get("kl_budget", 0.1), "min_top1": tokens.get("min_top1", 1.0),
        "cats_sparsity": (core.get("thresholds") or {}).get("sparsity", 0.5),
        "decode_tokens": c.get("decode_tokens", 4),
        "guard_tokens": options.get("guard_tokens", guard.get("new_tokens", 32)),
    }


# ----------------------------------------------------------------------------- the file


def recipe_text(recipe: dict[str, Any]) -> str:
    """The recipe as YAML: block style, lists inline."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def sequence(dumper, value):  # a list of numbers or names on one line; the steps one per line
        flow = all(not isinstance(v, (list, dict)) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    Dumper.add_representer(list, sequence)
    return yaml.dump(recipe, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=100)


def save_recipe(recipe: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    """Write ``recipe`` to ``path`` atomically; an existing file is replaced only with ``force`` and only if
    vlsparse wrote it (the output rule of ``vlsparse.atomic``)."""
    from vlsparse.atomic import atomic_file

    path = Path(path)
    check_recipe(recipe, str(path))
    with atomic_file(path, "w", force=force) as handle:
        handle.write(recipe_text(recipe))
    return path


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe file; anything malformed is a one-line ``InputError``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} not found", "give a YAML file written by `vlsparse recipe export`")
    if path.stat().st_size > LARGEST_RECIPE:
        raise InputError(f"recipe {path} is larger than a recipe can be ({LARGEST_RECIPE // 1024} KiB)", FIX)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{line}", FIX) from None
    check_recipe(data, str(path))
    return data


def _describe(value: Any) -> str:
    from vlsparse.profile.checks import describe

    return describe(value)


def _check_value(key: str, value: Any, where: str) -> None:
    def bad(what: str) -> InputError:
        return InputError(f"{where}: `{key}` should be {what}, got {_describe(value)}", FIX)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if key in _INTS:
        least = _LEAST.get(key, -(2**63))
        if not is_int(value) or not least <= value <= 2**63 - 1:
            raise bad(f"an integer >= {least}" if key in _LEAST else "an integer")
    elif key in _NUMBERS or key == "tail_recall":
        if key == "tail_recall" and value is None:
            return
        if not is_number(value):
            raise bad("a number")
        if key in _FRACTIONS:
            low, high, closed = _FRACTIONS[key]
            if not ((low <= value if closed else low < value) and value <= high):
                raise bad(f"a number in {'[' if closed else '('}{low}, {high}]")
        elif value < 0:
            raise bad("a number >= 0")
    elif key in _BOOLS:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key in _TEXTS:
        if not isinstance(value, str) or not value:
            raise bad("a name")
    elif key in ("calib", "allocation"):
        if value is not None and (not isinstance(value, str) or not value):
            raise bad("a name, or null for the default")
    elif key in ("neuron_layers", "token_layers"):
        ok = value is None or isinstance(value, str) or (isinstance(value, list) and all(map(is_int, value)))
        if not ok:
            raise bad("layers such as \"2-9\" or [1, 3], \"none\", or null")
    elif key == "max_keep":
        ok = isinstance(value, list) and value and all(is_number(v) and 0 < v <= 1 for v in value)
        if not ok:
            raise bad("a list of numbers in (0, 1]")
    elif key == "keep":
        if value != "auto" and not (is_number(value) and 0 < value <= 1):
            raise bad("a number in (0, 1], or auto")
    elif key == "token_param":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of parameter names to values")


def step_kind(name: str, options: dict) -> str:
    return "tokens" if name == "calibrate" and "tokens" in options else ("core" if name == "calibrate" else name)


STEP_OPTIONS = {"profile": PROFILE_OPTIONS, "prune": PRUNE_OPTIONS, "core": CORE_OPTIONS, "tokens": TOKEN_OPTIONS}
_RANK = {"profile": 0, "prune": 1, "core": 2, "tokens": 2}


def check_recipe(data: Any, name: str = "the recipe") -> None:
    """Refuse a malformed recipe with a one-line ``InputError``: unknown keys, steps or options, values of the
    wrong type or range, steps out of order (profile, prune, calibrate) or repeated."""
    if not isinstance(data, dict):
        raise InputError(f"recipe {name} should be a mapping with `{RECIPE_KEY}` and `steps`", FIX)
    unknown = sorted(set(data) - {RECIPE_KEY, "steps"}, key=str)
    if unknown:
        raise InputError(f"recipe {name}: unknown key {_describe(unknown[0])} (known: {RECIPE_KEY}, steps)", FIX)
    version = data.get(RECIPE_KEY)
    if version != RECIPE_VERSION or isinstance(version, bool):
        raise InputError(f"recipe {name}: `{RECIPE_KEY}` should be {RECIPE_VERSION}, got {_describe(version)}",
                         "export the recipe again with this version of vlsparse")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise InputError(f"recipe {name}: `steps` should be a non-empty list", FIX)
    seen: list[str] = []
    for index, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or len(step) != 1:
            raise InputError(f"recipe {name}: step {index} should be one mapping such as `- prune: {{ratio: 0.5}}`",
                             FIX)
        (step_name, options), = step.items()
        if step_name not in ("profile", "prune", "calibrate"):
            raise InputError(f"recipe {name}: step {index} is {_describe(step_name)}, not a known step "
                             "(profile, prune, calibrate)", FIX)
        options = {} if options is None else options
        where = f"recipe {name}: step {index} ({step_name})"
        if not isinstance(options, dict):
            raise InputError(f"{where} should map option names to values, got {_describe(options)}", FIX)
        kind = step_kind(step_name, options)
        known = STEP_OPTIONS[kind]
        for key, value in options.items():
            if key not in known:
                raise InputError(f"{where}: unknown option {_describe(key)} (known: {', '.join(known)})", FIX)
            _check_value(key, value, where)
        if kind in seen:
            raise InputError(f"{where} repeats a step (each command runs at most once; calibrate once with and "
                             "once without tokens)", FIX)
        if seen and _RANK[kind] < max(_RANK[s] for s in seen):
            raise InputError(f"{where} comes after a later step (the order is profile, prune, calibrate)", FIX)
        seen.append(kind)
        _check_step(kind, {**known, **options}, where)


def _check_step(kind: str, options: dict, where: str) -> None:
    """What the commands themselves would refuse, refused before any work (messages name the options)."""
    if kind != "prune" and options["seq_len"] < 128:
        raise InputError(f"{where}: `seq_len` should be at least 128, got {options['seq_len']}", FIX)
    try:
        if kind == "prune":
            from vlsparse.compress.api import PruneConfig

            PruneConfig(**options).validate()
        elif kind == "tokens":
            from vlsparse.tokens import method_named

            method_named(options["tokens"])
        elif kind == "core":
            from vlsparse.profile.core import SCORE_RULES

            if options["score"] != "auto" and options["score"] not in SCORE_RULES:
                raise InputError(f"unknown score {options['score']!r}", f"use {', '.join(SCORE_RULES)} or auto")
    except VlsparseError as exc:
        raise InputError(f"{where}: {exc.message}", exc.hint or FIX) from None
