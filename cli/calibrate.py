"""`vlsparse calibrate`: core neurons and core tokens (CoreInfer / CoreMatching / CATS) -> the profile's `core`;
with --tokens, a visual-token-reduction method and its keep ratio -> the profile's `tokens`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import (AllowPickleOpt, CalibOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, KVParamOpt,
                                  ModelArg, ModelOpt, QuietOpt, SeedOpt, TrustRemoteCodeOpt, existing_paths,
                                  parse_fractions, parse_params)
from vlsparse.cli.quiet import quiet_transformers

HELP = """Calibrate core neurons and core tokens -> the `core` section of a profile (YAML), or a
visual-token-reduction method (--tokens) -> its `tokens` section.

Three passes over the calibration samples: (1) dense prefill: per language-model
layer, a histogram of |act(gate(x))| and its CATS threshold at --cats-sparsity;
(2) dense decoding: per layer, the relative FFN error of decoding with only the
prompt's core neurons (token-wise top --alpha, sentence-wise top --beta); the
neuron layers are the longest run of layers with error <= --max-error (or
--neuron-layers); (3) vision-language models: for each candidate token layer
(--token-layers), scoring rule (--score) and upper keep guard (--max-keep), a
prefill with image tokens really dropped after that layer (elbow cut within the
guards); the profile keeps the cheapest candidate whose next-token KL from dense
is <= --kl-budget and whose next token matches dense on at least --min-top1 of
the samples (default: all). With 4 samples that guard passed a token layer that
cost 28 points of demo accuracy; with the default 16 it refused it.

With --tokens METHOD (fastv, pyramiddrop, feather, zipvl, visionzip, divprune,
todre) it calibrates that token-reduction method instead: --keep R keeps R of the
image tokens (the method's main ratio); --keep auto takes the smallest of 0.11,
0.25 and 0.5 whose calibration answers (greedy, up to EOS: the first answer token
AND the whole answer) all match dense. The guard is reported either way; the result
is the profile's `tokens` section, which `vlsparse run` then uses (--no-tokens turns
it off).

With --kv METHOD (fp, uniform, zipvl, snapkv; parameters with --kv-param) it answers
the calibration prompts with the full-precision cache and with that KV cache method,
and writes the profile's `kv` section with how many first tokens and answers stayed
the same and the cache's size against full precision. run, eval and bench decode
with it (--kv overrides it there).

Calibration data as for `vlsparse profile`: demo scenes (VLMs), pydoc text (LMs),
or --calib FILE.jsonl. The core (or tokens) section is added to --profile (or, found by the
rule `run` uses, ./profiles/MODEL.yaml, else the model folder's vlsparse.yaml;
other sections are kept), written to --out (default: ./profiles/MODEL.yaml). Nothing is
written into the model folder; replacing an existing profile, the one read
included, needs --force. `vlsparse run` then uses it (--no-core turns it off).

Examples:

\b
  vlsparse calibrate
  vlsparse calibrate --model ./demo-pruned --samples 8 --beta 0.4
  vlsparse calibrate --model ./llava-1.5-7b-hf --calib calib.jsonl --token-layers 2-8 --score auto
  vlsparse calibrate --model smollm2 --neuron-layers 5-27 --out smollm2-core.yaml
  vlsparse calibrate --tokens fastv --keep 0.25
  vlsparse calibrate --tokens pyramiddrop --keep auto --samples 8
  vlsparse calibrate --tokens fastv --keep 0.5 --token-param k=3 --token-param rows=last
  vlsparse calibrate --kv zipvl
  vlsparse calibrate --kv snapkv --kv-param budget=0.25
"""


def tokens_table(section: dict, model_name: str, out: Path) -> Table:
    from vlsparse.profile.tokens import schedule_text

    title = f"vlsparse calibrate --tokens · {model_name}"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("method", section["method"])
    table.add_row("keep", f"{section['keep']:g}" + (" (auto)" if section["guard"]["auto"] else ""))
    if section["params"]:
        table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in section["params"].items()))
    table.add_row("schedule", schedule_text([(s["layer"], s["keep"]) for s in section["schedule"]]))
    for row in section["guard"]["candidates"]:
        kept = "" if row["image_kept"] is None else f", image tokens kept {row['image_kept']:.0%}"
        table.add_row(f"  guard at keep {row['keep']:g}",
                      f"{'passed' if row['passed'] else 'FAILED'}: first token {row['first_token']:.0%}, "
                      f"answer {row['answer']:.0%}{kept}")
    table.add_row("profile", str(out))
    return table


def kv_table(section: dict, model_name: str, out: Path) -> Table:
    title = f"vlsparse calibrate --kv · {model_name}"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_column(style="bold")
    table.add_column(justify="right")
    guard = section["guard"]
    table.add_row("KV method", section["method"])
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in section["params"].items()) or "-")
    table.add_row("same first token as fp", f"{guard['first_token']:.0%}")
    table.add_row("same answer as fp", f"{guard['answer']:.0%}")
    if guard["kv_ratio"] is not None:
        table.add_row("KV cache bytes vs fp", f"{guard['kv_ratio']:.2f}x")
    table.add_row("written to", str(out))
    return table


def summary_table(core: dict, model_name: str, out: Path) -> Table:
    title = f"vlsparse calibrate · {model_name}"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_column(style="bold")
    table.add_column(justify="right")
    neurons, tokens, layers = core["neurons"], core["tokens"], core["layers"]
    span = neurons["layers"]
    if span:
        chosen = [r["decode_error"] for r in layers if span["first"] <= r["layer"] <= span["last"]]
        table.add_row("core-neuron layers", f"{span['first']}-{span['last']} of {len(layers)}")
        table.add_row("  decode FFN error (mean)", f"{sum(chosen) / len(chosen):.3f}")
    guard = neurons.get("guard")
    if guard:
        dropped = f", layers {', '.join(map(str, guard['dropped_layers']))} left out" if guard["dropped_layers"] else ""
        table.add_row("  answer guard", f"{guard['matched']}/{guard['prompts']} greedy answers equal dense{dropped}")
    else:
        table.add_row("core-neuron layers", f"none (no layer with error <= {neurons['max_error']})")
    table.add_row("  alpha, beta", f"{neurons['alpha']:g}, {neurons['beta']:g}")
    if tokens["candidates"]:
        best = next((c for c in tokens["candidates"] if c["layer"] == tokens["layer"]
                     and c["score"] == tokens["score"] and c["max_keep"] == tokens["max_keep"]), None)
        if best is None:
            table.add_row("core-token layer", f"none (no candidate with KL <= {tokens['kl_budget']} "
                          f"and top-1 >= {tokens.get('min_top1', 0):.0%})")
        else:
            table.add_row("core-token layer", f"{best['layer']} (score {best['score']}, max keep {best['max_keep']:g})")
            table.add_row("  image tokens kept", f"{best['kept']:.1%}")
            table.add_row("  next-token KL, top-1 agreement", f"{best['kl']:.4f}, {best['top1']:.0%}")
            table.add_row("  est. LM prefill cost", f"{best['cost']:.1%} of dense")
    thresholds = [r["threshold"] for r in layers]
    table.add_row(f"CATS thresholds (sparsity {core['thresholds']['sparsity']:g})",
                  f"{min(thresholds):.3g} .. {max(thresholds):.3g}")
    table.add_row("profile", str(out))
    return table


@friendly_errors
def calibrate(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples (the token guard needs enough "
                                                           "answers to see a change).", min=1)] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Target tokens per sample (demo scenes and text).",
                                         min=128)] = 4096,
    seed: SeedOpt = 0,
    alpha: Annotated[float, typer.Option("--alpha", help="Token-wise core: top share of each token's active neurons.",
                                         min=0.0, max=1.0)] = 0.2,
    beta: Annotated[float, typer.Option("--beta", help="Sentence-wise core: share of neurons kept for decoding.",
                                        min=0.0, max=1.0)] = 0.4,
    max_error: Annotated[float, typer.Option("--max-error", help="Largest mean decode FFN error of a core-neuron "
                                                                 "layer.", min=0.0)] = 0.5,
    neuron_layers: Annotated[Optional[str], typer.Option(
        "--neuron-layers", help="Core-neuron layers instead of the error rule: e.g. 2-9, or none.",
        show_default=False)] = None,
    token_layers: Annotated[Optional[str], typer.Option(
        "--token-layers", help="Candidate token-pruning layers, e.g. 1-4 or none [default: 0..N/2, not the last].",
        show_default=False)] = None,
    score: Annotated[str, typer.Option(
        "--score", help="Core-token reference: text, all, last, or auto (try all three).")] = "text",
    min_keep: Annotated[float, typer.Option("--min-keep", help="Least share of image tokens kept.", min=0.0, max=1.0)]
    = 0.1,
    max_keep: Annotated[str, typer.Option(
        "--max-keep", help="Candidate upper guards on the share of image tokens kept (comma-separated; the "
                           "cheapest within --kl-budget wins).")] = "0.25,0.5",
    kl_budget: Annotated[float, typer.Option("--kl-budget", help="Largest mean next-token KL (nats) of a token "
                                                                 "layer.", min=0.0)] = 0.1,
    min_top1: Annotated[float, typer.Option("--min-top1", help="Least share of calibration samples whose next token "
                                                               "must stay the dense one.", min=0.0, max=1.0)] = 1.0,
    cats_sparsity: Annotated[float, typer.Option("--cats-sparsity", help="CATS: share of gate activations below "
                                                                         "each layer's threshold.")] = 0.5,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Dense decode steps measured per sample.",
                                               min=1)] = 4,
    tokens: Annotated[Optional[str], typer.Option(
        "--tokens", help="Calibrate this visual-token-reduction method instead of core neurons/tokens.",
        show_default=False)] = None,
    keep: Annotated[str, typer.Option(
        "--keep", help="With --tokens: share of image tokens kept (0-1], or auto (smallest of 0.11, 0.25, 0.5 "
                       "whose calibration answers match dense).")] = "auto",
    token_param: Annotated[Optional[list[str]], typer.Option(
        "--token-param", help="With --tokens: a method parameter NAME=VALUE (repeatable), e.g. k=3.",
        show_default=False)] = None,
    kv: Annotated[Optional[str], typer.Option(
        "--kv", help="Check this KV cache method (fp, uniform, zipvl, snapkv) on the calibration prompts and write "
                     "the profile's `kv` section, which run, eval and bench decode with.", show_default=False)] = None,
    kv_param: KVParamOpt = None,
    guard_tokens: Annotated[int, typer.Option(
        "--guard-tokens", help="Longest greedy answer the answer guards compare with dense, end of sequence "
                               "included (core neurons and --tokens; 0 turns the core-neuron guard off).",
        min=0)] = 32,
    profile: Annotated[Optional[Path], typer.Option(
        "--profile", help="Existing profile to add the section to.", show_default=False)] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Where to write [default: ./profiles/MODEL.yaml; never inside the model folder].",
        show_default=False)] = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.compress.core_calibrate import calibrate_core, core_profile, parse_layers
    from vlsparse.atomic import check_output
    from vlsparse.errors import InputError
    from vlsparse.models import load
    from vlsparse.profile.core import SCORE_RULES
    from vlsparse.profile.locate import default_profile_path, locate_profile
    from vlsparse.search.calibration import calibration_from

    if model_arg and model and model_arg != model:
        raise InputError(f"two models given ({model_arg} and --model {model})", "give the model once")
    if out and Path(out).suffix not in (".yaml", ".yml"):
        raise InputError(f"--out {out} should end in .yaml", "e.g. --out profiles/mymodel.yaml")
    if score != "auto" and score not in SCORE_RULES:
        raise InputError(f"unknown --score {score!r}", f"choose one of {', '.join(SCORE_RULES)} or auto")
    keep_value = _keep(keep)
    if tokens is None and (keep != "auto" or token_param):
        raise InputError("--keep and --token-param apply to --tokens", "add --tokens METHOD, e.g. --tokens fastv")
    if tokens is not None:
        from vlsparse.tokens import method_named

        method_named(tokens)  # an unknown method is refused before any model work
    params = parse_params(token_param)
    if kv is not None and tokens is not None:
        raise InputError("--kv and --tokens write different sections", "run calibrate once for each")
    if kv is None and kv_param:
        raise InputError("--kv-param applies to --kv", "add --kv METHOD, e.g. --kv uniform")
    if kv is not None:
        from vlsparse.profile.kv import resolve_kv

        resolve_kv(kv, parse_params(kv_param, "kv-param", "bits=2"))  # refused before any model work
    inputs = existing_paths(model_arg, model, calib)
    if out:
        check_output(out, force=force, inputs=inputs)
    err = Console(stderr=True)
    show = not (quiet or json_out)
    say = (lambda m: err.print(m, markup=False, highlight=False)) if show else None
    started = time.perf_counter()
    with quiet_transformers():
        loaded = load(model_arg or model or "demo", device=device, dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
        n_layers = loaded.adapter.num_layers
        out_path = Path(out) if out else default_profile_path(loaded.name)
        check_output(out_path, force=force, inputs=[*inputs, loaded.path])
        neuron_span = parse_layers(neuron_layers, n_layers, "neuron_layers")
        token_span = parse_layers(token_layers, n_layers, "token_layers")
        keep_guards = parse_fractions(max_keep, "max-keep", "0.25,0.5")
        base_path, base = locate_profile(loaded.path, loaded.name, loaded.adapter.fingerprint(), profile, note=say)
        if tokens is not None:
            from vlsparse.profile.tokens import resolve_settings

            if guard_tokens < 1:
                from vlsparse.errors import InputError

                raise InputError("--guard-tokens must be at least 1 with --tokens", "e.g. --guard-tokens 32")
            if keep_value != "auto":  # the schedule must fit this model: checked before any calibration work
                resolve_settings(tokens, keep_value, n_layers, params)
            calibration = calibration_from(loaded, calib, samples=samples, seq_len=seq_len, seed=seed)
            _calibrate_tokens(loaded, calibration, tokens, keep_value, params, guard_tokens, base, base_path,
                              out_path, force, started, json_out, show, say, err)
            return
        calibration = calibration_from(loaded, calib, samples=samples, seq_len=seq_len, seed=seed)
        if kv is not None:
            from vlsparse.compress.kv_calibrate import calibrate_kv, kv_profile

            section = calibrate_kv(loaded, calibration, kv, parse_params(kv_param, "kv-param", "bits=2"),
                                   max_new_tokens=max(guard_tokens, 1), progress=say)
            replacing = base is not None and base.kv is not None  # before the new section goes into base
            _save_section("kv", section, kv_profile(loaded, section, base), kv_table(section, loaded.name, out_path),
                          replacing, base_path, out_path, force, started, json_out, show, err)
            return
        core = calibrate_core(
            loaded, calibration, alpha=alpha, beta=beta, max_error=max_error,
            neuron_layers=neuron_span, token_layers=token_span,
            scores=SCORE_RULES if score == "auto" else (score,), min_keep=min_keep,
            max_keep=keep_guards, kl_budget=kl_budget, min_top1=min_top1,
            cats_sparsity=cats_sparsity,
            decode_tokens=decode_tokens, guard_tokens=guard_tokens, progress=say)
    replacing = base is not None and base.core is not None  # before the new section goes into base
    _save_section("core", core, core_profile(loaded, core, base), summary_table(core, loaded.name, out_path),
                  replacing, base_path, out_path, force, started, json_out, show, err)


def _save_section(name: str, section: dict, profile, table, replacing: bool, base_path, out_path: Path, force: bool,
                  started: float, json_out: bool, show: bool, err) -> None:
    """Write the profile holding the new section, then say so: JSON, or the summary table and the time."""
    from vlsparse.profile import save_profile
    from vlsparse.rss import peak_rss_mb

    if replacing and show:
        err.print(f"Note: replacing the {name} section of {base_path}", markup=False, highlight=False)
    save_profile(profile, out_path, force=force)
    seconds, peak = time.perf_counter() - started, peak_rss_mb()
    if json_out:
        typer.echo(json.dumps({"out": str(out_path), "seconds": seconds, "peak_rss_mb": peak, name: section},
                              indent=2))
        return
    if show:
        err.print(table)
        err.print(f"time {seconds:.1f} s, peak RSS {peak:.0f} MiB", markup=False, highlight=False)
    typer.echo(str(out_path))


def _keep(text: str) -> float | str:
    from vlsparse.errors import InputError

    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--keep {text!r} is neither a ratio nor auto", "e.g. --keep 0.25 or --keep auto") from None
    if not 0 < value <= 1:
        raise InputError(f"--keep must lie in (0, 1], got {text}", "e.g. --keep 0.25")
    return value


def _calibrate_tokens(loaded, calibration, method, keep, params, guard_tokens, base, base_path, out_path, force,
                      started, json_out, show, say, err) -> None:
    from vlsparse.compress.token_calibrate import calibrate_tokens, tokens_profile

    section = calibrate_tokens(loaded, calibration, method, keep, params, max_new_tokens=guard_tokens,
                               progress=say)
    replacing = base is not None and base.tokens is not None  # before the new section goes into base
    _save_section("tokens", section, tokens_profile(loaded, section, base),
                  tokens_table(section, loaded.name, out_path), replacing, base_path, out_path, force, started,
                  json_out, show, err)


def register(app: typer.Typer) -> None:
    app.command("calibrate", help=HELP)(calibrate)
