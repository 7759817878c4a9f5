"""Attention capture, exact blockwise recall, per-head sparse-pattern search."""
