"""Perplexity: worked examples with models whose probabilities are known."""

from __future__ import annotations

import math

import pytest
import torch

from vlsparse.perplexity import perplexity, pydoc_text, token_windows


class UniformLM(torch.nn.Module):
    """Every next token has probability 1/vocab: perplexity must be exactly vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


class CopyLM(UniformLM):
    """Puts probability p on the previous token repeated: on a constant text, NLL = -log p."""

    def __init__(self, vocab: int, p: float) -> None:
        super().__init__(vocab)
        self.p = p

    def forward(self, input_ids):
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*input_ids.shape, self.vocab), rest)
        probs.scatter_(-1, input_ids.unsqueeze(-1), self.p)
        return type("Out", (), {"logits": probs.log()})()


def char_tokenizer(text, return_tensors="pt", add_special_tokens=False):
    return {"input_ids": torch.tensor([[ord(c) % 50 for c in text]])}


def test_uniform_model_has_perplexity_equal_to_vocab():
    result = perplexity(UniformLM(50), char_tokenizer, "abcdefghij" * 10, seq_len=16)
    assert result.perplexity == pytest.approx(50.0, rel=1e-5)
    assert result.windows == 6 and result.tokens == 6 * 15


def test_confident_copy_model_on_constant_text():
    result = perplexity(CopyLM(50, 0.8), char_tokenizer, "a" * 64, seq_len=32)
    assert result.perplexity == pytest.approx(1 / 0.8, rel=1e-5)
    assert result.nll == pytest.approx(-math.log(0.8), rel=1e-5)


def test_windows_drop_the_ragged_tail():
    windows = token_windows(torch.arange(10), 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pydoc_split_is_disjoint_and_fixed():
    held, calib = pydoc_text("heldout"), pydoc_text("calib")
    assert held and calib and held == pydoc_text("heldout")
    held_parts, calib_parts = set(held.split("\n\n")), set(calib.split("\n\n"))
    assert not held_parts & calib_parts
    assert 0.15 < len(held) / (len(held) + len(calib)) < 0.25
