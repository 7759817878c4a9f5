"""Option types shared by several commands: each concept has one help text."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model folder, Hugging Face hub id, or `demo` (the embedded model).",
                 show_default=False),
]
ModelArg = Annotated[
    Optional[str],
    typer.Argument(metavar="MODEL", show_default=False, help="Model folder, hub id or `demo` (same as --model)."),
]
CalibOpt = Annotated[
    Optional[str],
    typer.Option("--calib", show_default=False,
                 help="Calibration data: JSONL, one {\"images\": [...], \"prompt\": ...} (or \"image\") or "
                      "{\"text\": ...} per line, paths relative to the file; a .txt file or a folder of them "
                      "(prune: text models only); pydoc+images (real pydoc text after demo scenes at 224-896 "
                      "px); profile and calibrate also take demo:multi / demo:grid (one demo task only) [default: "
                      "pydoc+images for a VLM whose tokenizer reads English, demo scenes for the demo model, pydoc "
                      "text for LMs]."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow .bin/.pt weights (pickle can run code: trusted sources only).")
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder (trusted sources only).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout; no progress output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same seed, same result).")]
MaxMemoryOpt = Annotated[Optional[float], typer.Option(
    "--max-memory-mb", show_default=False,
    help="For a model larger than memory: keep at most this many MiB of weights resident; accelerate offloads "
         "the rest to disk and reads it back layer by layer (slow; needs vlsparse[offload]).")]
OffloadFolderOpt = Annotated[Optional[Path], typer.Option(
    "--offload-folder", show_default=False,
    help="Where offloaded weights go [default: a temporary folder, removed at exit].")]
KVOpt = Annotated[Optional[str], typer.Option(
    "--kv", show_default=False,
    help="KV cache method for decoding: fp (full precision, written in place), uniform (low-bit, KIVI-style), "
         "zipvl (mixed precision), snapkv (evicts image tokens), or off (transformers' own cache) "
         "[default: the profile's `kv` section, else fp].")]
KVParamOpt = Annotated[Optional[list[str]], typer.Option(
    "--kv-param", show_default=False,
    help="A KV method parameter NAME=VALUE (repeatable), e.g. bits=2 or budget=0.25.")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", help="Sparse kernels: auto, triton, torch or flex (compiled flex_attention).")]
RecallGuardOpt = Annotated[bool, typer.Option(
    "--recall-guard", help="Measure each head's recall on the prompt's last block; heads under the profile's "
                           "target run dense for that prompt (counted in the summary).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace outputs that exist, if vlsparse wrote them "
                                                        "(never another file or folder, never an input).")]


def offload_folder_for(cleanup: ExitStack, max_memory_mb: float | None, offload_folder: Path | None) -> Path | None:
    """``--offload-folder``, or with ``--max-memory-mb`` alone a temporary folder that ``cleanup`` removes."""
    if max_memory_mb is not None and offload_folder is None:
        return Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="vlsparse-offload-")))
    return offload_folder


def say_offload(loaded, say) -> None:
    """One line on where the weights of an offloaded model are (nothing when the model is resident)."""
    if loaded.offload is not None and say is not None:
        o = loaded.offload
        say(f"offloaded: {o['disk']} of {o['disk'] + o['resident']} modules on disk in {o['folder']} (accelerate), "
            f"at most {o['max_memory_mb']:g} MiB of weights resident")


def existing_paths(*candidates) -> list[Path]:
    """The candidates (strings, paths or None) that name files or folders on disk: a command's inputs."""
    return [Path(c) for c in candidates if c and Path(c).exists()]


def parse_ints(text: str, option: str, example: str = "4096,8192") -> list[int]:
    """A comma-separated list of positive integers from an option, or a one-line InputError."""
    from vlsparse.errors import InputError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--{option} must be comma-separated integers, got {text!r}", f"e.g. {example}") from None
    if not values or min(values) < 1:
        raise InputError(f"--{option} needs positive integers, got {text!r}", f"e.g. {example}")
    return values


def parse_fractions(text: str, option: str, example: str = "0.05,0.1,0.25") -> list[float]:
    """A comma-separated list of fractions in (0, 1] from an option, or a one-line InputError."""
    from vlsparse.errors import InputError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--{option} must be comma-separated numbers, got {text!r}", f"e.g. {example}") from None
    if not values or not all(0 < x <= 1 for x in values):
        raise InputError(f"--{option} must lie in (0, 1], got {text!r}", f"e.g. {example}")
    return values


def parse_params(items: list[str] | None, option: str = "token-param", example: str = "k=3") -> dict:
    """``["k=3", "layers=[1, 2]"]`` -> ``{"k": 3, "layers": [1, 2]}`` (values read as YAML), or a one-line InputError."""
    import yaml

    from vlsparse.errors import InputError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--{option} {item!r} is not NAME=VALUE", f"e.g. --{option} {example}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"--{option} {item!r}: cannot read the value", f"e.g. --{option} {example}") from None
    return out
