"""The core-neuron answer guard: whole greedy answers with core neurons must equal dense ones,
and the run of layers narrows, dropping its worse end, until they do."""

from __future__ import annotations

import torch

from vlsparse.compress import core_guard
from vlsparse.kernels import core_runtime
from vlsparse.profile.core import CoreSettings

ROWS = [{"layer": i, "decode_error": e} for i, e in enumerate([0.9, 0.2, 0.3, 0.6])]


def _fake_model(monkeypatch, bad_layers: set[int]):
    """Answers change (end-of-sequence lost) on prompt 1 whenever a layer in ``bad_layers`` runs core neurons."""
    active: list[tuple[int, ...]] = []

    def attach(loaded, settings, neurons, tokens):
        active.append(settings.neuron_layers)
        return settings

    def detach(loaded, runtime):
        active.append(())

    def answer(loaded, batch, new_tokens):
        prompt = int(batch["input_ids"][0, 0])
        layers = active[-1] if active else ()
        broken = prompt == 1 and bool(set(layers) & bad_layers)
        return [7, 7, 7, 7] if broken else [7, 2]

    monkeypatch.setattr(core_runtime, "attach_core", attach)
    monkeypatch.setattr(core_runtime, "detach_core", detach)
    monkeypatch.setattr(core_guard, "greedy_answer", answer)
    inputs = [{"input_ids": torch.tensor([[p] * n])} for p, n in ((0, 150), (1, 300), (2, 4000))]
    return inputs, active


def test_the_run_loses_its_worse_end_until_every_answer_matches(monkeypatch):
    inputs, active = _fake_model(monkeypatch, bad_layers={0, 3})
    run, record = core_guard.answer_guard(None, inputs, (0, 3), ROWS, CoreSettings(), 16)
    # layer 0 (error 0.9) goes first, then layer 3 (0.6 > 0.2): layers 1-2 keep every answer
    assert run == (1, 2)
    assert record["dropped_layers"] == [0, 3] and record["matched"] == 3 and record["prompts"] == 3
    assert record["prompt_tokens"] == {"least": 150, "most": 4000}
    assert [a for a in active if a] == [(0, 1, 2, 3), (1, 2, 3), (1, 2)]


def test_no_layer_survives_when_every_one_breaks_an_answer(monkeypatch):
    inputs, _ = _fake_model(monkeypatch, bad_layers={0, 1, 2, 3})
    run, record = core_guard.answer_guard(None, inputs, (1, 2), ROWS, CoreSettings(), 16)
    assert run is None and record["matched"] == 0 and record["dropped_layers"] == [2, 1]


def test_given_layers_are_kept_and_the_record_says_what_matched(monkeypatch):
    inputs, _ = _fake_model(monkeypatch, bad_layers={3})
    run, record = core_guard.answer_guard(None, inputs, (0, 3), ROWS, CoreSettings(), 16, automatic=False)
    assert run == (0, 3) and record["matched"] == 2 and record["dropped_layers"] == []


def test_greedy_answer_stops_at_end_of_sequence(llama_dir):
    from vlsparse.models import load

    loaded = load(llama_dir)
    tokenizer = loaded.processor
    batch = loaded.adapter.prepare_text(loaded.processor, "hello there")
    full = core_guard.greedy_answer(loaded, batch, 6)
    assert 1 <= len(full) <= 6
    # make the model's third answer token the end-of-sequence token: the answer stops there
    eos = full[2] if len(full) > 2 else full[-1]
    tokenizer.eos_token_id = loaded.model.generation_config.eos_token_id = eos
    stopped = core_guard.greedy_answer(loaded, batch, 6)
    assert stopped == full[: full.index(eos) + 1]
