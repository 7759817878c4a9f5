"""Attention supervision for the demo model's training (used by ``train_demo.py``).

The scene generator knows where every object is, so training can tell chosen
attention heads where to look, as an auxiliary loss next to the answer loss:

- ``object``: at the token that predicts an answer ("assistant :" -> answer), attend to
  the patches of the 3x3 layout cell holding the object the question names (in the
  named image or grid tile);
- ``image``: at the same token, attend to all patches of the named image or tile
  (multi and grid questions only);
- ``word``: at the same token, attend to the object words (colours, kinds, and the image
  or tile numerals) of the question just asked, so that the answer token knows what to
  look for;
- ``label``: at a sample of image patches, attend to the numerals of the image's own
  text label ("image 7 :", "row 2 column 3 :"), so that patches take in which image they
  belong to (multi and grid only);
- ``local``: at a sample of image patches and at every label token, attend only within
  the own image (its label and the patches so far) and to the ``SINK_TOKENS`` that open
  the prompt (multi and grid only). Nothing a patch needs lies in another image, so this
  costs the task nothing and makes the prefill attention of image rows block-local,
  which the sparse runtime can skip (issue 5).

The loss for one query row is ``-log(sum of the attention probability on the targets)``,
averaged over the supervised heads and rows. Without it the language model learnt
colour-keyed lookups and counts but looked at the wrong object for kind-keyed questions
(36% of the image attention on the target cell in the best head, 3x chance) and never
bound questions to one of many images.

Attention probabilities are computed only for the supervised query rows (``AttentionProbe``),
from the query and key states that transformers passes to the attention function
registered as ``TRAIN_ATTENTION``; the attention output itself is SDPA's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vlsparse.demo import build, scenes

TRAIN_ATTENTION = "vlsparse_train"
QUESTION_SCOPE = re.compile(r"^in (?:image (\d+)|row (\d+), column (\d+)),\s*")
"""The "In image k, " / "In row r, column c, " prefix of multi and grid questions (lower-cased)."""
KINDS = ("object", "image", "word", "label", "local")
LABEL_PATCHES = 16
"""Patches per image whose ``label`` attention is supervised (a fixed-stride sample)."""
LOCAL_PATCHES = 16
"""Patches per image whose ``local`` attention is supervised (fixed stride, offset by image)."""
SINK_TOKENS = 2
"""Tokens opening every prompt ("user :") that ``local`` rows may also attend to."""


@dataclass(frozen=True)
class HeadTarget:
    layer: int
    heads: tuple[int, ...]
    kind: str  # one of KINDS


def parse_heads(spec: str) -> list[HeadTarget]:
    """``"object:2:0-3,image:1:0-1,label:0:0"`` -> HeadTargets (kind:layer:heads)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, layer, heads = item.split(":")
            lo, _, hi = heads.partition("-")
            out.append(HeadTarget(int(layer), tuple(range(int(lo), int(hi or lo) + 1)), kind))
        except ValueError:
            raise ValueError(f"bad attention-supervision item {item!r}; expected kind:layer:heads, "
                             "e.g. object:2:0-3") from None
        if kind not in KINDS:
            raise ValueError(f"unknown attention-supervision kind {kind!r}; expected one of {', '.join(KINDS)}")
    return out


def turn_object(sample: scenes.Sample, qa: scenes.QA) -> tuple[int, int | None] | None:
    """(image index, layout cell or None for the whole image) a question is about, or None.

    Counts, captions and "is there ..." questions whose answer is "no" name no object.
    Grid questions name a tile; its one shape fills the tile, so the target is the tile.
    """
    text = qa.question.lower()
    image = 0
    match = QUESTION_SCOPE.match(text)
    if match:
        if match.group(1):
            image = int(match.group(1)) - 1
        else:
            rows_cols = sample.grid
            image = (int(match.group(2)) - 1) * rows_cols[1] + int(match.group(3)) - 1
            return image, None
        text = text[match.end():]
    if qa.qtype not in ("color", "shape", "position", "exist") or image >= len(sample.scenes):
        return None
    words = set(re.findall(r"[a-z]+", text))
    for s in sample.scenes[image]:
        if qa.qtype == "exist":
            hit = s.kind in words and s.color in words
        else:
            hit = (s.kind in words) if qa.qtype != "shape" else (s.color in words)
        if hit:
            return image, s.row * 3 + s.col
    return None


def patch_cells(side: int) -> torch.Tensor:
    """The 3x3 layout cell of each of the ``side x side`` patches (row-major)."""
    idx = (torch.arange(side) + 0.5) / side * 3
    cell = idx.long().clamp(max=2)
    return (cell[:, None] * 3 + cell[None, :]).flatten()


def build_targets(samples, turns, input_ids, tokenizer, image_token_id: int, side: int, kinds: set[str]):
    """Query rows and target key masks for one batch.

    ``turns[b]`` lists the QA turns of sample ``b`` in prompt order (captions included,
    they name no object). Returns {kind: (rows [B, R], valid [B, R], targets [B, R, L])}.
    """
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    user = tokenizer.convert_tokens_to_ids("user")
    colon = tokenizer.convert_tokens_to_ids(":")
    numerals = torch.tensor([tokenizer.convert_tokens_to_ids(str(k)) for k in range(1, build.MAX_NUMBER + 1)])
    object_words = torch.cat([numerals, torch.tensor([tokenizer.convert_tokens_to_ids(w)
                                                      for w in (*scenes.SHAPES, *scenes.COLORS)])])
    cells = patch_cells(side)
    B, L = input_ids.shape
    per_kind = {k: [[] for _ in range(B)] for k in kinds}
    for b, (sample, qas) in enumerate(zip(samples, turns)):
        ids = input_ids[b]
        image_pos = (ids == image_token_id).nonzero()[:, 0]
        n_images = image_pos.numel() // (side * side)
        patches = image_pos[: n_images * side * side].view(n_images, side * side)
        starts = ((ids[:-1] == assistant) & (ids[1:] == colon)).nonzero()[:, 0] + 1
        users = ((ids[:-1] == user) & (ids[1:] == colon)).nonzero()[:, 0] + 1
        last_image = int(image_pos[-1]) if image_pos.numel() else 0
        for row, qa in zip(starts.tolist(), qas):
            if "word" in kinds:
                begin = max([last_image] + [u for u in users.tolist() if u < row])
                span = torch.arange(begin + 1, row)
                words = span[torch.isin(ids[span], object_words)]
                if words.numel():
                    per_kind["word"][b].append((row, words))
            hit = turn_object(sample, qa)
            if hit is None or hit[0] >= n_images:
                continue
            image, cell = hit
            if "object" in kinds:
                keys = patches[image] if cell is None else patches[image][cells == cell]
                per_kind["object"][b].append((row, keys))
            if "image" in kinds and sample.task != "vqa":
                per_kind["image"][b].append((row, patches[image]))
        if "local" in kinds and n_images > 1:
            stride = max(1, side * side // LOCAL_PATCHES)
            for i in range(n_images):
                begin = int(patches[i - 1, -1]) + 1 if i else SINK_TOKENS
                keys = torch.cat([torch.arange(SINK_TOKENS), torch.arange(begin, int(patches[i, -1]) + 1)])
                rows = torch.cat([torch.arange(begin, int(patches[i, 0])), patches[i, i % stride::stride]])
                per_kind["local"][b].extend((row, keys) for row in rows.tolist())
        if "label" in kinds and n_images > 1:
            stride = max(1, side * side // LABEL_PATCHES)
            for i in range(n_images):
                first = int(patches[i, 0])
                prev = int(patches[i - 1, -1]) if i else 0
                span = torch.arange(prev + 1, first)
                nums = span[torch.isin(ids[span], numerals)]
                if nums.numel():
                    for p in patches[i, ::stride].tolist():
                        per_kind["label"][b].append((p, nums))
    return {kind: _pack(rows, L) for kind, rows in per_kind.items()}


def _pack(rows_per_sample, length: int):
    B = len(rows_per_sample)
    R = max((len(r) for r in rows_per_sample), default=0)
    rows = torch.zeros(B, max(R, 1), dtype=torch.long)
    valid = torch.zeros(B, max(R, 1), dtype=torch.bool)
    targets = torch.zeros(B, max(R, 1), length, dtype=torch.bool)
    for b, items in enumerate(rows_per_sample):
        for r, (row, keys) in enumerate(items):
            rows[b, r], valid[b, r] = row, True
            targets[b, r, keys] = True
    return rows, valid, targets


class AttentionProbe:
    """Log-probabilities of chosen heads at chosen query rows, captured during the forward."""

    def __init__(self, heads: tuple[int, ...]):
        self.heads = torch.tensor(heads)
        self.rows = self.key_valid = self.logp = None

    def arm(self, rows: torch.Tensor, key_valid: torch.Tensor) -> None:
        """Capture rows ``rows`` [B, R] at the next forward; keys where ``key_valid`` [B, L] (not padding)."""
        self.rows, self.key_valid, self.logp = rows, key_valid, None

    def capture(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        B, H, L, D = query.shape
        group = H // key.shape[1]
        q = query[:, self.heads]                                     # [B, h, L, D]
        q = q.gather(2, self.rows[:, None, :, None].expand(-1, len(self.heads), -1, D))
        k = key[:, self.heads // group]                              # [B, h, L, D]
        scores = (q @ k.transpose(-1, -2)) * scaling                 # [B, h, R, L]
        allowed = (torch.arange(L)[None, None, :] <= self.rows[:, :, None]) & self.key_valid[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        self.logp = torch.log_softmax(scores, dim=-1)


def supervision_loss(probe: AttentionProbe, valid: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over heads and valid rows of ``-log(attention mass on the targets)``."""
    mass = probe.logp.masked_fill(~targets[:, None], float("-inf")).logsumexp(-1)  # [B, h, R]
    return -(mass.transpose(1, 2)[valid]).mean()


def attention_with_probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, plus a capture of supervised rows for every armed probe the module carries."""
    from vlsparse.compat import sdpa_attention

    out = sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                         **kwargs)
    for probe in getattr(module, "attention_probes", ()):
        if probe.rows is not None:
            probe.capture(query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out


def install(model, targets: list[HeadTarget]) -> list[tuple[HeadTarget, AttentionProbe]]:
    """Register ``TRAIN_ATTENTION``, switch the language model to it, attach one probe per target."""
    from vlsparse.compat import register_attention

    register_attention(TRAIN_ATTENTION, attention_with_probe)
    model.set_attn_implementation(TRAIN_ATTENTION)
    layers = model.model.language_model.layers
    probes = []
    for t in targets:
        probe = AttentionProbe(t.heads)
        attn = layers[t.layer].self_attn
        if not hasattr(attn, "attention_probes"):
            attn.attention_probes = []
        attn.attention_probes.append(probe)
        probes.append((t, probe))
    return probes


def uninstall(model, probes) -> None:
    for layer in {t.layer for t, _ in probes}:
        del model.model.language_model.layers[layer].self_attn.attention_probes
    model.set_attn_implementation("sdpa")
