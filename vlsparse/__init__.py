"""vlsparse: make vision-language models cheaper to run."""

__version__ = "0.1.0"
