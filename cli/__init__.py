"""Command-line interface (Typer app); wiring only."""
