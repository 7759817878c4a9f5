"""Attention capture, exact blockwise recall, per-head sparse-pattern search."""

if __name__ != "vlsparse.search":  # imported as a bare ``search`` from the repository root: see vlsparse/toplevel.py
    from vlsparse.toplevel import hand_over

    hand_over(__name__, __file__)
