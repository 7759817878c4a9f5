"""vlsparse's pruning against a plain reference Wanda and, where installed, llm-compressor.

    python benchmarks/prune_peer.py [--model smollm2] [--samples 32] [--seq-len 512] [--ratio 0.5]
        [--configs reference,wanda,sparsegpt,wanda-2:4,sparsegpt-2:4,ecoflap,llm-compressor]
        [--peer-python /path/to/other/venv/bin/python] [--workdir prune-peer] [--json]

Every configuration prunes the same language model on the same calibration windows
(``--samples`` windows of ``--seq-len`` tokens of CPython's pydoc text, vlsparse's default
text calibration, seed 0), each in its own process, one after the other:

- ``reference``: ``tests/reference_prune.py``, a plain Wanda written from the paper: the whole
  model in memory (float32), layer after layer;
- ``wanda``, ``sparsegpt``, ``wanda-2:4``, ``sparsegpt-2:4``, ``ecoflap``: ``vlsparse prune``
  (uniform allocation unless ECoFLaP), exactly as a user types it;
- ``llm-compressor``: its Wanda ``oneshot`` in the environment of ``--peer-python`` (llm-compressor
  pins its own transformers, so it lives in a separate venv), float32, the same windows.

Reported per configuration: the whole process's wall time and peak RSS (from ``wait4``, so
load and imports are included for everyone), the tool's own pruning time where it reports one,
held-out pydoc perplexity (the split ``vlsparse eval --task pydoc-ppl`` scores), and, for the
unstructured ones, the share of weights whose keep/prune decision equals the reference's.
Ratios are against llm-compressor when it ran, else against the reference. Only ratios from
one run mean anything on a shared machine; do not run it next to other work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".prune-peer"
CONFIGS = {  # name -> (vlsparse method, allocation, structure); None: not vlsparse
    "reference": None,
    "wanda": ("wanda", "uniform", "unstructured"),
    "sparsegpt": ("sparsegpt", "uniform", "unstructured"),
    "wanda-2:4": ("wanda", "uniform", "2:4"),
    "sparsegpt-2:4": ("sparsegpt", "uniform", "2:4"),
    "ecoflap": ("wanda", "ecoflap", "unstructured"),
    "llm-compressor": None,
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "vlsparse.yaml")


def run_measured(command: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``command``; (wall seconds, peak RSS in MiB of that process, its stdout). Raises on failure."""
    start = time.perf_counter()
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed (exit {process.returncode}); see {log}")
    return seconds, usage.ru_maxrss / 1024, out


def last_json(stdout: str) -> dict:
    """The JSON object a run printed last (vlsparse prints it indented, the workers on one line)."""
    text = stdout.strip()
    start = text.rfind("\n{") + 1
    return json.loads(text[start:]) if text else {}


def copy_side_files(folder: Path, out: Path) -> None:
    """Tokenizer and config files beside a model written with save_pretrained (weights excluded)."""
    for path in folder.iterdir():
        if path.is_file() and path.name not in WEIGHT_FILES and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def reference_worker(folder: Path, calib: Path, out: Path, ratio: float, structure: str) -> None:
    """Child process: the reference Wanda on the whole model, saved as a plain checkpoint."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from reference_prune import reference_wanda

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.load(calib)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(8)]
    nm = None if structure == "unstructured" else tuple(int(x) for x in structure.split(":"))
    start = time.perf_counter()
    reference_wanda(model, batches, ratio, nm)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    copy_side_files(folder, out)
    print(json.dumps({"seconds": seconds}))


def command_for(name: str, args, folder: Path, calib: Path, out: Path) -> list[str]:
    if name == "reference":
        return [sys.executable, __file__, "--worker", "reference", "--folder", str(folder), "--calib", str(calib),
                "--out", str(out), "--ratio", str(args.ratio)]
    if name == "llm-compressor":
        return [args.peer_python, str(ROOT / "benchmarks" / "peer_llmcompressor.py"), str(folder), str(calib),
                str(out), str(args.ratio)]
    method, allocation, structure = CONFIGS[name]
    return [sys.executable, "-m", "vlsparse", "prune", str(folder), "--out", str(out), "--method", method,
            "--allocation", allocation, "--structure", structure, "--ratio", str(args.ratio),
            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--json"]


def pruned_zeros(out: Path, names: list[str] | None) -> dict[str, torch.Tensor]:
    """{tensor name: its zeros} of the named tensors (None: all) in a checkpoint folder."""
    from safetensors import safe_open

    zeros = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if names is None or key in names:
                    zeros[key] = handle.get_tensor(key) == 0
    return zeros


def perplexity_of(out: Path) -> float:
    from vlsparse.models import load
    from vlsparse.perplexity import perplexity, pydoc_text

    loaded = load(str(out))
    with torch.no_grad():
        return perplexity(loaded.model, loaded.processor, pydoc_text("heldout"), seq_len=512).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--configs", default="reference,wanda,sparsegpt,wanda-2:4,sparsegpt-2:4,ecoflap,llm-compressor")
    parser.add_argument("--peer-python", default=None, help="python of a venv with llmcompressor installed")
    parser.add_argument("--workdir", default="prune-peer")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "reference":
        return reference_worker(Path(args.folder), Path(args.calib), Path(args.out), args.ratio, "unstructured")

    from transformers import AutoTokenizer

    from vlsparse.compress.calibration import text_calibration
    from vlsparse.models.source import resolve_model_folder

    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}: use some of {', '.join(CONFIGS)}")
    if "llm-compressor" in names and not args.peer_python:
        print("llm-compressor skipped: pass --peer-python (a venv with llmcompressor)", file=sys.stderr)
        names.remove("llm-compressor")
    workdir = Path(args.workdir)
    if workdir.exists() and not (workdir / MARKER).exists():
        raise SystemExit(f"{workdir} exists and this benchmark did not make it: pass another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()

    folder = resolve_model_folder(args.model)
    calib = text_calibration(AutoTokenizer.from_pretrained(folder), None, args.samples, args.seq_len, seed=0)
    windows = torch.cat([b["input_ids"] for b in calib.batches])
    torch.save(windows, workdir / "calib.pt")

    rows: dict[str, dict] = {}
    for name in names:
        out = workdir / name.replace(":", "-")
        print(f"pruning: {name}", file=sys.stderr, flush=True)
        seconds, rss, stdout = run_measured(command_for(name, args, folder, workdir / "calib.pt", out),
                                            workdir / f"{out.name}.log")
        reported = last_json(stdout)
        rows[name] = {"wall_s": round(seconds, 1), "peak_rss_mib": round(rss), "out": str(out),
                      "prune_s": round(reported["seconds"], 1) if "seconds" in reported else None,
                      "phases_s": {k: round(v, 1) for k, v in reported.get("phases", {}).items()}}

    print("perplexity on held-out pydoc text", file=sys.stderr, flush=True)
    dense_ppl = perplexity_of(folder)
    reference_zeros = pruned_zeros(workdir / "reference", None) if "reference" in rows else {}
    if reference_zeros:
        reference_zeros = {k: v for k, v in reference_zeros.items() if ".layers." in k and v.dim() == 2}
    for name, row in rows.items():
        row["ppl"] = round(perplexity_of(Path(row["out"])), 3)
        row["ppl_vs_dense"] = round(row["ppl"] / dense_ppl, 3)
        unstructured = name == "reference" or (CONFIGS[name] is None or CONFIGS[name][2] == "unstructured")
        if reference_zeros and unstructured:
            zeros = pruned_zeros(Path(row["out"]), list(reference_zeros))
            agree = sum(int((zeros[k] == v).sum()) for k, v in reference_zeros.items())
            row["mask_agreement"] = round(agree / sum(v.numel() for v in reference_zeros.values()), 5)
            row["sparsity"] = round(sum(int(z.sum()) for z in zeros.values())
                                    / sum(z.numel() for z in zeros.values()), 4)
    base = "llm-compressor" if "llm-compressor" in rows else "reference" if "reference" in rows else None
    for row in rows.values():
        if base:
            row["time_vs_" + base] = round(row["wall_s"] / rows[base]["wall_s"], 2)
            row["rss_vs_" + base] = round(row["peak_rss_mib"] / rows[base]["peak_rss_mib"], 2)
            row["ppl_vs_" + base] = round(row["ppl"] / rows[base]["ppl"], 4)
    result = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "ratio": args.ratio,
              "threads": torch.get_num_threads(), "dense_ppl": round(dense_ppl, 3), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: {args.samples} x {args.seq_len} calibration tokens, ratio {args.ratio}, "
          f"dense perplexity {dense_ppl:.3f}")
    head = f"{'config':<15} {'wall s':>8} {'prune s':>8} {'peak MiB':>9} {'ppl':>8} {'agree':>8}"
    if base:
        head += f" {'time/' + base:>20} {'rss/' + base:>18} {'ppl/' + base:>18}"
    print(head)
    for name, row in rows.items():
        line = (f"{name:<15} {row['wall_s']:>8.1f} {row['prune_s'] if row['prune_s'] is not None else '':>8} "
                f"{row['peak_rss_mib']:>9} {row['ppl']:>8.3f} {row.get('mask_agreement', ''):>8}")
        if base:
            line += f" {row['time_vs_' + base]:>20} {row['rss_vs_' + base]:>18} {row['ppl_vs_' + base]:>18}"
        print(line)
    for name, row in rows.items():  # where vlsparse's time goes
        if row["phases_s"]:
            split = ", ".join(f"{k} {v:.0f} s" for k, v in row["phases_s"].items() if v >= 0.5)
            print(f"{name} time split: {split}")


if __name__ == "__main__":
    main()
