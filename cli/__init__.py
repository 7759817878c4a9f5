"""Command-line interface (Typer app); wiring only."""

if __name__ != "vlsparse.cli":  # imported as a bare ``cli`` from the repository root: see vlsparse/toplevel.py
    from vlsparse.toplevel import hand_over

    hand_over(__name__, __file__)
