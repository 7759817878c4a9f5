"""The sparsity profile: the only contract between the offline half and the runtime.

A ``Profile`` serialises to YAML (read with ``yaml.safe_load`` only) plus an
optional safetensors sidecar beside it (``NAME.yaml`` -> ``NAME.safetensors``)
for large arrays (static block masks, core-neuron indices), referenced by name.
The YAML is written after the sidecar and records its sha256 (``sidecar_sha256``);
``load_profile`` refuses a sidecar that does not match, and checks every field
(``vlsparse.profile.checks``) so that a profile that loads runs.

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

from vlsparse.profile import checks
from vlsparse.profile.layout import check_layout
from vlsparse.atomic import atomic_file
from vlsparse.errors import ProfileError
from vlsparse.patterns import PATTERNS as PATTERN_TABLE

PROFILE_VERSION = 1

PATTERN_BUDGETS: dict[str, tuple[str, ...]] = {name: module.BUDGETS for name, module in PATTERN_TABLE.items()}
"""Budget names of each pattern (the pattern modules' ``BUDGETS``, ``vlsparse.patterns``)."""
PATTERNS = tuple(PATTERN_BUDGETS)
PATTERN_PARAMS: dict[str, tuple[str, ...]] = {name: module.PARAMS for name, module in PATTERN_TABLE.items()}
MASK_PATTERNS = tuple(name for name, module in PATTERN_TABLE.items() if module.USES_MASK)

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
    """The data that produced a profile.

    ``seq_len``: the samples' mean length as seen; ``target_seq_len``: the ``seq_len`` that was asked
    for (what a recipe replays; None in profiles written before it was recorded).
    """

    source: str
    samples: int
    seq_len: int
    seed: int
    target_seq_len: int | None = None
    layout: dict | None = None  # the ranges the calibration prompts covered (vlsparse.profile.layout)


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

    ``pruning``, ``core``, ``tokens`` and ``kv`` are plain mappings whose schemas are ``vlsparse.profile.pruning``,
    ``.core``, ``.tokens`` and ``.kv``; ``tensors`` are the sidecar arrays (not in
    the YAML).
    """

    model: ModelFingerprint
    calibration: Calibration | None = None
    attention: AttentionProfile | None = None
    pruning: dict[str, Any] | None = None
    core: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    kv: dict[str, Any] | None = None
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
        out["calibration"] = {k: v for k, v in asdict(profile.calibration).items()
                              if v is not None or k not in ("target_seq_len", "layout")}
    if profile.attention is not None:
        att = profile.attention
        out["attention"] = {
            "block_size": att.block_size,
            "recall_target": att.recall_target,
            **({} if att.tail_recall_target is None else {"tail_recall_target": att.tail_recall_target}),
            **({"dense_tail": True} if att.dense_tail else {}),
            "last_q": att.last_q,
            "layers": [
                {"layer": li, "heads": [head_to_dict(hi, h) for hi, h in enumerate(heads)]}
                for li, heads in enumerate(att.layers)
            ],
        }
    if profile.pruning is not None:
        out["pruning"] = profile.pruning
    if profile.core is not None:
        out["core"] = profile.core
    for name in ("tokens", "kv"):
        if getattr(profile, name) is not None:
            out[name] = getattr(profile, name)
    return out


def head_to_dict(index: int, head: HeadProfile) -> dict[str, Any]:
    """One head as the YAML lists it (``index`` is its position in the layer)."""
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


class _NoAliasDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that writes a shared value out in full (the loader refuses aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def save_profile(profile: Profile, path: str | Path, force: bool = False) -> Path:
    """Write the sidecar (if the profile has tensors), then ``path`` (YAML), each atomically.

    The YAML is written last and records the sidecar's sha256 (``sidecar_sha256``), so a
    YAML and a sidecar that were not written together are refused on load. An existing
    profile is replaced only with ``force`` (the output rule of ``vlsparse.atomic``).
    """
    path = Path(path)
    data = profile_to_dict(profile)
    blob = None
    if profile.tensors:
        import torch
        from safetensors.torch import save

        blob = save({k: torch.as_tensor(v).contiguous() for k, v in profile.tensors.items()})
        data["sidecar_sha256"] = checks.sha256_hex(blob)
    text = yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=100)
    if blob is not None:
        with atomic_file(sidecar_path(path), "wb", force=force) as handle:
            handle.write(blob)
    with atomic_file(path, "w", force=force) as handle:
        handle.write(text)
    return path


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile and its sidecar; every problem becomes a one-line ``ProfileError``.

    The YAML is bounded (size, nesting, no aliases) before it is built; a recorded sidecar
    hash must match; masks must be valid tile masks (``vlsparse.profile.checks``).
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} not found", "give the path of a YAML written by `vlsparse profile`")
    data = checks.read_yaml(path)
    try:
        profile = profile_from_dict(data)
        recorded = checks.recorded_sidecar_hash(data)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc.message}", exc.hint or checks.REGENERATE) from exc
    side = sidecar_path(path)
    profile.tensors = checks.read_sidecar(side, recorded, str(path))
    try:
        checks.masks_present(profile.attention.layers if profile.attention else [], profile.tensors, side.name)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc.message}", exc.hint) from exc
    return profile


def profile_from_dict(data: Any) -> Profile:
    """Build a ``Profile`` from YAML data, checking every field it reads (one-line ``ProfileError``)."""
    if not isinstance(data, dict):
        raise ProfileError(f"the top level should be a mapping, got {checks.describe(data)}")
    version = checks.value_of(data, "version", "the profile")
    if not isinstance(version, int) or isinstance(version, bool) or version != PROFILE_VERSION:
        raise ProfileError(f"version {checks.describe(version)} is not supported (this vlsparse reads version "
                           f"{PROFILE_VERSION})", "regenerate it with this version of `vlsparse profile`")
    m = checks.sub_mapping(data, "model", "the profile")
    model = ModelFingerprint(
        architecture=checks.text(m, "architecture", "model"),
        name=checks.text(m, "name", "model"),
        num_layers=checks.integer(m, "num_layers", "model", 1, checks.MAX_COUNT),
        num_heads=checks.integer(m, "num_heads", "model", 1, checks.MAX_COUNT),
        num_kv_heads=checks.integer(m, "num_kv_heads", "model", 1, checks.MAX_COUNT),
        head_dim=checks.integer(m, "head_dim", "model", 1, checks.MAX_COUNT),
        config_sha256=checks.text(m, "config_sha256", "model"),
    )
    calibration = None
    if data.get("calibration") is not None:
        c = checks.sub_mapping(data, "calibration", "the profile")
        calibration = Calibration(
            source=checks.text(c, "source", "calibration"),
            samples=checks.integer(c, "samples", "calibration"),
            seq_len=checks.integer(c, "seq_len", "calibration"),
            seed=checks.integer(c, "seed", "calibration", -(2**63), 2**63 - 1),
            target_seq_len=checks.integer(c, "target_seq_len", "calibration", 1, default=None)
            if c.get("target_seq_len") is not None else None,
            layout=check_layout(c["layout"], "calibration") if c.get("layout") is not None else None,
        )
    attention = None
    if data.get("attention") is not None:
        attention = _attention_from_dict(checks.sub_mapping(data, "attention", "the profile"), model)
    pruning = checks.sub_mapping(data, "pruning", "the profile", default=None)
    core = checks.sub_mapping(data, "core", "the profile", default=None)
    tokens = checks.sub_mapping(data, "tokens", "the profile", default=None)
    kv = checks.sub_mapping(data, "kv", "the profile", default=None)
    for name, section in (("pruning", pruning), ("core", core), ("tokens", tokens), ("kv", kv)):
        if section is not None:
            checks.plain_data(section, name)
    if core is not None:
        from vlsparse.profile.core import core_settings

        try:  # what the core runtime will read: refused now, not when it is attached
            core_settings(core, model.num_layers)
        except ProfileError as exc:
            raise ProfileError(exc.message, exc.hint or "recalibrate with `vlsparse calibrate`") from exc
    if tokens is not None:
        from vlsparse.profile.tokens import token_settings

        token_settings(tokens, model.num_layers)  # what the token runtime will read, refused now
    if kv is not None:
        from vlsparse.profile.kv import kv_settings

        kv_settings(kv)
    return Profile(model=model, calibration=calibration, attention=attention, pruning=pruning, core=core,
                   tokens=tokens, kv=kv, version=version)


def _attention_from_dict(a: dict, model: ModelFingerprint) -> AttentionProfile:
    layers_raw = checks.sequence(a, "layers", "attention")
    if len(layers_raw) != model.num_layers:
        raise ProfileError(f"attention has {len(layers_raw)} layers but the model fingerprint says {model.num_layers}")
    layers: list[list[HeadProfile]] = []
    for li, entry in enumerate(layers_raw):
        where = f"attention.layers[{li}]"
        listed = checks.integer(entry, "layer", where, 0, checks.MAX_INT)
        if listed != li:
            raise ProfileError(f"{where} is listed as layer {listed}; layers must be in order")
        heads_raw = checks.sequence(entry, "heads", where)
        if len(heads_raw) != model.num_heads:
            raise ProfileError(f"{where} has {len(heads_raw)} heads but the model has {model.num_heads}")
        layers.append([_head_from_dict(h, hi, f"{where}.heads[{hi}]") for hi, h in enumerate(heads_raw)])
    tail = a.get("tail_recall_target")
    return AttentionProfile(
        layers=layers,
        block_size=checks.block_size(a, "attention"),
        recall_target=checks.number(a, "recall_target", "attention", default=0.95),
        last_q=checks.integer(a, "last_q", "attention", 1, checks.MAX_LAST_Q, default=64),
        tail_recall_target=None if tail is None else checks.number(a, "tail_recall_target", "attention"),
        dense_tail=checks.flag(a, "dense_tail", "attention", False),
    )


def _head_from_dict(h: Any, index: int, where: str) -> HeadProfile:
    listed = checks.integer(h, "head", where, 0, checks.MAX_INT, default=index)
    if listed != index:
        raise ProfileError(f"{where} is listed as head {listed}; heads must be in order")
    pattern = checks.text(h, "pattern", where)
    if pattern not in PATTERN_BUDGETS:
        raise ProfileError(f"{where} has unknown pattern {checks.describe(pattern)} (known: {', '.join(PATTERNS)})")
    names = PATTERN_BUDGETS[pattern]
    budget = checks.sub_mapping(h, "budget", where, default={})
    checks.named_values(budget, names, "budget", where, pattern)
    budget_abs = checks.sub_mapping(h, "budget_abs", where, default={})
    checks.named_values(budget_abs, names, "budget_abs", where, pattern)
    params = checks.sub_mapping(h, "params", where, default={})
    checks.named_values(params, PATTERN_PARAMS[pattern], "params", where, pattern)
    for name in PATTERN_TABLE[pattern].REQUIRED_PARAMS:
        if name not in params:
            raise ProfileError(f"{where}: {pattern} pattern needs params.{name}")
    mask = checks.value_of(h, "mask", where, default=None)
    if pattern in MASK_PATTERNS and not (isinstance(mask, str) and mask):
        raise ProfileError(f"{where}: {pattern} pattern needs `mask` (a sidecar tensor name), "
                           f"got {checks.describe(mask)}")
    if pattern not in MASK_PATTERNS and mask is not None:
        raise ProfileError(f"{where}: `mask` applies only to {'/'.join(MASK_PATTERNS)} heads, not {pattern}")
    fraction = "a fraction in [0, 1]"
    return HeadProfile(
        pattern=pattern,
        budget={k: checks.number(budget, k, f"{where}.budget", what=fraction) for k in budget},
        budget_abs={k: checks.integer(budget_abs, k, f"{where}.budget_abs") for k in budget_abs},
        params={k: checks.integer(params, k, f"{where}.params", 1 if k == "stride" else 0) for k in params},
        recall_min=checks.number(h, "recall_min", where, default=1.0),
        recall_mean=checks.number(h, "recall_mean", where, default=1.0),
        tail_recall_min=checks.number(h, "tail_recall_min", where, default=1.0),
        density=checks.number(h, "density", where, default=1.0),
        mask=mask,
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


def with_section(fingerprint: ModelFingerprint, name: str, section: dict, base: Profile | None = None) -> Profile:
    """``base`` with its section ``name`` (``core``, ``tokens``, ``kv``) replaced by ``section``, or a new profile
    holding only that section, its calibration taken from the section's own ``calibration`` entry."""
    if base is None:
        c = section["calibration"]
        return Profile(model=fingerprint, calibration=Calibration(c["source"], c["samples"], c["seq_len"], c["seed"]),
                       **{name: section})
    check_profile_matches(base, fingerprint)
    setattr(base, name, section)
    return base
