"""`vlsparse bench tokens`: every visual-token-reduction method at several keep ratios, against dense, one run.

For each demo task (``vqa``, ``multi``, ``long`` by default; ``n`` held-out questions each,
from ``vlsparse.demo.evaluate``) and each method x keep ratio, the questions are answered
by the model taking turns per question, dense then the method (``evaluate_paired``:
dense, method, dense, method, ...), so a machine whose speed drifts slows both alike.
The method runs through ``vlsparse.kernels.token_runtime``, attached once per method x
keep and switched off (``runtime.enabled``) for the dense turns, so both turns run the
same attention code (SDPA behind the ``"vlsparse"`` registry entry).

Per row (``task``, ``method``, ``keep``):

- ``accuracy`` with Wilson's 95% interval (``ci95``), ``per_qtype`` accuracies, and the
  position questions on their own (``accuracy_position``, ``accuracy_other``: token
  dropping hurts localisation first, FEATHER's point);
- ``agreement``: share of answers equal to dense's;
- ``image_tokens_kept`` / ``image_tokens_total``: means per prompt, after the last stage;
  ``kept_share`` their ratio;
- ``prefill_ms`` / ``decode_ms`` (medians: prefill forward, one decode step) and
  ``prefill_speedup`` / ``decode_speedup`` against the dense turns of the same run;
- ``kv_cache_mib`` (mean bytes the KV cache held after each answer, ``cache_nbytes``) and
  ``kv_ratio`` against dense;
- ``note``: why a method did not run (a schedule that does not fit the model, a method
  this model cannot serve), or what it decided.

A ``dense`` row per task (keep 1) is the baseline, from the first method's dense turns.
``draw_figure`` plots accuracy against the share of image tokens kept, one line per
method and one panel per task (matplotlib, optional).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_TASKS = ("vqa", "multi", "long")
DEFAULT_KEEPS = (0.5, 0.25, 0.11)
POSITION = "position"


def _summary(result: dict) -> dict[str, Any]:
    """Accuracy fields of an ``evaluate`` result, with position questions apart."""
    per = result["per_qtype"]

    def share(names) -> float | None:
        n = sum(per[q]["n"] for q in names)
        return round(sum(per[q]["accuracy"] * per[q]["n"] for q in names) / n, 4) if n else None

    return {"n": result["n"], "accuracy": round(result["accuracy"], 4),
            "ci95": [round(x, 4) for x in result["ci95"]],
            "per_qtype": {q: {"n": v["n"], "accuracy": round(v["accuracy"], 4)} for q, v in per.items()},
            "accuracy_position": share([q for q in per if q == POSITION]),
            "accuracy_other": share([q for q in per if q != POSITION])}


def _median_ms(values: Sequence[float]) -> float | None:
    return round(statistics.median(values) * 1000, 3) if values else None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def _one(loaded, settings, task: str, n: int, seed: int, tick: Callable[[], None]) -> tuple[dict, dict]:
    """(dense row fields, method row fields) of one method x keep on one task."""
    from vlsparse.bench.timing import Turns
    from vlsparse.demo.evaluate import evaluate_paired
    from vlsparse.kernels.token_runtime import attach_tokens, detach_tokens

    runtime = attach_tokens(loaded, settings)
    kv: dict[str, list[int]] = {"dense": [], "method": []}
    kept: list[tuple[int, int]] = []

    def enter(name: str) -> None:
        runtime.enabled = name == "method"

    def answered(name: str) -> None:  # the KV cache the answer left, and the image tokens it kept
        kv[name].append(turns.clocks[name].kv_bytes)
        if name == "method":
            st = runtime.stats()
            kept.append((st["image_tokens_kept"], st["image_tokens_total"]))

    turns = Turns(loaded.model, ("dense", "method"), enter, answered)

    def progress() -> None:
        turns.note()
        tick()

    try:
        results = evaluate_paired(loaded.model, loaded.processor, {"dense": turns.switch("dense"),
                                                                   "method": turns.switch("method")},
                                  task=task, n=n, seed=seed, progress=progress)
    finally:
        turns.close()
        detach_tokens(loaded, runtime)
    dense, method = results["dense"], results["method"]
    clocks = turns.clocks
    fields = {}
    for name in ("dense", "method"):
        fields[name] = {**_summary(results[name]), "prefill_ms": _median_ms(clocks[name].prefill_s),
                        "decode_ms": _median_ms(clocks[name].decode_s),
                        "kv_cache_mib": round(sum(kv[name]) / len(kv[name]) / 2**20, 4) if kv[name] else None}
    row = fields["method"]
    row["agreement"] = round(sum(a == b for a, b in zip(dense["answers"], method["answers"])) / n, 4)
    row["image_tokens_kept"] = round(sum(k for k, _ in kept) / len(kept), 2) if kept else None
    row["image_tokens_total"] = round(sum(t for _, t in kept) / len(kept), 2) if kept else None
    row["kept_share"] = _ratio(row["image_tokens_kept"], row["image_tokens_total"]) if kept else None
    row["prefill_speedup"] = _ratio(fields["dense"]["prefill_ms"], row["prefill_ms"])
    row["decode_speedup"] = _ratio(fields["dense"]["decode_ms"], row["decode_ms"])
    row["kv_ratio"] = _ratio(row["kv_cache_mib"], fields["dense"]["kv_cache_mib"])
    notes = sorted({r.get("note", "") for r in runtime.stats()["stages"]} - {""})
    row["note"] = "; ".join(notes[:2])
    return fields["dense"], row


def bench_tokens(model: str | Path = "demo", *, methods: Sequence[str] | None = None,
                 keeps: Sequence[float] = DEFAULT_KEEPS, tasks: Sequence[str] = DEFAULT_TASKS, n: int = 20,
                 seed: int = 0, params: dict[str, dict] | None = None, device: str = "cpu",
                 progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Rows as described in the module docstring: per task, a dense row, then each method x keep.

    ``params``: per method, parameters passed on (e.g. ``{"fastv": {"k": 3}}``). ``progress(label,
    done, total)`` is called after every question (both turns).
    """
    from vlsparse.demo.scenes import TASKS
    from vlsparse.errors import InputError, param
    from vlsparse.models import load
    from vlsparse.profile.tokens import resolve_settings
    from vlsparse.tokens import METHOD_NAMES, method_named

    methods = [method_named(m).NAME for m in (methods or METHOD_NAMES)]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown task {unknown[0] if unknown else tasks!r}", f"choose from {', '.join(TASKS)}")
    if not keeps or not all(0 < k <= 1 for k in keeps):
        raise InputError(f"{param('keeps')} must lie in (0, 1], got {list(keeps)}", f"e.g. {param('keeps', 0.25)}")
    if n < 1:
        raise InputError(f"{param('n')} must be at least 1", f"e.g. {param('n', 20)}")
    loaded = load(model, device=device)
    if not loaded.adapter.is_vlm:
        raise InputError(f"token reduction needs a vision-language model; {loaded.name} takes no images",
                         "pick a VLM (e.g. demo)")
    params = params or {}
    total = len(tasks) * len(methods) * len(keeps) * n
    done = 0
    rows: list[dict[str, Any]] = []
    for task in tasks:
        dense_row: dict[str, Any] | None = None
        task_rows = []
        for method in methods:
            for keep in keeps:
                label = f"{task}: {method} keep {keep:g}"
                base = {"model": loaded.name, "task": task, "method": method, "keep": keep}

                def tick(label=label) -> None:
                    nonlocal done
                    done += 1
                    if progress is not None:
                        progress(label, done, total)

                try:
                    settings = resolve_settings(method, keep, loaded.adapter.num_layers, params.get(method))
                    dense, row = _one(loaded, settings, task, n, seed, tick)
                except InputError as exc:  # a method this model cannot serve: a row that says why
                    done += n
                    task_rows.append({**base, "n": 0, "accuracy": None, "note": exc.one_line()})
                    continue
                if dense_row is None:
                    dense_row = {"model": loaded.name, "task": task, "method": "dense", "keep": 1.0, **dense,
                                 "agreement": 1.0, "kept_share": 1.0, "prefill_speedup": 1.0, "decode_speedup": 1.0,
                                 "kv_ratio": 1.0, "note": ""}
                task_rows.append({**base, **row})
        rows.extend(([dense_row] if dense_row else []) + task_rows)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_tokens` rows, notes below."""
    cols = ["task", "method", "keep", "kept", "accuracy", "ci95", "position", "other", "agree", "prefill_x",
            "decode_x", "kv_mib"]

    def fmt(value, spec="") -> str:
        return "-" if value is None else format(value, spec)

    def cells(r) -> list[str]:
        kept = (f"{r['image_tokens_kept']:g}/{r['image_tokens_total']:g}" if r.get("image_tokens_total")
                else ("all" if r["method"] == "dense" else "-"))
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else "-"
        return [r["task"], r["method"], f"{r['keep']:g}", kept, fmt(r.get("accuracy"), ".3f"), ci,
                fmt(r.get("accuracy_position"), ".3f"), fmt(r.get("accuracy_other"), ".3f"),
                fmt(r.get("agreement"), ".2f"), fmt(r.get("prefill_speedup"), ".2f"),
                fmt(r.get("decode_speedup"), ".2f"), fmt(r.get("kv_cache_mib"), ".3f")]

    table = [cells(r) for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in table]
    notes = [f"{r['task']} {r['method']} {r['keep']:g}: {r['note']}" for r in rows if r.get("note")]
    legend = ("kept: mean image tokens kept/total per prompt; position/other: accuracy on position questions / "
              "the rest; agree: same answer as dense; prefill_x, decode_x: speedup over the dense turns of the "
              "same run; kv_mib: mean KV cache after an answer")
    return "\n".join(lines + ["", legend] + ([""] + notes if notes else []))


def draw_figure(rows: Sequence[dict[str, Any]], path: str | Path, force: bool = False) -> Path:
    """PNG: accuracy against the share of image tokens kept, one line per method, one panel per task."""
    from vlsparse.atomic import PNG_SOFTWARE, atomic_file
    from vlsparse.errors import OutputError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OutputError("drawing the token benchmark needs matplotlib",
                          "pip install 'vlsparse[plot]', or skip the figure") from exc
    from vlsparse import __version__

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        here = [r for r in rows if r["task"] == task and r.get("accuracy") is not None]
        dense = next((r for r in here if r["method"] == "dense"), None)
        for method in dict.fromkeys(r["method"] for r in here if r["method"] != "dense"):
            points = sorted((r["kept_share"], r["accuracy"]) for r in here
                            if r["method"] == method and r.get("kept_share") is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if dense is not None:
            ax.axhline(dense["accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_title(f"demo-{task}", fontsize=9)
        ax.set_xlabel("image tokens kept (share)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        with atomic_file(Path(path), "wb", force=force) as handle:
            fig.savefig(handle, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    finally:
        plt.close(fig)
    return Path(path)
