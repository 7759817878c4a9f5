"""Fuzzed profiles on a tiny LLaVA: each one loads and runs, or is one ProfileError; nothing else."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vlsparse.profile import profile_to_dict
from vlsparse.bench.profile_fuzz import PROFILE_ERROR, RAN, base_profile, fuzz, make_case, prompt_inputs

CASES = 300
SEED = 0


@pytest.fixture(scope="module")
def loaded(llava_dir):
    from vlsparse.models import load

    return load(llava_dir)


@pytest.fixture(scope="module")
def outcomes(loaded, tmp_path_factory):
    import torch

    folder, threads = tmp_path_factory.mktemp("fuzz"), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is about 2.5x faster than two
    try:
        return list(fuzz(loaded, prompt_inputs(loaded), folder, CASES, seed=SEED))
    finally:
        torch.set_num_threads(threads)


def test_profile_fuzz_every_case_runs_or_is_a_profile_error(outcomes):
    others = [(i, o.case.mutations, o.message) for i, o in enumerate(outcomes) if o.result not in (RAN, PROFILE_ERROR)]
    assert not others, others[:5]


def test_profile_fuzz_reaches_both_outcomes_and_every_family(outcomes):
    counts = Counter(o.result for o in outcomes)
    assert counts[RAN] >= CASES // 10 and counts[PROFILE_ERROR] >= CASES // 2
    done = " ".join(m for o in outcomes for m in o.case.mutations)
    for family in ("replace", "delete", "extra", "share", "deep", "valid", "tensor", "sidecar", "text"):
        assert family in done


def test_profile_fuzz_errors_are_one_line_and_parsing_is_fast(outcomes):
    errors = [o.message for o in outcomes if o.result == PROFILE_ERROR]
    assert all(message and "\n" not in message for message in errors)
    assert max(o.parse_seconds for o in outcomes) < 2.0


def test_profile_fuzz_base_profile_loads_and_runs(loaded, tmp_path):
    from vlsparse.profile import save_profile
    from vlsparse.bench.profile_fuzz import FuzzCase, run_case

    path = save_profile(base_profile(loaded.adapter.fingerprint()), tmp_path / "base.yaml")
    case = FuzzCase([], path.read_bytes(), path.with_suffix(".safetensors").read_bytes())
    outcome = run_case(case, tmp_path, loaded, prompt_inputs(loaded))
    assert outcome.result == RAN, outcome.message


def test_profile_fuzz_make_case_is_reproducible(loaded):
    base = base_profile(loaded.adapter.fingerprint())
    data = profile_to_dict(base)
    first = make_case(random.Random("0:7"), data, base.tensors)
    again = make_case(random.Random("0:7"), data, base.tensors)
    assert first == again and first.text != make_case(random.Random("0:8"), data, base.tensors).text
    assert profile_to_dict(base) == data  # the base is not mutated in place
