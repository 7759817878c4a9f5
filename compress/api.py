"""``prune_model``: the Python API behind ``vlsparse prune``.

    from vlsparse.compress.api import PruneConfig, prune_model
    result = prune_model("demo", "demo-pruned", PruneConfig(ratio=0.5, allocation="ecoflap"))

Steps: check every argument and the output path (before any work); build the
model on the meta device and load its stem; build calibration batches; choose
per-block keep counts with the ``allocation`` policy (ECoFLaP water-filling, OWL or
uniform; N:M is uniform by construction); run the sequential loop with the pruning
``method`` (Wanda); write a plain Hugging Face folder (or a packed one) atomically,
with ``vlsparse.yaml`` recording the run.

The ``pruning:`` section it records is ``vlsparse.profile.pruning`` (the schema lives there);
the allocation policies are ``vlsparse.compress.allocations``, the pruning methods
``vlsparse.compress.methods``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlsparse.compress.allocations import DEFAULT, STRUCTURED, allocation_named
from vlsparse.compress.allocations.ecoflap import SCORERS
from vlsparse.compress.allocations.fill import split_count
from vlsparse.compress.calibration import TEXT_BATCH, build_calibration
from vlsparse.compress.checkpoint import (PROFILE_NAME, CheckpointReader, check_output, copy_side_files, dir_size,
                                          write_pruned_checkpoint)
from vlsparse.compress.methods import method_named
from vlsparse.compress.packed import unpack_mask, write_packed_checkpoint
from vlsparse.compress.sequential import Block, Progress, StreamedModel, build_skeleton, find_blocks, sequential_prune
from vlsparse.compress.wanda import parse_structure
from vlsparse.errors import InputError, ProfileError, param
from vlsparse.phases import Phases
from vlsparse.rss import current_rss_mb, peak_rss_mb, reset_peak_rss

SCOPES = ("global", "per-tower")


@dataclass
class PruneConfig:
    """What ``vlsparse prune`` does; every field has the CLI flag of the same name.

    ``allocation=None`` means ``allocations.DEFAULT`` (ecoflap) for unstructured
    sparsity and ``allocations.STRUCTURED`` (uniform) for N:M (which fixes every
    matrix at N/M). ``ecoflap_samples`` calibration batches feed the zeroth-order
    scores (each costs ``2 * groups * draws`` streamed forwards); ``samples`` feed
    Wanda and OWL. Errors name the fields (``ratio``); the CLI prints them as flags.
    """

    ratio: float = 0.5
    method: str = "wanda"
    allocation: str | None = None
    structure: str = "unstructured"
    scope: str = "global"
    max_deviation: float = 0.1
    calib: str | None = None
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    epsilon: float = 1e-3
    draws: int = 1
    ecoflap_samples: int = 8
    ecoflap_scores: str = "zeroth-order"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    pack: bool = False
    force: bool = False
    profile: str | None = None

    def resolved_allocation(self) -> str:
        if self.allocation is not None:
            return self.allocation
        return STRUCTURED if parse_structure(self.structure) else DEFAULT

    def validate(self) -> None:
        """Raise a one-line ``InputError`` for any bad combination."""
        if not 0.0 < self.ratio < 1.0:
            raise InputError(f"{param('ratio')} must be between 0 and 1 (exclusive), got {self.ratio}",
                             f"e.g. {param('ratio', 0.5)} prunes half of the weights")
        method_named(self.method)
        nm = parse_structure(self.structure)
        if nm and abs(self.ratio - nm[0] / nm[1]) > 1e-9:
            raise InputError(f"{param('structure', self.structure)} prunes exactly {nm[0]}/{nm[1]} of every row, "
                             f"so it needs {param('ratio', f'{nm[0] / nm[1]:g}')}, not {self.ratio:g}",
                             f"use {param('ratio', f'{nm[0] / nm[1]:g}')} or {param('structure', 'unstructured')}")
        if self.allocation is not None:
            allocation_named(self.allocation)
        if nm and self.resolved_allocation() != STRUCTURED:
            raise InputError(f"{param('structure', self.structure)} fixes every matrix at {nm[0]}/{nm[1]}, so it "
                             f"cannot follow a per-layer {param('allocation', self.allocation)}",
                             f"use {param('allocation', STRUCTURED)} (the default with N:M)")
        if self.scope not in SCOPES:
            raise InputError(f"unknown {param('scope')} {self.scope!r}", f"use {' or '.join(SCOPES)}")
        if not 0.0 <= self.max_deviation < 1.0:
            raise InputError(f"{param('max_deviation')} must be in [0, 1), got {self.max_deviation}")
        for name in ("samples", "seq_len", "draws", "ecoflap_samples"):
            if getattr(self, name) < 1:
                raise InputError(f"{param(name)} must be at least 1, got {getattr(self, name)}")
        if self.ecoflap_scores not in SCORERS:
            raise InputError(f"unknown {param('ecoflap_scores', self.ecoflap_scores)}", f"use {' or '.join(SCORERS)}")
        if not (math.isfinite(self.epsilon) and 0 < self.epsilon <= 1):
            raise InputError(f"{param('epsilon')} must be a finite number in (0, 1], got {self.epsilon}",
                             f"e.g. {param('epsilon', '1e-3')} (the ECoFLaP default)")


@dataclass
class PruneResult:
    """What a run produced; ``groups`` and ``matrices`` are the rows recorded in ``vlsparse.yaml``."""

    out: Path
    model_name: str
    achieved: float
    groups: list[dict] = field(default_factory=list)
    matrices: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    model_mb: float = 0.0
    out_mb: float = 0.0
    profile_source: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase of the run (the time split): building, calibration data, allocation scores,
    the sequential loop's parts, writing."""


# ----------------------------------------------------------------------------- model choice


def default_model(cwd: str | Path = ".") -> tuple[str, str]:
    """(model, why) when none is given: the model of the newest profile in ``./profiles/``, else the demo."""
    from vlsparse.profile import load_profile

    folder = Path(cwd) / "profiles"
    profiles = sorted(folder.glob("*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    from vlsparse.models.source import DEMO_NAMES, SMOLLM2_NAMES
    from vlsparse.smollm import FOLDER_NAME as SMOLLM2_FOLDER

    for path in profiles:
        try:
            name = load_profile(path).model.name
        except ProfileError:
            continue
        if name in DEMO_NAMES or name in SMOLLM2_NAMES:
            return name, f"the model of the newest profile, {path}"
        if name == SMOLLM2_FOLDER:
            return SMOLLM2_NAMES[0], f"the model of the newest profile, {path}"
        for candidate in (Path(name), Path(cwd) / name):
            if (candidate / "config.json").is_file():
                return str(candidate), f"the model of the newest profile, {path}"
        return "demo", f"the embedded demo model (the newest profile, {path}, names {name}, which is not found here)"
    return "demo", "the embedded demo model (no usable profile in ./profiles/)"


def _find_source_profile(config: PruneConfig, fingerprint, cwd: Path):
    """The attention profile to carry into the checkpoint: ``--profile``, else the newest matching one."""
    from vlsparse.profile import check_profile_matches, load_profile

    if config.profile:
        profile = load_profile(config.profile)
        check_profile_matches(profile, fingerprint, f"profile {config.profile}")
        return profile, str(config.profile)
    folder = cwd / "profiles"
    if not folder.is_dir():
        return None, None
    for path in sorted(folder.glob("*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            profile = load_profile(path)
            check_profile_matches(profile, fingerprint)
        except ProfileError:
            continue
        if profile.attention is not None or profile.core is not None or profile.tokens is not None:
            return profile, str(path)
    return None, None


# ----------------------------------------------------------------------------- allocation


def _allocation_towers(blocks: list[Block], scope: str) -> list[list[int]]:
    if scope == "global":
        return [list(range(len(blocks)))]
    vision = [i for i, b in enumerate(blocks) if b.tower != "lm"]
    lm = [i for i, b in enumerate(blocks) if b.tower == "lm"]
    return [t for t in (vision, lm) if t]


def allocate(streamed: StreamedModel, batches: list[dict], config: PruneConfig, progress: Progress,
             table: dict | None = None) -> tuple[list[int], list[float] | None, dict]:
    """(keep count per block, score per block or None, the policy's record for the profile), by the
    ``config.allocation`` policy of ``table`` (default: the registry, ``vlsparse.compress.allocations``)."""
    policy = allocation_named(config.resolved_allocation(), table)
    blocks = streamed.blocks
    sizes = [b.size() for b in blocks]
    scores, record = policy.scores(streamed, batches, config, progress)
    keeps = [0] * len(blocks)
    for tower in _allocation_towers(blocks, config.scope):
        got = policy.keep_counts([sizes[i] for i in tower], None if scores is None else [scores[i] for i in tower],
                                 config)
        for i, k in zip(tower, got):
            keeps[i] = k
    return keeps, scores, record


def _prune_counts(blocks: list[Block], keeps: list[int]) -> dict[str, int]:
    """Weights to zero in each matrix: a group's count split over its matrices by size."""
    counts: dict[str, int] = {}
    for block, keep in zip(blocks, keeps):
        names = block.weight_names()
        sizes = [block.linears[n[: -len(".weight")]].weight.numel() for n in names]
        for name, n in zip(names, split_count(block.size() - keep, sizes)):
            counts[name] = n
    return counts


def _check_nm(blocks: list[Block], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for block in blocks:
        for name, linear in block.linears.items():
            if linear.in_features % nm[1]:
                raise InputError(f"{name} has {linear.in_features} input features, not a multiple of {nm[1]}",
                                 f"use {param('structure', 'unstructured')} for this model")


# ----------------------------------------------------------------------------- the run


def default_out(model_name: str, config: PruneConfig, cwd: Path) -> Path:
    tag = config.structure.replace(":", "of") if parse_structure(config.structure) else config.resolved_allocation()
    return cwd / f"{Path(model_name).name}-{tag}-{round(config.ratio * 100)}"


def prune_model(model: str | Path = "demo", out: str | Path | None = None, config: PruneConfig | None = None,
                progress: Progress | None = None, cwd: str | Path | None = None) -> PruneResult:
    """Prune ``model`` (``demo``, a folder or a hub id) into ``out``; the input is never modified."""
    from vlsparse.models.adapter import Adapter
    from vlsparse.models.families import family_for
    from vlsparse.models.processors import load_processor
    from vlsparse.memory import check_prune_fits
    from vlsparse.models.source import check_model_folder, resolve_model_folder, resolved_config
    from vlsparse.profile.pruning import (achieved_sparsity, calibration_entry, group_row, matrix_row,
                                          pruned_profile, pruning_section)

    config = config or PruneConfig()
    config.validate()
    progress = progress or (lambda _: None)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    nm = parse_structure(config.structure)
    folder = resolve_model_folder(model)
    family_class = family_for(check_model_folder(folder))
    family = family_class.family
    text_tokens = 0 if family_class.is_vlm else config.seq_len  # VLM prompts are used as they are
    check_prune_fits(resolved_config(folder), config.samples, text_tokens, TEXT_BATCH)
    name = "demo" if str(model) == "demo" else folder.name
    out = Path(out) if out is not None else default_out(name, config, cwd)
    check_output(out, folder, config.force,
                 inputs=[p for p in (config.profile, config.calib) if p and Path(p).exists()])

    start = time.perf_counter()
    phase = Phases()
    progress(f"Building {name} on the meta device")
    with phase("build on the meta device"):
        processor = load_processor(folder, family)
        skeleton = build_skeleton(folder, family)
    reset_peak_rss()  # from here on (code loaded, no weights read) the peak measures this run's data
    start_rss = current_rss_mb()
    adapter = Adapter(skeleton, family, name=name)
    blocks = find_blocks(skeleton, adapter)
    _check_nm(blocks, nm)
    reader = CheckpointReader(folder)
    streamed = StreamedModel(skeleton, reader, blocks, spill_parent=_existing_parent(out))
    try:
        with phase("read the stem (embeddings, norms, head)"):
            streamed.load_stem()
        fingerprint = adapter.fingerprint()
        source_profile, source_profile_path = _find_source_profile(config, fingerprint, cwd)

        progress("Preparing calibration data")
        with phase("calibration data"):
            calib = build_calibration(adapter, processor, config.calib, config.samples, config.seq_len, config.seed)
        with phase(f"allocation scores ({config.resolved_allocation()})"):
            keeps, scores, policy_record = allocate(streamed, calib.batches, config, progress)
        counts = _prune_counts(blocks, keeps)

        method = method_named(config.method)

        def prune_block(block: Block, stats: dict) -> dict:
            return {n: method.prune_layer(skeleton.get_parameter(n), stats[n], counts[n], nm)
                    for n in block.weight_names()}

        sequential_prune(streamed, calib.batches, prune_block, new_stats=method.new_stats, progress=progress,
                         phases=phase)

        ckpt_masks = {streamed.key_of[n]: bits for n, bits in streamed.masks.items()}
        matrices, groups = [], []
        for i, block in enumerate(blocks):
            if not block.linears:  # nothing pruned here (Gemma 3's projector pools and multiplies, no Linear)
                continue
            group_zeros = 0
            for n in block.weight_names():
                shape = tuple(skeleton.get_parameter(n).shape)
                zeros = int((~unpack_mask(streamed.masks[n], shape)).sum())
                group_zeros += zeros
                matrices.append(matrix_row(streamed.key_of[n], block.name, shape, zeros))
            groups.append(group_row(block.name, block.tower, block.size(), group_zeros,
                                    None if scores is None else scores[i]))
        achieved = achieved_sparsity(groups)

        seconds = time.perf_counter() - start
        peak = peak_rss_mb()
        section = pruning_section(
            method=config.method, allocation=config.resolved_allocation(), structure=config.structure,
            scope=config.scope, ratio=config.ratio, max_deviation=config.max_deviation, packed=config.pack,
            calibration=calibration_entry(calib.source, calib.samples, calib.seq_len, calib.seed, calib.tokens,
                                          target_seq_len=config.seq_len),
            policy=policy_record, model=name, path=str(folder.resolve()), seconds=seconds, peak_rss_mb=peak,
            start_rss_mb=start_rss, model_mb=reader.nbytes() / 2**20, groups=groups, matrices=matrices,
            attention_profile=source_profile_path)

        progress(f"Writing {out}")
        with phase("write the checkpoint"):
            _write(out, config, reader, folder, ckpt_masks, pruned_profile(fingerprint, section, source_profile),
                   progress, source=streamed.checkpoint_tensor)
        return PruneResult(out=out, model_name=name, achieved=achieved, groups=groups, matrices=matrices,
                           seconds=time.perf_counter() - start, peak_rss_mb=peak, start_rss_mb=start_rss,
                           model_mb=reader.nbytes() / 2**20, out_mb=dir_size(out) / 2**20,
                           profile_source=source_profile_path, phases=dict(phase.seconds))
    finally:
        streamed.close()  # the updated weights (SparseGPT) are in the checkpoint now


def _existing_parent(out: Path) -> Path | None:
    """The nearest existing folder above ``out`` (where temporary files go), or None."""
    for parent in out.absolute().parents:
        if parent.is_dir():
            return parent
    return None


def _write(out: Path, config: PruneConfig, reader: CheckpointReader, folder: Path, ckpt_masks: dict,
           profile, progress: Progress, source: Callable[[str], torch.Tensor]) -> None:
    """Write the checkpoint: every tensor from ``source`` (the pruned model's values), masked."""
    from vlsparse.atomic import atomic_dir
    from vlsparse.profile import save_profile

    def replacement(key: str) -> torch.Tensor | None:
        bits = ckpt_masks.get(key)
        if bits is None:
            return None
        tensor = source(key)
        return tensor.masked_fill_(~unpack_mask(bits, tensor.shape), 0)

    def on_file(name: str) -> None:
        progress(f"Writing {name}")

    with atomic_dir(out, force=config.force) as tmp:
        copy_side_files(folder, tmp)
        if config.pack:
            write_packed_checkpoint(reader, tmp, ckpt_masks, on_file, source=source)
        else:
            write_pruned_checkpoint(reader, tmp, replacement, on_file)
        save_profile(profile, tmp / PROFILE_NAME)
        for path in tmp.iterdir():  # temporary files are created private; the checkpoint is for sharing
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
