"""Sparse prefill attention: Triton kernels, torch references, the CPU path, registration."""
