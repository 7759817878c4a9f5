"""The demo training recipe's settings and data (used by ``train_demo.py``, whose docstring has the recipe).

``TrainConfig`` holds every command-line setting; ``step_samples`` draws a step's samples
as a pure function of (step, seed); ``collate`` turns them into a batch with answer-only
labels; ``patch_targets``, ``tile_targets`` and ``slot_targets`` label the vision
patches; ``arm_probes`` gives the attention-supervision probes their targets for a batch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

import attention_supervision as supervision
from vlsparse.demo import build, scenes


LONG_MULTI_IMAGES = (16, 32)
"""Scenes per full-size ``multi`` training sample (pinned here, not taken from the generator's defaults);
``--long-images`` raises the upper end."""
LONG_GRID_SIDES = (4, 6)
"""Rows and columns of full-size grids in training: a 6x6 grid is the 4,096+ token evaluation."""


@dataclass
class TrainConfig:
    """Every setting of the recipe; ``train_demo.py`` makes each field a ``--flag`` (``long_every``: ``--long-every``)."""

    steps: int = 4000
    batch: int = 8
    questions: int = 12
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    long_every: int = 2
    multi_from: float = 0.1
    full_from: float = 0.4
    eval_every: int = 500
    eval_n: int = 100
    long_images: int = LONG_MULTI_IMAGES[1]
    vision_steps: int = 1000
    vision_batch: int = 32
    vision_lr: float = 2e-3
    vision_tiles: float = 0.0
    freeze_vision: int = 1
    image_norm: float = 0.0
    leak_free: int = 1
    kind_caption_prob: float = 0.0
    scene_slots: int = 0
    attn_sup: str = "label:0:4-5,word:0:0-3,image:1:0-3,object:2:0-3,object:3:0-1"
    attn_sup_weight: float = 1.0
    local_weight: float = 1.0
    image_rms: float = 1.0
    image_rms_weight: float = 1.0
    reset_lm: int = 0
    feature_probe_layer: int = 2
    feature_probe_weight: float = 1.0
    caption_prob: float = 1.0
    easy_until: float = 0.1
    easy_shapes: int = 2
    threads: int = 2
    out: str = ""
    init: str = ""
    start_step: int = 0
    stop_after: int = 0


OBJECT_WORDS = frozenset(scenes.SHAPES) | frozenset(scenes.COLORS)


def without_leaks(first: scenes.QA, followups: list[scenes.QA]) -> list[scenes.QA]:
    """The follow-ups whose answer the conversation so far does not give away.

    A training conversation asks several questions about the same images; if an earlier
    turn named an object ("What shape is red? triangle"), a later one about it ("What
    color is the triangle?") is answered from the text, not the image, and teaches
    copying instead of looking. A follow-up is kept only if it repeats no earlier
    question and names no shape or colour already named, within the same image (or
    grid cell). Runs that kept them plateaued near 60% held-out accuracy.
    """
    seen_questions, named = {first.question}, set()

    def names(qa: scenes.QA) -> set[tuple[str, str]]:
        text = f"{qa.question} {qa.answer}".lower()
        match = supervision.QUESTION_SCOPE.match(text)
        scope = match.group(0) if match else ""
        return {(scope, w) for w in re.findall(r"[a-z]+", text) if w in OBJECT_WORDS}

    named |= names(first)
    kept = []
    for qa in followups:
        mentioned = names(qa)
        if qa.question in seen_questions or mentioned & named:
            continue
        seen_questions.add(qa.question)
        named |= mentioned
        kept.append(qa)
    return kept


def step_samples(step: int, cfg: TrainConfig) -> list[scenes.Sample]:
    """The samples of one step: a pure function of (step, seed)."""
    rng = random.Random(f"train:{cfg.seed}:{step}")
    base = scenes.TRAIN_SEED_BASE + cfg.seed * 10_000_000 + step * 64
    frac = step / cfg.steps
    if frac >= cfg.multi_from and step % cfg.long_every == cfg.long_every - 1:
        full = frac >= cfg.full_from and rng.random() < 0.5
        if rng.random() < 0.6:
            n_images = rng.randint(LONG_MULTI_IMAGES[0], cfg.long_images) if full else rng.randint(2, 8)
            long = scenes.sample("multi", scenes.sample_rng("multi", base), n_images=n_images,
                                 n_questions=cfg.questions * 2)
        else:
            side = (rng.randint(*LONG_GRID_SIDES), rng.randint(*LONG_GRID_SIDES)) if full else \
                (rng.randint(1, 3), rng.randint(2, 3))
            long = scenes.sample("grid", scenes.sample_rng("grid", base), grid=side, n_questions=cfg.questions * 2)
        if cfg.leak_free:
            long.followups = without_leaks(scenes.QA(long.question, long.answer, long.qtype), long.followups)
        return [long]
    ramp = min(1.0, frac / cfg.easy_until) if cfg.easy_until else 1.0
    max_shapes = cfg.easy_shapes + int(ramp * (scenes.MAX_SHAPES - cfg.easy_shapes) + 0.5)
    out = []
    for i in range(cfg.batch):
        s = scenes.sample("vqa", scenes.sample_rng("vqa", base + i), n_questions=cfg.questions, max_shapes=max_shapes)
        if cfg.leak_free:
            s.followups = without_leaks(scenes.QA(s.question, s.answer, s.qtype), s.followups)
        else:
            seen = {s.question}
            s.followups = [qa for qa in s.followups if not (qa.question in seen or seen.add(qa.question))]
        if rng.random() < cfg.caption_prob:
            by_kind = cfg.kind_caption_prob > 0 and rng.random() < cfg.kind_caption_prob
            s.followups.append((scenes.list_by_kind if by_kind else scenes.describe)(s.scenes[0]))
        out.append(s)
    return out


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels: every token after each "assistant :" up to and including its ``</s>``; -100 elsewhere."""
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    colon = tokenizer.convert_tokens_to_ids(":")
    eos = tokenizer.eos_token_id
    labels = torch.full_like(input_ids, -100)
    starts = (input_ids[:, :-2] == assistant) & (input_ids[:, 1:-1] == colon)
    b, pos = torch.nonzero(starts, as_tuple=True)
    for i, p in zip(b.tolist(), pos.tolist()):
        for q in range(p + 2, input_ids.shape[1]):
            labels[i, q] = input_ids[i, q]
            if input_ids[i, q] == eos:
                break
    return labels


def collate(samples: list[scenes.Sample], processor) -> dict:
    texts, images = [], []
    for s in samples:
        texts.append(processor.apply_chat_template(build.sample_messages(s, with_answers=True), tokenize=False))
        images.extend(s.model_images()[0])
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
    batch["labels"][batch["attention_mask"] == 0] = -100
    return dict(batch)


PATCH_HEADS = (("cell_kind", 1 + len(scenes.SHAPES)), ("cell_color", 1 + len(scenes.COLORS)), ("cell", 9))


def patch_targets(shapes: list[scenes.Shape], side: int) -> torch.Tensor:
    """Dense labels for the ``side x side`` vision patches of one scene: [side*side, 3].

    For each patch (its centre mapped back to the 64 px scene): the kind and the colour of
    the shape in the 3x3 layout cell the patch lies in (0 = empty cell), and the cell index.
    """
    by_cell = {(s.row, s.col): s for s in shapes}
    colors = list(scenes.COLORS)
    cells = supervision.patch_cells(side)
    out = torch.zeros(side * side, 3, dtype=torch.long)
    out[:, 2] = cells
    for patch, cell in enumerate(cells.tolist()):
        s = by_cell.get(divmod(cell, 3))
        if s is not None:
            out[patch, 0] = 1 + scenes.SHAPES.index(s.kind)
            out[patch, 1] = 1 + colors.index(s.color)
    return out


def tile_targets(shape: scenes.Shape, side: int) -> torch.Tensor:
    """``patch_targets`` for a grid tile: its one large shape labels every patch; the cell is the patch's own."""
    out = patch_targets([], side)
    out[:, 0] = 1 + scenes.SHAPES.index(shape.kind)
    out[:, 1] = 1 + list(scenes.COLORS).index(shape.color)
    return out


SLOT_HEADS = tuple((f"{kind}_{what}", n) for kind in scenes.SHAPES
                   for what, n in (("color", 1 + len(scenes.COLORS)), ("cell", 10)))
"""Scene-level labels, the same on every patch: for each shape kind, its colour and its
layout cell in the scene (0 = the scene has no such shape)."""


def slot_targets(shapes: list[scenes.Shape]) -> torch.Tensor:
    """The scene's ``SLOT_HEADS`` labels: [len(SLOT_HEADS)]."""
    by_kind = {s.kind: s for s in shapes}
    colors = list(scenes.COLORS)
    out = []
    for kind in scenes.SHAPES:
        s = by_kind.get(kind)
        out += [0, 0] if s is None else [1 + colors.index(s.color), 1 + s.row * 3 + s.col]
    return torch.tensor(out)


def arm_probes(probes, samples, batch, processor, image_token_id: int, side: int):
    """Give every probe its query rows and targets for this batch: [(kind, probe, valid, targets)]."""
    if not probes:
        return []
    turns = [[scenes.QA(s.question, s.answer, s.qtype)] + list(s.followups) for s in samples]
    kinds = {t.kind for t, _ in probes}
    found = supervision.build_targets(samples, turns, batch["input_ids"], processor.tokenizer, image_token_id,
                                      side, kinds)
    key_valid = batch["attention_mask"].bool()
    armed = []
    for t, probe in probes:
        rows, valid, targets = found[t.kind]
        if valid.any():
            probe.arm(rows, key_valid)
            armed.append((f"{t.kind}{t.layer}", probe, valid, targets))
    return armed
