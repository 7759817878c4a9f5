"""The sparsity profile: the only contract between the offline half and the runtime.

One package owns the profile: its schema and every section's (``schema``: the
document, model fingerprint, calibration and attention section; ``core``,
``pruning`` and ``tokens``: the sections of those names), the checks that make any malformed file one
``ProfileError`` (``checks``), and the rule that finds the profile a command uses
(``locate``). The fuzz mutator that tests the loader is ``vlsparse.bench.profile_fuzz``.
"""

from vlsparse.profile.schema import (PATTERN_BUDGETS, PATTERNS, PROFILE_VERSION, AttentionProfile, Calibration,
                                     HeadProfile, ModelFingerprint, Profile, check_profile_matches, config_sha256,
                                     head_to_dict, load_profile, profile_from_dict, profile_to_dict, save_profile,
                                     sidecar_path, with_section)

__all__ = ["PATTERN_BUDGETS", "PATTERNS", "PROFILE_VERSION", "AttentionProfile", "Calibration", "HeadProfile",
           "ModelFingerprint", "Profile", "check_profile_matches", "config_sha256", "head_to_dict", "load_profile",
           "profile_from_dict", "profile_to_dict", "save_profile", "sidecar_path", "with_section"]
