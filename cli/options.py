"""Option types shared by several commands: each concept has one help text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model folder, Hugging Face hub id, or `demo` (the embedded model).",
                 show_default=False),
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
