"""Shipped sparsity profiles for known models (data)."""
