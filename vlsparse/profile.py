"""The sparsity profile: the only contract between the offline half and the runtime.

A ``Profile`` serialises to YAML (read with ``yaml.safe_load`` only) plus an
optional safetensors sidecar beside it (``NAME.yaml`` -> ``NAME.safetensors``)
for large arrays (static block masks, core-neuron indices), referenced by name.

Attention heads are described per **query** head with named budgets:

=========================  ==========================================  ==============================
pattern                    ``budget`` (fractions of the length N)      ``params`` (integers)
=========================  ==========================================  ==============================
dense                      {}                                          {}
a_shape                    sink, local                                 {}
vertical_slash             vertical, slash                             {}
block_sparse               blocks (top-k share of causal key blocks)   {}
                           or mass (cumulative block mass, gamma)
grid                       local                                       stride, phase
modality_vertical_slash    text_vertical, text_slash,                  {}
                           image_vertical, image_slash
static                     select (share of key blocks kept)           {} (+ ``mask``: sidecar name)
=========================  ==========================================  ==============================

``budget_abs`` holds the same budgets in tokens (or blocks for ``blocks`` and
``select``) as seen at the calibration length; the runtime scales ``budget``
by the actual length. ``density`` is the kept fraction of causal query-key
pairs in the kernels' 64x64 block layout at the calibration length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlsparse.atomic import atomic_file
from vlsparse.errors import ProfileError

PROFILE_VERSION = 1

PATTERN_BUDGETS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "a_shape": ("sink", "local"),
    "vertical_slash": ("vertical", "slash"),
    "block_sparse": ("blocks", "mass"),
    "grid": ("local",),
    "modality_vertical_slash": ("text_vertical", "text_slash", "image_vertical", "image_slash"),
    "static": ("select",),
}
PATTERNS = tuple(PATTERN_BUDGETS)

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                         "quantization_config", "_attn_implementation", "_attn_implementation_autoset",
                         "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


@dataclass
class ModelFingerprint:
    """What a profile was made for; loading checks it against the model."""

    architecture: str
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    config_sha256: str


@dataclass
class Calibration:
    """The data that produced a profile."""

    source: str
    samples: int
    seq_len: int
    seed: int


@dataclass
class HeadProfile:
    """One query head's prefill attention pattern and budget."""

    pattern: str = "dense"
    budget: dict[str, float] = field(default_factory=dict)
    budget_abs: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    recall_min: float = 1.0
    recall_mean: float = 1.0
    tail_recall_min: float = 1.0
    density: float = 1.0
    mask: str | None = None


@dataclass
class AttentionProfile:
    """Per-layer, per-query-head patterns of the language decoder.

    ``recall_target``: the recall every head kept on every calibration sample;
    ``tail_recall_target``: the same over each sample's last query block (None: not recorded);
    ``dense_tail``: the runtime computes the last query block of every prefill dense (older
    profiles lack it: off).
    """

    layers: list[list[HeadProfile]]
    block_size: int = 64
    recall_target: float = 0.95
    last_q: int = 64
    tail_recall_target: float | None = None
    dense_tail: bool = False


@dataclass
class Profile:
    """A model's sparsity profile (attention patterns, pruning record, core calibration).

    ``pruning`` and ``core`` are plain mappings whose schema belongs to
    ``vlsparse.compress``; ``tensors`` are the sidecar arrays (not in the YAML).
    """

    model: ModelFingerprint
    calibration: Calibration | None = None
    attention: AttentionProfile | None = None
    pruning: dict[str, Any] | None = None
    core: dict[str, Any] | None = None
    tensors: dict[str, Any] = field(default_factory=dict, repr=False)
    version: int = PROFILE_VERSION


def config_sha256(config_dict: dict[str, Any]) -> str:
    """Hash of a model config with run-time and version keys removed (stable across saves)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    blob = json.dumps(clean(config_dict), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sidecar_path(yaml_path: str | Path) -> Path:
    return Path(yaml_path).with_suffix(".safetensors")


# ----------------------------------------------------------------------------- serialisation


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"version": profile.version, "model": asdict(profile.model)}
    if profile.calibration is not None:
        out["calibration"] = asdict(profile.calibration)
    if profile.attention is not None:
        att = profile.attention
        out["attention"] = {
            "block_size": att.block_size,
            "recall_target": att.recall_target,
            **({} if att.tail_recall_target is None else {"tail_recall_target": att.tail_recall_target}),
            **({"dense_tail": True} if att.dense_tail else {}),
            "last_q": att.last_q,
            "layers": [
                {"layer": li, "heads": [_head_to_dict(hi, h) for hi, h in enumerate(heads)]}
                for li, heads in enumerate(att.layers)
            ],
        }
    if profile.pruning is not None:
        out["pruning"] = profile.pruning
    if profile.core is not None:
        out["core"] = profile.core
    return out


def _head_to_dict(index: int, head: HeadProfile) -> dict[str, Any]:
    d: dict[str, Any] = {"head": index, "pattern": head.pattern}
    if head.budget:
        d["budget"] = {k: float(v) for k, v in head.budget.items()}
    if head.budget_abs:
        d["budget_abs"] = {k: int(v) for k, v in head.budget_abs.items()}
    if head.params:
        d["params"] = {k: int(v) for k, v in head.params.items()}
    d["recall_min"] = round(float(head.recall_min), 6)
    d["recall_mean"] = round(float(head.recall_mean), 6)
    d["tail_recall_min"] = round(float(head.tail_recall_min), 6)
    d["density"] = round(float(head.density), 6)
    if head.mask is not None:
        d["mask"] = head.mask
    return d


def save_profile(profile: Profile, path: str | Path, force: bool = False) -> Path:
    """Write ``path`` (YAML) and, if the profile has tensors, its sidecar; both atomically.

    An existing profile is replaced only with ``force`` (the output rule of ``vlsparse.atomic``).
    """
    path = Path(path)
    text = yaml.safe_dump(profile_to_dict(profile), sort_keys=False, default_flow_style=None, width=100)
    if profile.tensors:
        import torch
        from safetensors.torch import save

        tensors = {k: torch.as_tensor(v).contiguous() for k, v in profile.tensors.items()}
        with atomic_file(sidecar_path(path), "wb", force=force) as handle:
            handle.write(save(tensors))
    with atomic_file(path, "w", force=force) as handle:
        handle.write(text)
    return path


def load_profile(path: str | Path) -> Profile:
    """Read a profile; every problem becomes a one-line ``ProfileError``."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} not found", "give the path of a YAML written by `vlsparse profile`")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ProfileError(f"profile {path} is not valid YAML{where}", "regenerate it with `vlsparse profile`") from exc
    try:
        profile = profile_from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc.message}", exc.hint or "regenerate it with `vlsparse profile`") from exc
    side = sidecar_path(path)
    if side.is_file():
        from safetensors.torch import load_file

        try:
            profile.tensors = load_file(str(side))
        except Exception as exc:  # safetensors raises its own error types
            raise ProfileError(f"profile sidecar {side} is unreadable", "regenerate the profile") from exc
    missing = [h.mask for heads in (profile.attention.layers if profile.attention else []) for h in heads
               if h.mask is not None and h.mask not in profile.tensors]
    if missing:
        raise ProfileError(f"profile {path} refers to mask {missing[0]!r} missing from {side.name}",
                           "keep the .safetensors file beside the YAML")
    return profile


def _require(mapping: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ProfileError(f"missing `{key}` in {where}")
    value = mapping[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProfileError(f"`{key}` in {where} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def profile_from_dict(data: Any) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError("top level is not a mapping")
    version = _require(data, "version", int, "the profile")
    if version != PROFILE_VERSION:
        raise ProfileError(f"version {version} is not supported (this vlsparse reads version {PROFILE_VERSION})",
                           "regenerate it with this version of `vlsparse profile`")
    m = _require(data, "model", dict, "the profile")
    model = ModelFingerprint(
        architecture=_require(m, "architecture", str, "model"),
        name=_require(m, "name", str, "model"),
        num_layers=_require(m, "num_layers", int, "model"),
        num_heads=_require(m, "num_heads", int, "model"),
        num_kv_heads=_require(m, "num_kv_heads", int, "model"),
        head_dim=_require(m, "head_dim", int, "model"),
        config_sha256=_require(m, "config_sha256", str, "model"),
    )
    calibration = None
    if data.get("calibration") is not None:
        c = _require(data, "calibration", dict, "the profile")
        calibration = Calibration(
            source=_require(c, "source", str, "calibration"),
            samples=_require(c, "samples", int, "calibration"),
            seq_len=_require(c, "seq_len", int, "calibration"),
            seed=_require(c, "seed", int, "calibration"),
        )
    attention = None
    if data.get("attention") is not None:
        attention = _attention_from_dict(_require(data, "attention", dict, "the profile"), model)
    pruning = data.get("pruning")
    core = data.get("core")
    for key, value in (("pruning", pruning), ("core", core)):
        if value is not None and not isinstance(value, dict):
            raise ProfileError(f"`{key}` should be a mapping")
    return Profile(model=model, calibration=calibration, attention=attention, pruning=pruning, core=core,
                   version=version)


def _attention_from_dict(a: dict, model: ModelFingerprint) -> AttentionProfile:
    layers_raw = _require(a, "layers", list, "attention")
    if len(layers_raw) != model.num_layers:
        raise ProfileError(f"attention has {len(layers_raw)} layers but the model fingerprint says {model.num_layers}")
    layers: list[list[HeadProfile]] = []
    for li, entry in enumerate(layers_raw):
        where = f"attention layer {li}"
        if _require(entry, "layer", int, where) != li:
            raise ProfileError(f"{where} is listed as layer {entry['layer']}; layers must be in order")
        heads_raw = _require(entry, "heads", list, where)
        if len(heads_raw) != model.num_heads:
            raise ProfileError(f"{where} has {len(heads_raw)} heads but the model has {model.num_heads}")
        layers.append([_head_from_dict(h, f"{where} head {hi}") for hi, h in enumerate(heads_raw)])
    return AttentionProfile(
        layers=layers,
        block_size=int(a.get("block_size", 64)),
        recall_target=float(a.get("recall_target", 0.95)),
        last_q=int(a.get("last_q", 64)),
        tail_recall_target=float(a["tail_recall_target"]) if "tail_recall_target" in a else None,
        dense_tail=bool(a.get("dense_tail", False)),
    )


def _head_from_dict(h: dict, where: str) -> HeadProfile:
    pattern = _require(h, "pattern", str, where)
    if pattern not in PATTERN_BUDGETS:
        raise ProfileError(f"{where} has unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")
    budget = h.get("budget", {}) or {}
    if not isinstance(budget, dict):
        raise ProfileError(f"`budget` in {where} should be a mapping")
    unknown = set(budget) - set(PATTERN_BUDGETS[pattern])
    if unknown:
        raise ProfileError(f"{where}: budget {sorted(unknown)} does not apply to pattern {pattern}")
    for key, value in budget.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ProfileError(f"{where}: budget `{key}` must be a fraction in [0, 1], got {value!r}")
    params = h.get("params", {}) or {}
    budget_abs = h.get("budget_abs", {}) or {}
    for name, mapping in (("params", params), ("budget_abs", budget_abs)):
        if not isinstance(mapping, dict) or any(not isinstance(v, int) or isinstance(v, bool) for v in mapping.values()):
            raise ProfileError(f"`{name}` in {where} should map names to integers")
    if pattern == "grid" and "stride" not in params:
        raise ProfileError(f"{where}: grid pattern needs params.stride")
    if pattern == "static" and not h.get("mask"):
        raise ProfileError(f"{where}: static pattern needs `mask` (a sidecar tensor name)")
    return HeadProfile(
        pattern=pattern,
        budget={k: float(v) for k, v in budget.items()},
        budget_abs=dict(budget_abs),
        params=dict(params),
        recall_min=float(h.get("recall_min", 1.0)),
        recall_mean=float(h.get("recall_mean", 1.0)),
        tail_recall_min=float(h.get("tail_recall_min", 1.0)),
        density=float(h.get("density", 1.0)),
        mask=h.get("mask"),
    )


# ----------------------------------------------------------------------------- validation


def check_profile_matches(profile: Profile, fingerprint: ModelFingerprint, profile_name: str = "the profile") -> None:
    """Raise a one-line ``ProfileError`` if ``profile`` was made for another model."""
    have, want = profile.model, fingerprint
    for attr in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(have, attr) != getattr(want, attr):
            raise ProfileError(
                f"{profile_name} was made for {have.name} ({have.architecture}, {have.num_layers} layers, "
                f"{have.num_heads}/{have.num_kv_heads} heads), not this model ({want.name}: {want.architecture}, "
                f"{want.num_layers} layers, {want.num_heads}/{want.num_kv_heads} heads)",
                "run `vlsparse profile` on this model",
            )
    if have.config_sha256 != want.config_sha256:
        raise ProfileError(
            f"{profile_name} was made for {have.name}, whose config differs from this model's ({want.name})",
            "run `vlsparse profile` on this model",
        )
