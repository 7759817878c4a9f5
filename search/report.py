"""What a profile says, for people: a summary (rich table or dict) and a layers x heads figure.

Attention FLOPs at the calibration length ``N`` count, per head, ``QK^T`` and
``PV`` over the kept pairs, ``2 * 2 * d * N (N + 1) / 2 * density``, plus the
online estimate where the pattern has one (last-64-row scores
``2 * 64 * N * d``; pooled block scores ``2 * (N / 64)^2 * d``).
matplotlib is optional and imported only when a figure is drawn.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from vlsparse import __version__
from vlsparse.atomic import PNG_SOFTWARE, atomic_file
from vlsparse.errors import OutputError
from vlsparse.patterns import PATTERNS as PATTERN_TABLE
from vlsparse.patterns import lookup
from vlsparse.profile import PATTERNS, Profile
from vlsparse.search.recall import attention_flops

PATTERN_COLORS = {name: module.COLOR for name, module in PATTERN_TABLE.items()}
"""Each pattern's colour in the figure (the pattern modules' ``COLOR``)."""


def _estimate_flops(pattern: str, n: int, d: int, last_q: int, block: int) -> float:
    """FLOPs of the pattern's online estimate (its module's ``estimate_flops``)."""
    return lookup(pattern).estimate_flops(n, d, last_q, block)


def summary(profile: Profile) -> dict[str, Any]:
    """Pattern counts, mean density, recall, attention FLOPs at the calibration length."""
    att = profile.attention
    if att is None:
        return {"model": profile.model.name, "heads": 0}
    heads = [h for layer in att.layers for h in layer]
    n = profile.calibration.seq_len if profile.calibration else 0
    d = profile.model.head_dim
    dense = sum(attention_flops(n, d) for _ in heads)
    sparse = sum(attention_flops(n, d, h.density) + _estimate_flops(h.pattern, n, d, att.last_q, att.block_size)
                 for h in heads)
    counts = Counter(h.pattern for h in heads)
    return {
        "model": profile.model.name,
        "architecture": profile.model.architecture,
        "layers": len(att.layers),
        "heads_per_layer": profile.model.num_heads,
        "heads": len(heads),
        "calibration": None if profile.calibration is None else {
            "source": profile.calibration.source, "samples": profile.calibration.samples,
            "seq_len": profile.calibration.seq_len, "seed": profile.calibration.seed},
        "recall_target": att.recall_target,
        "patterns": {p: counts[p] for p in PATTERNS if counts[p]},
        "mean_density": sum(h.density for h in heads) / max(len(heads), 1),
        "min_recall": min((h.recall_min for h in heads), default=1.0),
        "mean_recall": sum(h.recall_mean for h in heads) / max(len(heads), 1),
        "tail_recall_target": att.recall_target if att.tail_recall_target is None else att.tail_recall_target,
        "min_tail_recall": min((h.tail_recall_min for h in heads), default=1.0),
        "attention_gflops_dense": dense / 1e9,
        "attention_gflops_sparse": sparse / 1e9,
        "flops_saved": 1.0 - sparse / dense if dense else 0.0,
    }


def summary_table(profile: Profile, title: str | None = None):
    """A rich ``Table`` of ``summary(profile)``."""
    from rich.table import Table

    s = summary(profile)
    table = Table(title=title or f"vlsparse profile · {s['model']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    cal = s.get("calibration")
    if cal:
        table.add_row("calibration",
                      f"{cal['samples']} x {cal['seq_len']} tokens ({cal['source']}, seed {cal['seed']})")
    table.add_row("heads", f"{s['heads']} ({s.get('layers', 0)} layers x {s.get('heads_per_layer', 0)})")
    for pattern, count in s.get("patterns", {}).items():
        table.add_row(f"  {pattern}", f"{count}")
    if s["heads"]:
        table.add_row("mean density", f"{s['mean_density']:.1%}")
        table.add_row(f"min recall (target {s['recall_target']:.2f})", f"{s['min_recall']:.4f}")
        table.add_row("mean recall", f"{s['mean_recall']:.4f}")
        table.add_row(f"min tail recall (target {s['tail_recall_target']:.2f})", f"{s['min_tail_recall']:.4f}")
        n = cal["seq_len"] if cal else 0
        table.add_row(f"attention FLOPs at {n} tokens",
                      f"{s['attention_gflops_dense']:.2f} -> {s['attention_gflops_sparse']:.2f} GFLOP "
                      f"({s['flops_saved']:.1%} saved)")
    return table


def _cell_color(pattern: str, density: float) -> tuple[float, float, float]:
    """The pattern's colour, lighter for sparser heads (density 0 -> 25% strength, 1 -> full)."""
    hexa = PATTERN_COLORS.get(pattern, "#000000").lstrip("#")
    base = [int(hexa[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    strength = 0.25 + 0.75 * min(max(density, 0.0), 1.0)
    return tuple(1.0 - (1.0 - c) * strength for c in base)


def draw_figure(profile: Profile, path: str | Path, force: bool = False) -> Path:
    """PNG of layers x heads, coloured by pattern and shaded by density (needs matplotlib).

    An existing ``path`` is replaced only with ``force`` and only if vlsparse drew it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise OutputError("drawing the profile figure needs matplotlib",
                          "pip install 'vlsparse[plot]', or skip the figure") from exc
    att = profile.attention
    if att is None:
        raise OutputError("this profile has no attention section to draw", "run `vlsparse profile` first")
    layers, heads = len(att.layers), profile.model.num_heads
    image = [[_cell_color(h.pattern, h.density) for h in layer] for layer in att.layers]
    fig_w = min(16.0, max(6.5, 3.0 + 0.45 * heads))
    fig_h = min(20.0, 1.8 + 0.32 * layers)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.imshow(image, aspect="auto", interpolation="nearest")
    if layers * heads <= 40 * 24:
        for li, layer in enumerate(att.layers):
            for hi, h in enumerate(layer):
                ax.text(hi, li, f"{h.density * 100:.0f}", ha="center", va="center", fontsize=6, color="black")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.tick_params(labelsize=6)
    s = summary(profile)
    cal = s.get("calibration") or {}
    ax.set_title(f"{profile.model.name}: attention patterns (cell: density %, darker = denser)\n"
                 f"{cal.get('samples', '?')} x {cal.get('seq_len', '?')} tokens, recall >= {att.recall_target}, "
                 f"mean density {s['mean_density']:.1%}", fontsize=8)
    used = [p for p in PATTERNS if p in s["patterns"]]
    ax.legend(handles=[Patch(color=PATTERN_COLORS[p], label=f"{p} ({s['patterns'][p]})") for p in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path, "wb", force=force) as handle:
            fig.savefig(handle, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    finally:
        plt.close(fig)
    return path
