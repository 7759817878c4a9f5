"""`vlsparse run IMAGE... QUESTION`: answer a question about images."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.quiet import quiet_transformers
from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import (AllowPickleOpt, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, KVOpt, KVParamOpt,
                                  MaxMemoryOpt, ModelOpt, OffloadFolderOpt, QuietOpt, RecallGuardOpt,
                                  TrustRemoteCodeOpt, offload_folder_for, parse_params, say_offload)

HELP = """Answer a QUESTION about one or more images with the model's own prompt format.

The answer goes to stdout; a summary (prompt and image tokens, prefill time,
decode speed, peak memory) goes to stderr.

Examples:

  vlsparse run examples/scene.png "What color is the circle?"

  vlsparse run --model ./llava-1.5-7b-hf photo.jpg "What is in the picture?"

  vlsparse run --model ./SmolLM2-135M-Instruct "What is the capital of France?"

  vlsparse run --no-tokens examples/scene.png "What color is the circle?"   # keep every image token
  vlsparse run --kv zipvl examples/scene.png "What color is the circle?"    # mixed-precision KV cache
  vlsparse run --kv snapkv --kv-param budget=0.25 examples/scene.png "What color is the circle?"
  vlsparse run --model ./big-vlm --max-memory-mb 4000 photo.jpg "Describe it."   # weights beyond 4000 MiB on disk

A profile's `tokens` section (`vlsparse calibrate --tokens METHOD`) drops image tokens
with that method; it replaces the `core` section's core tokens when both are present.
Decoding uses the profile's `kv` section (`vlsparse calibrate --kv METHOD`), else a
full-precision cache written in place (--kv fp, the same numbers as transformers' own
cache without its copy per token); --kv off uses transformers' own.
"""


def summary_table(answer, model_name: str, attention: str, dense=None) -> Table:
    title = f"vlsparse run · {model_name}"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("attention", attention)
    table.add_row("prompt tokens", f"{answer.prompt_tokens}")
    table.add_row("  of which image tokens", f"{answer.image_tokens}")
    table.add_row("new tokens", f"{answer.new_tokens}")
    table.add_row("prefill", f"{answer.prefill_ms:.1f} ms")
    table.add_row("decode", f"{answer.decode_tokens_per_s:.1f} tokens/s")
    table.add_row(answer.memory_kind, f"{answer.peak_memory_mb:.0f} MiB")
    if dense is not None:
        table.add_row("dense prefill", f"{dense.prefill_ms:.1f} ms")
        table.add_row("prefill speedup", f"{dense.prefill_ms / max(answer.prefill_ms, 1e-9):.2f}x")
        table.add_row("dense decode", f"{dense.decode_tokens_per_s:.1f} tokens/s")
        table.add_row("decode speedup", f"{answer.decode_tokens_per_s / max(dense.decode_tokens_per_s, 1e-9):.2f}x")
        table.add_row("same answer as dense", "yes" if dense.text == answer.text else f"no (dense: {dense.text!r})")
    return table


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@friendly_errors
def run(
    inputs: Annotated[list[str], typer.Argument(help="Image file(s), then the question (the last argument).",
                                                show_default=False)],
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.", min=1)] = 16,
    profile: Annotated[Optional[Path], typer.Option(
        "--profile", help="Sparsity profile (YAML). Default: ./profiles/MODEL.yaml if made for this model, "
                          "else vlsparse.yaml inside the model folder, if any.",
        show_default=False)] = None,
    dense_only: Annotated[bool, typer.Option("--dense", help="Ignore any profile: dense attention.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also run dense; report prefill speedup.")] = False,
    backend: BackendOpt = "auto",
    recall_guard: RecallGuardOpt = False,
    core: Annotated[Optional[bool], typer.Option(
        "--core/--no-core", help="Core neurons and core tokens from the profile's `core` section "
                                 "[default: on when the profile has one].", show_default=False)] = None,
    tokens: Annotated[Optional[bool], typer.Option(
        "--tokens/--no-tokens", help="Visual-token reduction from the profile's `tokens` section "
                                     "[default: on when the profile has one].", show_default=False)] = None,
    kv: KVOpt = None,
    kv_param: KVParamOpt = None,
    max_memory_mb: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from contextlib import ExitStack

    from vlsparse.errors import InputError
    from vlsparse.generate import generate_answer
    from vlsparse.images import load_image
    from vlsparse.models import load
    from vlsparse.models.processors import unknown_words
    from vlsparse.profile.kv import choose_kv, describe_kv

    kv_params = parse_params(kv_param, "kv-param", "bits=2")
    if kv is not None:
        choose_kv(None, kv, kv_params)  # an unknown method or parameter is refused before loading the model

    *image_paths, question = inputs
    if not question.strip():
        raise InputError("the question is empty", "pass the question as the last argument, in quotes")
    if Path(question).suffix.lower() in IMAGE_SUFFIXES and Path(question).is_file():
        raise InputError(f"the last argument, {question}, is an image file, not a question",
                         'add the question after the images, in quotes: vlsparse run IMAGE "What color is it?"')
    images = [load_image(Path(p)) for p in image_paths]
    err = Console(stderr=True, quiet=quiet or json_out)
    model_name = model or default_model(err)
    with quiet_transformers(), ExitStack() as cleanup:
        loaded = load(model_name, device=device, dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, max_memory_mb=max_memory_mb,
                      offload_folder=offload_folder_for(cleanup, max_memory_mb, offload_folder))
        say_offload(loaded, lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True))
        batch = loaded.prepare(images, question)
        unknown = unknown_words(loaded.processor, question)
        if unknown:
            err.print(f"Note: the tokenizer does not know {', '.join(repr(w) for w in unknown)}: the model reads "
                      "an unknown token there, so the answer may ignore it", markup=False, highlight=False, soft_wrap=True)
        profile_path, profile_obj = (None, None) if dense_only else find_profile(loaded, profile, err)
        layout = layout_notes(loaded, batch, profile_obj)
        for note in layout:
            err.print(f"Note: this prompt has {note}: the profile's patterns may keep less attention here "
                      "(--recall-guard measures it; or profile with prompts like this one)", markup=False,
                      highlight=False, soft_wrap=True)
        if core and (profile_obj is None or profile_obj.core is None):
            raise InputError("--core needs a profile with a `core` section", "run `vlsparse calibrate` first")
        if loaded.offload is not None and profile_obj is not None and profile_obj.core is not None:
            if core:
                raise InputError("core neurons slice resident MLP weights, which --max-memory-mb offloads",
                                 "drop --core, or drop --max-memory-mb")
            core = False  # the default: on only where the weights are resident
        if tokens and (profile_obj is None or profile_obj.tokens is None):
            raise InputError("--tokens needs a profile with a `tokens` section",
                             "run `vlsparse calibrate --tokens METHOD` first")
        use_tokens = tokens is not False and profile_obj is not None and profile_obj.tokens is not None
        dense = generate_answer(loaded, batch, max_new_tokens) if compare and profile_obj else None
        runtime = attach_attention(loaded, profile_obj, backend, guard=recall_guard)
        core_runtime = attach_core(loaded, profile_obj, runtime, tokens=not use_tokens) if core is not False else None
        token_runtime = attach_tokens(loaded, profile_obj, runtime) if use_tokens else None
        kv_settings = choose_kv(profile_obj.kv if profile_obj is not None else None, kv, kv_params)
        kv_runtime = attach_kv(loaded, kv_settings, token_runtime)
        answer = generate_answer(loaded, batch, max_new_tokens=max_new_tokens)
    kv_stats = {"method": describe_kv(kv_settings), **(kv_runtime.stats() if kv_runtime is not None else {})}
    attention = "dense" if runtime is None else _describe(runtime, profile_path)
    core_stats = core_runtime.stats() if core_runtime is not None else {}
    token_stats = token_runtime.stats() if token_runtime is not None else {}
    if json_out:
        fell = runtime.fallbacks() if runtime is not None and runtime.guard else None
        extra = {"attention": attention, "profile": str(profile_path) if profile_path else None,
                 "recall_guard": None if fell is None else {"heads_dense": fell[0], "heads_checked": fell[1]},
                 "core": core_stats,
                 "tokens": token_stats, "kv": kv_stats, "offload": loaded.offload, "unknown_words": unknown,
                 "layout_warnings": layout}
        if dense is not None:
            extra.update(dense_prefill_ms=dense.prefill_ms, prefill_speedup=dense.prefill_ms / answer.prefill_ms,
                         dense_decode_tokens_per_s=dense.decode_tokens_per_s, dense_text=dense.text)
        typer.echo(json.dumps({"model": loaded.name, **asdict(answer), **extra}, indent=2, default=str))
        return
    typer.echo(answer.text)
    table = summary_table(answer, loaded.name, attention, dense)
    if token_runtime is not None:
        table.add_row("image tokens kept", token_runtime.describe().removeprefix("image tokens kept "))
    if core_stats.get("core_tokens"):
        table.add_row("image tokens kept", f"{core_stats['image_tokens_kept']} / {core_stats['image_tokens_total']}")
    if core_stats.get("core_neurons"):
        table.add_row("core neurons kept", f"{core_stats['core_neurons_kept']} / {core_stats['core_neurons_total']}")
    table.add_row("KV cache", kv_stats["method"])
    if "kv_held_bytes" in kv_stats:
        kept = (f", {kv_stats['kv_kept_tokens']} of {kv_stats['kv_prompt_tokens']} prompt tokens kept over the layers"
                if kv_stats.get("kv_kept_tokens", 0) < kv_stats.get("kv_prompt_tokens", 0) else "")
        table.add_row("  held", f"{kv_stats['kv_held_bytes'] / 2**20:.2f} MiB{kept}")
    err.print(table)


def default_model(err: Console) -> str:
    """With no --model: the newest checkpoint `vlsparse prune` wrote here, else the demo model."""
    from vlsparse.compress.checkpoint import find_newest_checkpoint

    found = find_newest_checkpoint(Path.cwd())
    if found is None:
        return "demo"
    err.print(f"using the newest pruned checkpoint here: {found}")
    return str(found)


def find_profile(loaded, explicit: Path | None, err: Console):
    """(path, Profile) by the one rule of ``vlsparse.profile.locate``; says which one it took."""
    from vlsparse.profile.locate import locate_profile

    say = lambda message: err.print(message, markup=False, highlight=False)  # noqa: E731
    path, found = locate_profile(loaded.path, loaded.name, loaded.adapter.fingerprint(), explicit, note=say)
    if path is not None and explicit is None:
        say(f"using profile {path}")
    return path, found


def attach_attention(loaded, profile, backend: str, guard: bool = False):
    if profile is None or profile.attention is None:
        return None
    from vlsparse.kernels.runtime import attach

    return attach(loaded, profile, backend=backend, guard=guard)


def attach_core(loaded, profile, sparse_runtime, tokens: bool = True):
    if profile is None or profile.core is None:
        return None
    from vlsparse.kernels.core_runtime import attach_profile_core

    return attach_profile_core(loaded, profile, tokens=tokens, sparse_runtime=sparse_runtime)


def attach_tokens(loaded, profile, sparse_runtime):
    from vlsparse.kernels.token_runtime import attach_profile_tokens

    return attach_profile_tokens(loaded, profile, sparse_runtime=sparse_runtime)


def layout_notes(loaded, batch, profile) -> list[str]:
    """Where this prompt lies outside the layout the profile's attention was calibrated on
    (``vlsparse.profile.layout``); [] without an attention section or a recorded layout."""
    if profile is None or profile.attention is None or profile.calibration is None:
        return []
    from vlsparse.kernels.runtime import SparseRuntime
    from vlsparse.profile.layout import layout_warnings

    spans = loaded.adapter.image_spans(batch) if loaded.adapter.image_tokens else []
    return layout_warnings(profile.calibration.layout, (int(batch["input_ids"].shape[1]), spans),
                           min_tokens=SparseRuntime.min_len)


def attach_kv(loaded, settings, token_runtime=None):
    """The KV method's runtime (None: transformers' own cache)."""
    if settings is None:
        return None
    from vlsparse.kernels.kv_runtime import attach_kv as attach

    return attach(loaded, settings, token_runtime)


def _describe(runtime, profile_path: Path) -> str:
    density = runtime.mean_density()
    if density is None:
        return f"sparse profile {profile_path.name} (prompt shorter than {runtime.min_len} tokens: dense)"
    text = f"sparse ({profile_path.name}), kept {density:.1%} of causal pairs"
    if runtime.guard:
        fell, heads = runtime.fallbacks()
        text += f"; recall guard: {fell} of {heads} heads ran dense"
    return text


def register(app: typer.Typer) -> None:
    app.command("run", help=HELP, no_args_is_help=True)(run)
