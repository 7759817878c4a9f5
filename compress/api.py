"""``prune_model``: the Python API behind ``vlsparse prune``.

    from vlsparse.compress.api import PruneConfig, prune_model
    result = prune_model("demo", "demo-pruned", PruneConfig(ratio=0.5, allocation="ecoflap"))

Steps: check every argument and the output path (before any work); build the
model on the meta device and load its stem; build calibration batches; choose
per-block keep counts (ECoFLaP water-filling, OWL or uniform; N:M is uniform by
construction); run the sequential loop with the --method (Wanda); write a plain Hugging Face folder
(or a packed one) atomically, with ``vlsparse.yaml`` recording the run.

``pruning:`` section of ``vlsparse.yaml`` (schema owned here)::

    method: wanda                 # the fine step; compared per output row (or N:M)
    allocation: ecoflap           # ecoflap | owl | uniform
    structure: unstructured       # unstructured | 2:4 | 4:8
    scope: global                 # global | per-tower (budget split between vision side and LM)
    ratio: 0.5                    # asked-for sparsity over all pruned matrices
    achieved: 0.5                 # measured over the masks
    max_deviation: 0.1            # every group's sparsity within ratio +- this
    pruned_params: 123456         # weights in the pruned matrices
    packed: false
    calibration: {source: demo:vqa, samples: 32, seq_len: 61, seed: 0, tokens: 1952}
    ecoflap: {epsilon: 0.001, draws: 1, samples: 8, seed: 0}   # or owl: {m: 5.0, lam: 0.08}
    source: {model: demo, path: /abs/path}
    run: {seconds: 12.3, peak_rss_mb: 512.0, start_rss_mb: 400.0, model_mb: 80.0}
    groups:                       # one per block, execution order
    - {group: vision.0, tower: vision, params: 8192, keep: 4100, sparsity: 0.4995, score: 1.2e-06}
    matrices:                     # one per pruned weight (checkpoint names)
    - {name: ..., group: vision.0, shape: [32, 32], sparsity: 0.5}
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlsparse.compress import allocation as alloc
from vlsparse.compress.calibration import TEXT_BATCH, build_calibration, take_samples
from vlsparse.compress.checkpoint import (PROFILE_NAME, CheckpointReader, check_output, copy_side_files, dir_size,
                                          write_pruned_checkpoint)
from vlsparse.compress.ecoflap import zeroth_order_scores
from vlsparse.rss import current_rss_mb, peak_rss_mb, reset_peak_rss
from vlsparse.compress.packed import unpack_mask, write_packed_checkpoint
from vlsparse.compress.allocations import owl as owl_method
from vlsparse.compress.sequential import Block, Progress, StreamedModel, build_skeleton, find_blocks, sequential_prune
from vlsparse.compress.methods import method_named
from vlsparse.compress.wanda import parse_structure
from vlsparse.errors import InputError, ProfileError

SCOPES = ("global", "per-tower")


@dataclass
class PruneConfig:
    """What ``vlsparse prune`` does; every field has the CLI flag of the same name.

    ``allocation=None`` means ecoflap for unstructured sparsity and uniform for
    N:M (which fixes every matrix at N/M). ``ecoflap_samples`` calibration
    batches feed the zeroth-order scores (each costs ``2 * groups * draws``
    streamed forwards); ``samples`` feed Wanda and OWL.
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
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    pack: bool = False
    force: bool = False
    profile: str | None = None

    def resolved_allocation(self) -> str:
        if self.allocation is not None:
            return self.allocation
        return "uniform" if parse_structure(self.structure) else "ecoflap"

    def validate(self) -> None:
        """Raise a one-line ``InputError`` for any bad combination."""
        if not 0.0 < self.ratio < 1.0:
            raise InputError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}",
                             "e.g. --ratio 0.5 prunes half of the weights")
        method_named(self.method)
        nm = parse_structure(self.structure)
        if nm and abs(self.ratio - nm[0] / nm[1]) > 1e-9:
            raise InputError(f"--structure {self.structure} prunes exactly {nm[0]}/{nm[1]} of every row, "
                             f"so it needs --ratio {nm[0] / nm[1]:g}, not {self.ratio:g}",
                             f"use --ratio {nm[0] / nm[1]:g} or --structure unstructured")
        if self.allocation is not None and self.allocation not in alloc.ALLOCATIONS:
            raise InputError(f"unknown --allocation {self.allocation!r}", "use ecoflap, owl or uniform")
        if nm and self.resolved_allocation() != "uniform":
            raise InputError(f"--structure {self.structure} fixes every matrix at {nm[0]}/{nm[1]}, so it cannot "
                             f"follow a per-layer --allocation {self.allocation}",
                             "use --allocation uniform (the default with N:M)")
        if self.scope not in SCOPES:
            raise InputError(f"unknown --scope {self.scope!r}", "use global or per-tower")
        if not 0.0 <= self.max_deviation < 1.0:
            raise InputError(f"--max-deviation must be in [0, 1), got {self.max_deviation}")
        for name, value in (("samples", self.samples), ("seq-len", self.seq_len), ("draws", self.draws),
                            ("ecoflap-samples", self.ecoflap_samples)):
            if value < 1:
                raise InputError(f"--{name} must be at least 1, got {value}")
        if not (math.isfinite(self.epsilon) and 0 < self.epsilon <= 1):
            raise InputError(f"--epsilon must be a finite number in (0, 1], got {self.epsilon}",
                             "e.g. --epsilon 1e-3 (the ECoFLaP default)")


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
        if profile.attention is not None or profile.core is not None:
            return profile, str(path)
    return None, None


# ----------------------------------------------------------------------------- allocation


def _allocation_towers(blocks: list[Block], scope: str) -> list[list[int]]:
    if scope == "global":
        return [list(range(len(blocks)))]
    vision = [i for i, b in enumerate(blocks) if b.tower != "lm"]
    lm = [i for i, b in enumerate(blocks) if b.tower == "lm"]
    return [t for t in (vision, lm) if t]


def allocate(streamed: StreamedModel, batches: list[dict], config: PruneConfig,
             progress: Progress) -> tuple[list[int], list[float] | None, dict]:
    """(keep count per block, score per block or None, record for the profile)."""
    blocks = streamed.blocks
    sizes = [b.size() for b in blocks]
    method = config.resolved_allocation()
    scores: list[float] | None = None
    record: dict = {}
    if method == "ecoflap":
        scoring = take_samples(batches, config.ecoflap_samples)
        result = zeroth_order_scores(streamed, scoring, config.epsilon, config.draws, config.seed, progress)
        scores = result.per_weight
        record = {"ecoflap": {"epsilon": config.epsilon, "draws": config.draws,
                              "samples": sum(b["input_ids"].shape[0] for b in scoring), "seed": config.seed}}
    elif method == "owl":
        norms = owl_method.dense_input_norms(streamed, batches, progress)
        scores = owl_method.outlier_ratios(streamed, norms, config.owl_m)
        record = {"owl": {"m": config.owl_m, "lam": config.owl_lambda}}
    keeps = [0] * len(blocks)
    for tower in _allocation_towers(blocks, config.scope):
        sub = [sizes[i] for i in tower]
        if method == "ecoflap":
            got = alloc.water_fill(sub, [scores[i] for i in tower], config.ratio, config.max_deviation)
        elif method == "owl":
            got = owl_method.owl(sub, [scores[i] for i in tower], config.ratio, config.max_deviation, config.owl_lambda)
        else:
            got = alloc.uniform(sub, config.ratio)
        for i, k in zip(tower, got):
            keeps[i] = k
    return keeps, scores, record


def _prune_counts(blocks: list[Block], keeps: list[int]) -> dict[str, int]:
    """Weights to zero in each matrix: a group's count split over its matrices by size."""
    counts: dict[str, int] = {}
    for block, keep in zip(blocks, keeps):
        names = block.weight_names()
        sizes = [block.linears[n[: -len(".weight")]].weight.numel() for n in names]
        for name, n in zip(names, alloc.split_count(block.size() - keep, sizes)):
            counts[name] = n
    return counts


def _check_nm(blocks: list[Block], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for block in blocks:
        for name, linear in block.linears.items():
            if linear.in_features % nm[1]:
                raise InputError(f"{name} has {linear.in_features} input features, not a multiple of {nm[1]}",
                                 "use --structure unstructured for this model")


# ----------------------------------------------------------------------------- the run


def default_out(model_name: str, config: PruneConfig, cwd: Path) -> Path:
    tag = config.structure.replace(":", "of") if parse_structure(config.structure) else config.resolved_allocation()
    return cwd / f"{Path(model_name).name}-{tag}-{round(config.ratio * 100)}"


def prune_model(model: str | Path = "demo", out: str | Path | None = None, config: PruneConfig | None = None,
                progress: Progress | None = None, cwd: str | Path | None = None) -> PruneResult:
    """Prune ``model`` (``demo``, a folder or a hub id) into ``out``; the input is never modified."""
    from vlsparse.models.adapter import Adapter, family_of
    from vlsparse.models.processors import load_processor
    from vlsparse.memory import check_prune_fits
    from vlsparse.models.source import check_model_folder, resolve_model_folder, resolved_config

    config = config or PruneConfig()
    config.validate()
    progress = progress or (lambda _: None)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    nm = parse_structure(config.structure)
    folder = resolve_model_folder(model)
    family = family_of(check_model_folder(folder))
    text_tokens = config.seq_len if family == "causal_lm" else 0  # VLM prompts are used as they are
    check_prune_fits(resolved_config(folder), config.samples, text_tokens, TEXT_BATCH)
    name = "demo" if str(model) == "demo" else folder.name
    out = Path(out) if out is not None else default_out(name, config, cwd)
    check_output(out, folder, config.force,
                 inputs=[p for p in (config.profile, config.calib) if p and Path(p).exists()])

    start = time.perf_counter()
    progress(f"Building {name} on the meta device")
    processor = load_processor(folder, family)
    skeleton = build_skeleton(folder, family)
    reset_peak_rss()  # from here on (code loaded, no weights read) the peak measures this run's data
    start_rss = current_rss_mb()
    adapter = Adapter(skeleton, family, name=name)
    blocks = find_blocks(skeleton, adapter)
    _check_nm(blocks, nm)
    reader = CheckpointReader(folder)
    streamed = StreamedModel(skeleton, reader, blocks)
    streamed.load_stem()
    fingerprint = adapter.fingerprint()
    source_profile, source_profile_path = _find_source_profile(config, fingerprint, cwd)

    progress("Preparing calibration data")
    calib = build_calibration(adapter, processor, config.calib, config.samples, config.seq_len, config.seed)
    keeps, scores, method_record = allocate(streamed, calib.batches, config, progress)
    counts = _prune_counts(blocks, keeps)

    method = method_named(config.method)

    def prune_block(block: Block, stats: dict) -> dict:
        return {n: method.prune_layer(skeleton.get_parameter(n), stats[n], counts[n], nm) for n in block.weight_names()}

    sequential_prune(streamed, calib.batches, prune_block, new_stats=method.new_stats, progress=progress)

    ckpt_masks = {streamed.key_of[n]: bits for n, bits in streamed.masks.items()}
    matrices, groups, pruned_total, zero_total = [], [], 0, 0
    for i, block in enumerate(blocks):
        group_zeros = 0
        for n in block.weight_names():
            shape = tuple(skeleton.get_parameter(n).shape)
            zeros = int((~unpack_mask(streamed.masks[n], shape)).sum())
            numel = shape[0] * shape[1]
            group_zeros += zeros
            matrices.append({"name": streamed.key_of[n], "group": block.name, "shape": list(shape),
                             "sparsity": round(zeros / numel, 6)})
        size = block.size()
        pruned_total += size
        zero_total += group_zeros
        row = {"group": block.name, "tower": block.tower, "params": size, "keep": size - group_zeros,
               "sparsity": round(group_zeros / size, 6)}
        if scores is not None:
            row["score"] = float(f"{scores[i]:.6g}")
        groups.append(row)
    achieved = zero_total / pruned_total

    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    record = {
        "method": config.method,
        "allocation": config.resolved_allocation(),
        "structure": config.structure,
        "scope": config.scope,
        "ratio": config.ratio,
        "achieved": round(achieved, 6),
        "max_deviation": config.max_deviation,
        "pruned_params": pruned_total,
        "packed": config.pack,
        "calibration": {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len,
                        "seed": calib.seed, "tokens": calib.tokens},
        **method_record,
        "source": {"model": name, "path": str(folder.resolve())},
        "run": {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1), "start_rss_mb": round(start_rss, 1),
                "model_mb": round(reader.nbytes() / 2**20, 1)},
        "groups": groups,
        "matrices": matrices,
    }
    if source_profile_path:
        record["attention_profile"] = source_profile_path

    progress(f"Writing {out}")
    _write(out, config, reader, folder, ckpt_masks, _profile(fingerprint, calib, record, source_profile), progress)
    return PruneResult(out=out, model_name=name, achieved=achieved, groups=groups, matrices=matrices,
                       seconds=seconds, peak_rss_mb=peak, start_rss_mb=start_rss,
                       model_mb=reader.nbytes() / 2**20, out_mb=dir_size(out) / 2**20,
                       profile_source=source_profile_path)


def _profile(fingerprint, calib, record: dict, source):
    from vlsparse.profile import Calibration, Profile

    calibration = Calibration(source=calib.source, samples=calib.samples, seq_len=calib.seq_len, seed=calib.seed)
    if source is None:
        return Profile(model=fingerprint, calibration=calibration, pruning=record)
    return Profile(model=fingerprint, calibration=source.calibration or calibration, attention=source.attention,
                   pruning=record, core=source.core, tensors=dict(source.tensors))


def _write(out: Path, config: PruneConfig, reader: CheckpointReader, folder: Path, ckpt_masks: dict,
           profile, progress: Progress) -> None:
    from vlsparse.atomic import atomic_dir
    from vlsparse.profile import save_profile

    def replacement(key: str) -> torch.Tensor | None:
        bits = ckpt_masks.get(key)
        if bits is None:
            return None
        tensor = reader.tensor(key)
        return tensor.masked_fill_(~unpack_mask(bits, tensor.shape), 0)

    def on_file(name: str) -> None:
        progress(f"Writing {name}")

    with atomic_dir(out, force=config.force) as tmp:
        copy_side_files(folder, tmp)
        if config.pack:
            write_packed_checkpoint(reader, tmp, ckpt_masks, on_file)
        else:
            write_pruned_checkpoint(reader, tmp, replacement, on_file)
        save_profile(profile, tmp / PROFILE_NAME)
        for path in tmp.iterdir():  # temporary files are created private; the checkpoint is for sharing
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
