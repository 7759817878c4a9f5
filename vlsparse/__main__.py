"""`python -m vlsparse` runs the CLI."""

from vlsparse.cli.main import entry

if __name__ == "__main__":
    entry()
