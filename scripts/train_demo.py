"""Train the embedded demo VLM on procedurally generated scenes (CPU, fp32, about an hour).

Reproducible: every sample comes from ``vlsparse.demo.scenes`` with a seed
fixed by (step, slot), the model is initialised from ``--seed``, and the data
order is a pure function of the step, so re-running the first few hundred
steps reproduces the start of the logged loss curve (up to float
non-associativity across thread counts).

Stage 1 (``--vision-steps``): the vision tower alone, on dense per-patch labels (kind
and colour of the shape in the patch's layout cell, and the cell), standing in for the
pretrained CLIP encoder that LLaVA starts from (``pretrain_vision``).

Stage 2, the whole LLaVA model; curriculum (fractions of ``--steps``):

- all steps: single scenes (``vqa``), ``--questions`` distinct question/answer turns
  per image, loss on the answer tokens (and the ``</s>`` after them) only; with
  probability ``--caption-prob`` a last turn "Describe this picture." whose answer
  lists every shape ("topleft red circle , center blue star"): a dense auxiliary
  target that makes the vision tower useful much sooner than one-word answers do
  (a run without it sat at the answer prior, ~25% held-out, for 1,000+ steps);
- the first ``--easy-until`` of the steps draw scenes of at most ``--easy-shapes``
  shapes, where every answer is read off one object;
- from ``--multi-from``: every ``--long-every``-th step is one ``multi`` or
  ``grid`` sample instead (few images first, the full 16-32 scenes / 4x4-5x5
  grids of 4,096+ tokens in the last ``--full-from`` part).

Writes the weights, processor, ``train_config.json`` and ``train_log.jsonl``
(step, loss, lr, seconds, and held-out accuracy every ``--eval-every`` steps)
into ``--out`` (default: the packaged ``vlsparse/demo/weights``), saving a
usable checkpoint at every evaluation.

    python scripts/train_demo.py                 # the shipped model
    python scripts/train_demo.py --steps 300 --out /tmp/demo-check   # check the start of the curve
    python scripts/train_demo.py --init vlsparse/demo/weights --start-step 500 ...   # continue a run
                                 # (same data order; fresh optimiser, re-warmed over --warmup steps)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlsparse.demo import build, scenes


LONG_MULTI_IMAGES = (16, 32)
"""Scenes per full-size ``multi`` training sample (pinned here, not taken from the generator's defaults)."""
LONG_GRID_SIDES = (4, 6)
"""Rows and columns of full-size grids in training: a 6x6 grid is the 4,096+ token evaluation."""


@dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 8
    questions: int = 6
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    long_every: int = 4
    multi_from: float = 0.25
    full_from: float = 0.75
    eval_every: int = 200
    eval_n: int = 100
    vision_steps: int = 300
    vision_batch: int = 32
    vision_lr: float = 2e-3
    caption_prob: float = 0.5
    easy_until: float = 0.2
    easy_shapes: int = 2
    threads: int = 2
    out: str = ""
    init: str = ""
    start_step: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_samples(step: int, cfg: TrainConfig) -> list[scenes.Sample]:
    """The samples of one step: a pure function of (step, seed)."""
    rng = random.Random(f"train:{cfg.seed}:{step}")
    base = scenes.TRAIN_SEED_BASE + cfg.seed * 10_000_000 + step * 64
    frac = step / cfg.steps
    if frac >= cfg.multi_from and step % cfg.long_every == cfg.long_every - 1:
        full = frac >= cfg.full_from and rng.random() < 0.5
        if rng.random() < 0.6:
            n_images = rng.randint(*LONG_MULTI_IMAGES) if full else rng.randint(2, 8)
            return [scenes.sample("multi", scenes.sample_rng("multi", base), n_images=n_images,
                                  n_questions=cfg.questions * 2)]
        side = (rng.randint(*LONG_GRID_SIDES), rng.randint(*LONG_GRID_SIDES)) if full else \
            (rng.randint(1, 3), rng.randint(2, 3))
        return [scenes.sample("grid", scenes.sample_rng("grid", base), grid=side, n_questions=cfg.questions * 2)]
    max_shapes = cfg.easy_shapes if frac < cfg.easy_until else scenes.MAX_SHAPES
    out = []
    for i in range(cfg.batch):
        s = scenes.sample("vqa", scenes.sample_rng("vqa", base + i), n_questions=cfg.questions, max_shapes=max_shapes)
        seen = {s.question}
        s.followups = [qa for qa in s.followups if not (qa.question in seen or seen.add(qa.question))]
        if rng.random() < cfg.caption_prob:
            s.followups.append(scenes.describe(s.scenes[0]))
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
    out = torch.zeros(side * side, 3, dtype=torch.long)
    for i in range(side):
        for j in range(side):
            row = min(2, int((i + 0.5) / side * 3))
            col = min(2, int((j + 0.5) / side * 3))
            s = by_cell.get((row, col))
            out[i * side + j] = torch.tensor([
                0 if s is None else 1 + scenes.SHAPES.index(s.kind),
                0 if s is None else 1 + colors.index(s.color),
                row * 3 + col,
            ])
    return out


def pretrain_vision(model, processor, cfg: TrainConfig, log, start: float) -> None:
    """Stage 1: train the vision tower alone on dense per-patch labels (``patch_targets``).

    LLaVA assumes a pretrained vision encoder; trained from scratch through the one-word
    answers only, the tower stays uninformative for a long time. A linear head on the last
    layer's patch features predicts, per patch, the kind and colour of the shape in its
    layout cell and the cell itself (cross-entropy, summed). Dropped after this stage.
    """
    tower = model.model.vision_tower
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    hidden = model.config.vision_config.hidden_size
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(hidden, sum(n for _, n in PATCH_HEADS))
    params = list(tower.parameters()) + list(head.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.vision_steps):
        lr = cfg.vision_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vision_steps)))
        for group in optim.param_groups:
            group["lr"] = lr
        base = scenes.TRAIN_SEED_BASE + cfg.seed * 10_000_000 + 5_000_000 + step * cfg.vision_batch
        shapes = [scenes.random_scene(scenes.sample_rng("vision", base + i)) for i in range(cfg.vision_batch)]
        pixels = processor.image_processor([scenes.render(s) for s in shapes], return_tensors="pt")["pixel_values"]
        target = torch.stack([patch_targets(s, side) for s in shapes])  # [B, side*side, 3]
        feats = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS, as LLaVA does
        logits = head(feats).split([n for _, n in PATCH_HEADS], dim=-1)
        losses = [torch.nn.functional.cross_entropy(lg.flatten(0, 1), target[..., k].flatten())
                  for k, lg in enumerate(logits)]
        loss = sum(losses)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        with torch.no_grad():
            acc = {name: round(float((lg.argmax(-1) == target[..., k]).float().mean()), 3)
                   for k, ((name, _), lg) in enumerate(zip(PATCH_HEADS, logits))}
        record = {"stage": "vision", "step": step, "loss": round(loss.item(), 5), "lr": round(lr, 7),
                  "patch_accuracy": acc, "seconds": round(time.time() - start, 1)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % 20 == 0:
            print(json.dumps(record), flush=True)


def train(cfg: TrainConfig) -> Path:
    from transformers import LlavaForConditionalGeneration

    from vlsparse.demo.evaluate import evaluate

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else build.demo_path()
    out.mkdir(parents=True, exist_ok=True)
    processor = build.build_processor()
    model = LlavaForConditionalGeneration(build.build_config(processor.tokenizer))
    if cfg.init:  # continue from a saved checkpoint (weights only; the optimiser restarts)
        model = LlavaForConditionalGeneration.from_pretrained(cfg.init, dtype=torch.float32)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    name = f"train_config_from_{cfg.start_step}.json" if cfg.start_step else "train_config.json"
    (out / name).write_text(json.dumps(asdict(cfg), indent=2))
    log = (out / "train_log.jsonl").open("a" if cfg.start_step else "w")
    start = time.time()
    if not cfg.init and cfg.vision_steps:
        pretrain_vision(model, processor, cfg, log, start)
    for step in range(cfg.start_step, cfg.steps):
        model.train()
        rewarm = min(1.0, (step - cfg.start_step + 1) / cfg.warmup) if cfg.start_step else 1.0
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg) * rewarm
        samples = step_samples(step, cfg)
        batch = collate(samples, processor)
        loss = model(**batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        record = {"step": step, "loss": round(loss.item(), 5), "lr": round(lr_at(step, cfg), 7),
                  "task": samples[0].task, "tokens": int(batch["input_ids"].numel()),
                  "seconds": round(time.time() - start, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            record["eval_vqa"] = evaluate(model, processor, "vqa", cfg.eval_n, seed=0)["accuracy"]
            if step / cfg.steps >= cfg.multi_from:
                record["eval_multi_short"] = evaluate(model, processor, "multi", 30, seed=0, n_images=6)["accuracy"]
            build.save_demo(model, out, processor)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % 20 == 0 or "eval_vqa" in record:
            print(json.dumps(record), flush=True)
    return out


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return TrainConfig(**vars(parser.parse_args()))


if __name__ == "__main__":
    train(parse_args())
