"""`vlsparse recipe`: export the settings of a compression as a recipe, and replay a recipe on a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import ForceOpt, JsonOpt, QuietOpt
from vlsparse.cli.quiet import quiet_transformers

HELP = """Recipes: the settings of a whole compression (profile, prune, calibrate) as one YAML file.

Every command records its options in the profile it writes, so a recipe can be
exported from any compressed checkpoint (or profile) and replayed on another model.
"""

EXPORT_HELP = """Write the recipe of the commands that made a checkpoint or a profile.

SOURCE is a checkpoint folder holding vlsparse.yaml, or a profile .yaml. The
recipe holds settings only (no masks, no per-head results, no model paths): one
step per command, its options under the flags' names (--seq-len -> seq_len).
It goes to stdout, or to --out; nothing is written into SOURCE.

Examples:

\b
  vlsparse recipe export ./demo-ecoflap-50
  vlsparse recipe export ./demo-ecoflap-50 --out recipe.yaml
  vlsparse recipe export profiles/demo.yaml --json
"""

APPLY_HELP = """Replay a recipe on a model: each step through the command it names, in order.

profile -> WORKDIR/profile.yaml; prune (carrying that profile) -> WORKDIR/checkpoint;
calibrate on the pruned checkpoint, adding its section to the checkpoint's
vlsparse.yaml (without a prune step: to WORKDIR/profile.yaml). Calibration files
the recipe names are read relative to the recipe's folder. Progress goes to
stderr, then a table of what each step wrote, its time and peak RSS; the
checkpoint (or profile) path goes to stdout.

Examples:

\b
  vlsparse recipe apply recipe.yaml
  vlsparse recipe apply recipe.yaml ./llava-1.5-7b-hf --workdir llava-compressed
  vlsparse recipe apply recipe.yaml ./SmolLM2-135M-Instruct --force --json
"""


def _source_profile(source: Path):
    from vlsparse.compress.checkpoint import PROFILE_NAME
    from vlsparse.errors import InputError
    from vlsparse.profile import load_profile

    if source.is_dir():
        if not (source / PROFILE_NAME).is_file():
            raise InputError(f"{source} holds no {PROFILE_NAME}",
                             "give a checkpoint folder written by `vlsparse prune`, or a profile .yaml")
        return load_profile(source / PROFILE_NAME)
    if source.suffix not in (".yaml", ".yml"):
        raise InputError(f"{source} is neither a checkpoint folder nor a profile .yaml",
                         "give a folder written by `vlsparse prune`, or a profile .yaml")
    return load_profile(source)


@friendly_errors
def export(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", show_default=False,
                                           help="Checkpoint folder (with vlsparse.yaml) or profile .yaml.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the recipe here [default: stdout].",
                                               show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from vlsparse.atomic import check_output
    from vlsparse.errors import InputError
    from vlsparse.recipe import recipe_from_profile, recipe_text, save_recipe

    if out and Path(out).suffix not in (".yaml", ".yml"):
        raise InputError(f"--out {out} should end in .yaml", "e.g. --out recipe.yaml")
    if not source.exists():
        raise InputError(f"{source} not found", "give a checkpoint folder or a profile .yaml")
    if out:
        check_output(out, force=force, inputs=[source])
    recipe = recipe_from_profile(_source_profile(source))
    if out:
        save_recipe(recipe, out, force=force)
    if json_out:
        typer.echo(json.dumps({"out": out, "recipe": recipe} if out else recipe, indent=2))
    elif out:
        typer.echo(out)
    else:
        typer.echo(recipe_text(recipe), nl=False)


def steps_table(result, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in (("step", "left"), ("wrote", "left"), ("time", "right"), ("peak RSS", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in result.steps:
        table.add_row(row.step, row.wrote, f"{row.seconds:.1f} s", f"{row.peak_rss_mb:.0f} MiB")
    table.add_section()
    table.add_row("all", str(result.workdir), f"{sum(r.seconds for r in result.steps):.1f} s",
                  f"{max((r.peak_rss_mb for r in result.steps), default=0):.0f} MiB")
    return table


@friendly_errors
def apply(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="Recipe YAML (from `vlsparse recipe export`).")],
    model_arg: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", show_default=False, help="Model folder, hub id or `demo` [default: demo].")] = None,
    workdir: Annotated[Optional[str], typer.Option("--workdir", "-w", help="Folder for the outputs "
                                                   "[default: ./MODEL-recipe].", show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.recipe import load_recipe
    from vlsparse.recipe_apply import apply_recipe

    data = load_recipe(recipe)  # a bad recipe is refused before any model work
    model = model_arg or "demo"
    folder = Path(workdir) if workdir else Path(f"{Path(model).name}-recipe")
    err = Console(stderr=True)
    show = not (quiet or json_out)
    say = (lambda m: err.print(m, markup=False, highlight=False)) if show else None
    with quiet_transformers():
        result = apply_recipe(data, model, folder, progress=say, force=force, base=recipe.parent)
    final = result.checkpoint or result.profile
    if json_out:
        typer.echo(json.dumps({"workdir": str(result.workdir), "checkpoint": str(result.checkpoint)
                               if result.checkpoint else None, "profile": str(result.profile)
                               if result.profile else None,
                               "steps": [vars(s) for s in result.steps]}, indent=2))
        return
    if show:
        err.print(steps_table(result, f"vlsparse recipe apply · {recipe.name} on {model}"))
    typer.echo(str(final))


def register(app: typer.Typer) -> None:
    group = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
    group.command("export", help=EXPORT_HELP)(export)
    group.command("apply", help=APPLY_HELP)(apply)
    app.add_typer(group, name="recipe")
