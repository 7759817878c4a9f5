"""Benchmarks, in one home: ``attention`` (``vlsparse bench attention``: sparse CPU kernels against
dense SDPA), ``e2e`` (``vlsparse bench e2e``: whole-model prefill and decode per configuration),
``timing`` (the forward clock ``vlsparse eval`` shares) and ``profile_fuzz`` (the profile fuzzer
behind ``tests/test_profile_fuzz.py`` and ``benchmarks/fuzz_profiles.py``). The scripts in the
repository's ``benchmarks/`` folder call these.
"""
