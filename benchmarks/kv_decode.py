"""KV cache methods on a text model: decode speed and decode perplexity, against dense, in one run.

    .venv/bin/python benchmarks/kv_decode.py --model smollm2 --prompt-tokens 2048 --json

For each configuration (transformers' default cache, its static cache, and each KV method of
``vlsparse.kv`` with its defaults, ``snapkv`` over all tokens since a text model has no image
tokens):

- ``decode_tokens_per_s``: a prompt of ``--prompt-tokens`` tokens of held-out pydoc text, then
  ``--new-tokens`` greedy tokens; the configurations take turns, one untimed round then
  ``--repeats`` timed ones; the median over rounds of steps / time of the decode forwards
  (``vlsparse.bench.timing.ForwardClock``);
- ``kv_mib``: what the cache holds after the generation (``compat.cache_nbytes``);
- ``decode_ppl``: ``vlsparse.perplexity.decode_perplexity`` on held-out pydoc windows of
  ``--ppl-seq-len`` tokens whose last ``--ppl-decoded`` are predicted through the cache.

Ratios are against the default cache's row.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

CONFIGS = {
    "dense": None,
    "dense_static": None,
    "kv_fp": ("fp", {}),
    "kv_uniform": ("uniform", {}),
    "kv_zipvl": ("zipvl", {}),
    "kv_snapkv": ("snapkv", {"scope": "all"}),
}


def switch(loaded, config: str):
    """Turn ``config`` on; returns the function that turns it off."""
    from vlsparse.kernels.kv_runtime import attach_kv, detach_kv
    from vlsparse.profile.kv import resolve_kv

    generation = loaded.model.generation_config
    if config == "dense_static":
        generation.cache_implementation = "static"
        return lambda: setattr(generation, "cache_implementation", None)
    if CONFIGS[config] is None:
        return lambda: None
    method, params = CONFIGS[config]
    runtime = attach_kv(loaded, resolve_kv(method, params))
    return lambda: detach_kv(loaded, runtime)


def main() -> None:
    from vlsparse.bench.timing import ForwardClock
    from vlsparse.compat import cache_nbytes, cache_of_output
    from vlsparse.models import load
    from vlsparse.perplexity import decode_perplexity, pydoc_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-seq-len", type=int, default=1024)
    parser.add_argument("--ppl-decoded", type=int, default=64)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    loaded = load(args.model)
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    text = pydoc_text("heldout")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.prompt_tokens]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    speed: dict[str, list[float]] = {c: [] for c in CONFIGS}
    held: dict[str, int] = {}
    for round_ in range(args.repeats + 1):
        for config in CONFIGS:
            off = switch(loaded, config)
            clock = ForwardClock()
            handles = clock.attach(loaded.model)
            try:
                with torch.inference_mode():
                    out = loaded.model.generate(**inputs, max_new_tokens=args.new_tokens,
                                                min_new_tokens=args.new_tokens, do_sample=False,
                                                pad_token_id=tokenizer.eos_token_id, return_dict_in_generate=True)
            finally:
                for h in handles:
                    h.remove()
                off()
            held[config] = cache_nbytes(cache_of_output(out))
            if round_:
                speed[config].append(len(clock.decode_s) / sum(clock.decode_s))
    rows = []
    for config in CONFIGS:
        off = switch(loaded, config) if config != "dense_static" else (lambda: None)
        try:
            ppl = decode_perplexity(loaded.model, tokenizer, text, seq_len=args.ppl_seq_len,
                                    decoded=args.ppl_decoded, max_windows=args.ppl_windows)
        finally:
            off()
        rows.append({"config": config, "decode_tokens_per_s": round(statistics.median(speed[config]), 2),
                     "kv_mib": round(held[config] / 2**20, 3), "decode_ppl": round(ppl.perplexity, 3)})
    dense = rows[0]
    static = rows[1]
    for row in rows:
        row["decode_speedup"] = round(row["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3)
        row["decode_vs_static"] = round(row["decode_tokens_per_s"] / static["decode_tokens_per_s"], 3)
        row["kv_ratio"] = round(row["kv_mib"] / dense["kv_mib"], 3)
    if args.json:
        print(json.dumps({"model": loaded.name, "prompt_tokens": int(ids.shape[1]), "rows": rows}, indent=2))
        return
    cols = list(rows[0])
    print(f"{loaded.name}, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens")
    print("  ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>18}" for c in cols))


if __name__ == "__main__":
    main()
