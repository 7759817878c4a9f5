"""`vlsparse inspect PROFILE`: summarise an existing profile, redraw its figure, check it against a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import AllowPickleOpt, ForceOpt, JsonOpt, TrustRemoteCodeOpt
from vlsparse.cli.quiet import quiet_transformers

HELP = """Print the summary of a profile written by `vlsparse profile`.

Pattern counts, mean density, min and mean recall, and attention FLOPs at the
calibration length (stdout). --heads adds one line per head; --png redraws the
layers x heads figure; --model checks that the profile was made for that model
(architecture, layer and head counts, config hash) and fails with one line if not.

Examples:

\b
  vlsparse inspect profiles/demo.yaml
  vlsparse inspect profiles/demo.yaml --heads --png demo-heads.png
  vlsparse inspect profiles/demo.yaml --model ./my-llava
"""


def head_lines(profile) -> list[str]:
    """One plain line per head: layer, head, pattern, budgets (fraction of N, then at calibration), recall, density."""
    lines = [f"{'layer':>5} {'head':>4}  {'pattern':<24} {'recall min/mean':>15} {'density':>7}  budget"]
    for li, layer in enumerate(profile.attention.layers):
        for hi, h in enumerate(layer):
            budget = " ".join(f"{k}={v:.4g}" for k, v in h.budget.items())
            absolute = " ".join(f"{k}={v}" for k, v in {**h.budget_abs, **h.params}.items())
            detail = f"{budget} ({absolute})" if absolute else budget
            lines.append(f"{li:>5} {hi:>4}  {h.pattern:<24} {h.recall_min:.4f}/{h.recall_mean:.4f} "
                         f"{h.density:>7.1%}  {detail}".rstrip())
    return lines


@friendly_errors
def inspect(
    profile_path: Annotated[str, typer.Argument(metavar="PROFILE", help="A profile YAML.", show_default=False)],
    png: Annotated[Optional[str], typer.Option("--png", help="Redraw the figure to this PNG path.",
                                               show_default=False)] = None,
    heads: Annotated[bool, typer.Option("--heads", help="Also list every head's pattern and budgets.")] = False,
    force: ForceOpt = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Check the profile against this model (folder, hub id or `demo`).",
        show_default=False)] = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from vlsparse.errors import ProfileError
    from vlsparse.profile import check_profile_matches, load_profile
    from vlsparse.search.report import draw_figure, summary, summary_table

    if png:
        from vlsparse.atomic import check_output
        from vlsparse.errors import InputError, param
        from vlsparse.profile import sidecar_path

        if Path(png).suffix != ".png":
            raise InputError(f"--png {png} should end in .png", "e.g. --png heads.png")
        check_output(png, force=force, inputs=[profile_path, sidecar_path(profile_path)], option=param("png"))
    profile = load_profile(profile_path)
    if profile.attention is None:
        raise ProfileError(f"profile {profile_path} has no attention section", "run `vlsparse profile` to make one")
    if model:
        from vlsparse.models import load

        with quiet_transformers():
            loaded = load(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        check_profile_matches(profile, loaded.adapter.fingerprint(), profile_name=f"profile {profile_path}")
    figure = draw_figure(profile, Path(png), force=force) if png else None
    if json_out:
        data = summary(profile)
        if heads:
            data["per_head"] = [{"layer": li, "head": hi, "pattern": h.pattern, "budget": h.budget,
                                 "budget_abs": h.budget_abs, "params": h.params, "recall_min": h.recall_min,
                                 "recall_mean": h.recall_mean, "density": h.density}
                                for li, layer in enumerate(profile.attention.layers) for hi, h in enumerate(layer)]
        typer.echo(json.dumps({"profile": str(profile_path), "png": str(figure) if figure else None,
                               "model_checked": model, **data}, indent=2))
        return
    out = Console()
    out.print(summary_table(profile, title=f"{profile_path} · {profile.model.name}"))
    if heads:
        typer.echo("\n".join(head_lines(profile)))
    if model:
        out.print(f"matches {model}", markup=False, highlight=False)
    if figure:
        Console(stderr=True).print(f"figure: {figure}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("inspect", help=HELP, no_args_is_help=True)(inspect)
