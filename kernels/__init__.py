"""Sparse prefill attention: Triton kernels, torch references, the CPU path, registration."""

if __name__ != "vlsparse.kernels":  # imported as a bare ``kernels`` from the repository root: see vlsparse/toplevel.py
    from vlsparse.toplevel import hand_over

    hand_over(__name__, __file__)
