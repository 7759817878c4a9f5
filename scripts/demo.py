"""`make demo`: the three commands users run, in sequence, on the embedded demo model.

Runs them as a user would (the installed `vlsparse` command) in a work folder,
so outputs land there: profile -> prune -> run. A command that is not
implemented yet in this version says so (exit 2) and the demo goes on.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_IMPLEMENTED = 2


def vlsparse_command() -> list[str]:
    exe = shutil.which("vlsparse", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlsparse"]


def demo_model_available() -> bool:
    from vlsparse.models.source import demo_folder
    from vlsparse.errors import ModelLoadError

    try:
        demo_folder()
    except ModelLoadError:
        return False
    return True


def fallback_model(workdir: Path) -> tuple[str, Path]:
    """A tiny random LLaVA built here, used only while the demo weights are missing."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_llava  # noqa: E402
    from PIL import Image

    folder = tiny_llava(workdir)
    image = workdir / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    return str(folder), image


def step(title: str, args: list[str], workdir: Path) -> int:
    print(f"\n$ vlsparse {' '.join(args)}", flush=True)
    code = subprocess.call(vlsparse_command() + args, cwd=workdir)
    if code == NOT_IMPLEMENTED:
        print(f"({title}: not implemented in this version yet; continuing)", flush=True)
    elif code != 0:
        raise SystemExit(f"demo: `vlsparse {args[0]}` failed with exit code {code}")
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-run", help="folder the commands run in (outputs land there)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if demo_model_available():
        model_args: list[str] = []
        image = REPO / "examples" / "scene.png"
        question = "What color is the circle?"  # yellow
    else:
        print("demo: the embedded demo model is not in this build yet; using a tiny random LLaVA built now "
              "(its answers are gibberish).", flush=True)
        model, image = fallback_model(workdir)
        model_args = ["--model", model]
        question = "what color is this ?"
    step("profile", ["profile", *model_args, "--force"], workdir)  # a rerun replaces its own profile
    step("prune", ["prune", *model_args, "--ratio", "0.5", "--force"], workdir)
    step("run", ["run", *model_args, str(image), question], workdir)


if __name__ == "__main__":
    main()
