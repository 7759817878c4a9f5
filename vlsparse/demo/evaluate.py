"""Accuracy on the demo benchmark: held-out scenes with known one-word answers.

Samples come from ``scenes.EVAL_SEEDS`` (disjoint from training); sample
``i`` of a run with ``seed=s`` uses seed ``EVAL_SEED_BASE + s + i``. The model
answers greedily in its own prompt format (its chat template, with the images
as the generator labels them); an answer is right when its first word equals
the expected word. The interval is Wilson's 95% score interval.
"""

from __future__ import annotations

import math
import string
from collections import defaultdict
from typing import Callable

import torch

from vlsparse.demo import build, scenes, wild


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def prompt_for(processor, sample: scenes.Sample) -> str:
    """The sample's prompt through the processor's chat template (labels as text items)."""
    if getattr(processor, "chat_template", None):
        return build.build_prompt(processor, sample)
    token = getattr(processor, "image_token", "<image>")
    _, labels = sample.model_images()
    images = " ".join(f"{label} {token}".strip() for label in labels)
    return f"USER: {images}\n{sample.question} ASSISTANT:"


@torch.inference_mode()
def answer_sample(model, processor, sample: scenes.Sample, max_new_tokens: int = 3) -> tuple[str, int]:
    """The model's greedy answer to a sample, and the prompt length in tokens."""
    images, _ = sample.model_images()
    device = next(model.parameters()).device
    inputs = processor(text=[prompt_for(processor, sample)], images=images, return_tensors="pt").to(device)
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True), prompt_len


def summarize(task: str, seed: int, samples: list[scenes.Sample], answers: list[str],
              prompt_lens: list[int]) -> dict:
    """The result dict of ``evaluate`` from first-word answers given to ``samples``."""
    n = len(samples)
    per = defaultdict(lambda: [0, 0])
    correct, chance = 0, 0.0
    for sample, answer in zip(samples, answers):
        ok = answer == sample.answer
        correct += ok
        chance += 1 / len(scenes.ANSWERS[sample.qtype])
        per[sample.qtype][0] += ok
        per[sample.qtype][1] += 1
    return {
        "task": task,
        "n": n,
        "seed": seed,
        "accuracy": correct / n if n else 0.0,
        "ci95": wilson_interval(correct, n),
        "per_qtype": {q: {"n": t, "accuracy": c / t} for q, (c, t) in sorted(per.items())},
        "chance": chance / n if n else 0.0,
        "mean_prompt_tokens": sum(prompt_lens) / n if n else 0.0,
        "answers": list(answers),
    }


def eval_samples(task: str, n: int, seed: int = 0, **sample_kwargs) -> list[scenes.Sample]:
    """The ``n`` held-out samples of a run with ``seed``: ``scenes`` tasks, or ``wild`` ones (``vlsparse.demo.wild``)."""
    source = wild.generate if task in wild.WILD_TASKS else scenes.generate
    return source(task, n, scenes.EVAL_SEED_BASE + seed, **sample_kwargs)


def evaluate(model, processor, task: str = "vqa", n: int = 200, seed: int = 0,
             progress: Callable[[], None] | None = None, **sample_kwargs) -> dict:
    """Accuracy of ``model`` on ``n`` held-out samples of ``task`` (vqa, multi, grid, long, wild, wild-dark).

    Returns ``accuracy``, ``ci95``, ``per_qtype`` ({qtype: {n, accuracy}}),
    ``chance`` (mean 1/#answers), ``mean_prompt_tokens``, ``n``, ``seed``, ``task``, and
    ``answers`` (the first word of each answer, in sample order, to compare two runs).
    """
    return evaluate_paired(model, processor, {"model": None}, task, n, seed, progress, **sample_kwargs)["model"]


def evaluate_paired(model, processor, modes: dict[str, Callable[[], None] | None], task: str = "vqa",
                    n: int = 200, seed: int = 0, progress: Callable[[], None] | None = None,
                    **sample_kwargs) -> dict[str, dict]:
    """``evaluate`` under several modes of one model, taking turns on every sample.

    ``modes`` maps a name to a function that switches the model into that mode (or None);
    each sample is answered in every mode, in order, before the next sample, so a machine
    whose speed drifts slows the modes alike (for timings taken by hooks meanwhile).
    ``progress`` is called after each sample's last mode. Returns {name: evaluate's dict}.
    """
    was_training = model.training
    model.eval()
    samples = eval_samples(task, n, seed, **sample_kwargs)
    answers: dict[str, list[str]] = {name: [] for name in modes}
    lens: dict[str, list[int]] = {name: [] for name in modes}
    for sample in samples:
        for name, switch in modes.items():
            if switch is not None:
                switch()
            text, prompt_len = answer_sample(model, processor, sample)
            answers[name].append(first_word(text))
            lens[name].append(prompt_len)
        if progress is not None:
            progress()
    if was_training:
        model.train()
    return {name: summarize(task, seed, samples, answers[name], lens[name]) for name in modes}
