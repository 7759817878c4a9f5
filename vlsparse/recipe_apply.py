"""Replaying a recipe (``vlsparse.recipe``) on a model: profile, prune, calibrate, in order, into a work folder.

``apply_recipe`` writes ``WORKDIR/profile.yaml`` (profile), ``WORKDIR/checkpoint`` (prune, carrying that
profile) and adds the calibrations' sections to the checkpoint's ``vlsparse.yaml`` (without a prune step:
to ``WORKDIR/profile.yaml``). Each step reports what it wrote, its time and its peak RSS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlsparse.errors import InputError
from vlsparse.recipe import STEP_OPTIONS, Progress, check_recipe, step_kind

@dataclass
class StepResult:
    """One replayed step: what it wrote, its wall time and the process's peak resident memory during it."""

    step: str
    wrote: str
    seconds: float
    peak_rss_mb: float


@dataclass
class RecipeResult:
    workdir: Path
    steps: list[StepResult] = field(default_factory=list)
    checkpoint: Path | None = None
    profile: Path | None = None


def workdir_outputs(recipe: dict[str, Any], workdir: str | Path) -> dict[str, Path]:
    """Where ``apply_recipe`` writes: ``profile`` (a YAML) and ``checkpoint`` (a folder), as the steps need."""
    workdir = Path(workdir)
    kinds = [step_kind(name, options or {}) for step in recipe["steps"] for name, options in step.items()]
    out = {}
    if "profile" in kinds or ("prune" not in kinds):
        out["profile"] = workdir / "profile.yaml"
    if "prune" in kinds:
        out["checkpoint"] = workdir / "checkpoint"
    return out


def _calib(value: str | None, base: Path) -> str | None:
    if value is None or value.startswith("demo:") or Path(value).is_absolute():
        return value
    return str(base / value)


def _layers(value: Any, num_layers: int, what: str) -> list[int] | None:
    from vlsparse.compress.core_calibrate import parse_layers

    if isinstance(value, list):
        value = ",".join(map(str, value)) if value else "none"
    return parse_layers(value, num_layers, what)


def apply_recipe(recipe: dict[str, Any], model: str | Path, workdir: str | Path, progress: Progress | None = None,
                 force: bool = False, base: str | Path | None = None) -> RecipeResult:
    """Replay ``recipe`` on ``model`` (a folder, hub id or ``demo``), writing into ``workdir`` (see the module
    docstring). ``base``: the folder relative ``calib`` files are read from (the recipe's; default: cwd).
    Outputs are checked before any work; existing ones are replaced only with ``force``."""
    from vlsparse.atomic import check_output
    from vlsparse.rss import peak_rss_mb, reset_peak_rss

    check_recipe(recipe)
    say = progress or (lambda _message: None)
    base = Path(base) if base is not None else Path.cwd()
    outputs = workdir_outputs(recipe, workdir)
    inputs = [p for p in (Path(str(model)),) if p.exists()]
    for out in outputs.values():
        check_output(out, force=force, inputs=inputs)
    result = RecipeResult(workdir=Path(workdir))
    steps = [(name, options or {}) for step in recipe["steps"] for name, options in step.items()]
    current: Path | None = None  # the profile the next step adds to
    target = str(model)  # the model calibrate runs on: the pruned checkpoint once there is one
    for index, (name, given) in enumerate(steps, start=1):
        kind = step_kind(name, given)
        options = {**STEP_OPTIONS[kind], **given}
        options["calib"] = _calib(options["calib"], base)
        say(f"[{index}/{len(steps)}] {name}" + (f" --tokens {options['tokens']}" if kind == "tokens" else ""))
        reset_peak_rss()
        started = time.perf_counter()
        if kind == "profile":
            current = _run_profile(target, options, outputs["profile"], force, say)
            wrote = str(current)
            result.profile = current
        elif kind == "prune":
            from vlsparse.compress.api import PruneConfig, prune_model
            from vlsparse.compress.checkpoint import PROFILE_NAME

            config = PruneConfig(**options, force=force, profile=str(current) if current else None)
            pruned = prune_model(target, outputs["checkpoint"], config, progress=say, cwd=result.workdir)
            target, current = str(pruned.out), pruned.out / PROFILE_NAME
            wrote = str(pruned.out)
            result.checkpoint = pruned.out
        else:
            out = current if current is not None else outputs["profile"]
            _run_calibrate(kind, target, options, current, out, force or current is not None, say)
            current = out
            wrote = f"{'core' if kind == 'core' else 'tokens'} section of {out}"
            if result.checkpoint is None:
                result.profile = out
        result.steps.append(StepResult(step=name if kind != "tokens" else f"calibrate --tokens {options['tokens']}",
                                       wrote=wrote, seconds=time.perf_counter() - started,
                                       peak_rss_mb=peak_rss_mb()))
    return result


def _run_profile(model: str, options: dict, out: Path, force: bool, say: Progress) -> Path:
    from vlsparse.models import load
    from vlsparse.profile import save_profile
    from vlsparse.search.api import auto_threads, profile_model
    from vlsparse.search.calibration import calibration_from

    loaded = load(model, device="auto")
    calibration = calibration_from(loaded, options["calib"], samples=options["samples"], seq_len=options["seq_len"],
                                   seed=options["seed"])
    profile = profile_model(loaded, calibration, recall=options["recall"], threads=auto_threads(), progress=say,
                            tail_recall=options["tail_recall"], dense_tail=options["dense_tail"])
    return save_profile(profile, out, force=force)


def _run_calibrate(kind: str, model: str, options: dict, current: Path | None, out: Path, force: bool,
                   say: Progress) -> None:
    from vlsparse.models import load
    from vlsparse.profile import load_profile, save_profile
    from vlsparse.search.calibration import calibration_from

    loaded = load(model, device="auto")
    base = load_profile(current) if current is not None else None
    calibration = calibration_from(loaded, options["calib"], samples=options["samples"], seq_len=options["seq_len"],
                                   seed=options["seed"])
    if kind == "tokens":
        from vlsparse.compress.token_calibrate import calibrate_tokens, tokens_profile

        if options["guard_tokens"] < 1:
            raise InputError("guard_tokens must be at least 1 for a tokens step", "e.g. guard_tokens: 32")
        section = calibrate_tokens(loaded, calibration, options["tokens"], options["keep"], options["token_param"],
                                   max_new_tokens=options["guard_tokens"], progress=say)
        profile = tokens_profile(loaded, section, base)
    else:
        from vlsparse.compress.core_calibrate import calibrate_core, core_profile
        from vlsparse.profile.core import SCORE_RULES

        n_layers = loaded.adapter.num_layers
        core = calibrate_core(
            loaded, calibration, alpha=options["alpha"], beta=options["beta"], max_error=options["max_error"],
            neuron_layers=_layers(options["neuron_layers"], n_layers, "neuron_layers"),
            token_layers=_layers(options["token_layers"], n_layers, "token_layers"),
            scores=SCORE_RULES if options["score"] == "auto" else (options["score"],), min_keep=options["min_keep"],
            max_keep=options["max_keep"], kl_budget=options["kl_budget"], min_top1=options["min_top1"],
            cats_sparsity=options["cats_sparsity"], decode_tokens=options["decode_tokens"],
            guard_tokens=options["guard_tokens"], progress=say)
        profile = core_profile(loaded, core, base)
    save_profile(profile, out, force=force)
