"""Which profile a command uses for a model: the one rule, shared by run, calibrate, eval and bench.

1. ``--profile PATH`` when given (it must exist; it is checked against the model).
2. ``./profiles/<model-name>.yaml``, where ``vlsparse profile`` and ``vlsparse
   calibrate`` write by default, if it was made for this model (one made for
   another model is skipped with a note).
3. ``<model folder>/vlsparse.yaml``, the profile ``vlsparse prune`` writes into
   a checkpoint.

Otherwise none: the model runs dense.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

CHECKPOINT_PROFILE = "vlsparse.yaml"


def default_profile_path(model_name: str, cwd: str | Path | None = None) -> Path:
    """``profiles/<model-name>.yaml`` (relative, or under ``cwd``): where profile and calibrate write."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip("-.") or "model"
    relative = Path("profiles") / f"{safe}.yaml"
    return Path(cwd) / relative if cwd is not None else relative


def locate_profile(model_folder: str | Path, model_name: str, fingerprint, explicit: str | Path | None = None,
                   note: Callable[[str], None] | None = None, cwd: str | Path | None = None):
    """``(path, Profile)`` by the rule above, or ``(None, None)``.

    ``fingerprint`` is the model's (``adapter.fingerprint()``); an explicit profile
    that does not match raises ``ProfileError``, a found one is skipped.
    """
    from vlsparse.errors import ProfileError
    from vlsparse.profile import check_profile_matches, load_profile

    if explicit is not None:
        profile = load_profile(explicit)
        check_profile_matches(profile, fingerprint, f"profile {explicit}")
        return Path(explicit), profile
    for candidate in (default_profile_path(model_name, cwd), Path(model_folder) / CHECKPOINT_PROFILE):
        if not candidate.is_file():
            continue
        profile = load_profile(candidate)
        try:
            check_profile_matches(profile, fingerprint, f"profile {candidate}")
        except ProfileError:
            if note is not None:
                note(f"note: {candidate} is for another model; not using it")
            continue
        return candidate, profile
    return None, None
