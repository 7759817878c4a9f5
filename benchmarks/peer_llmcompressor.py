"""llm-compressor's Wanda ``oneshot`` on the windows benchmarks/prune_peer.py saved; run with the peer's venv.

    /path/to/llmc-venv/bin/python benchmarks/peer_llmcompressor.py MODEL_FOLDER CALIB.pt OUT RATIO

Float32 weights, the same calibration windows as vlsparse, the LM head left dense (as vlsparse
and the paper do). Writes a plain (uncompressed) safetensors checkpoint with the tokenizer
beside it, and prints {"seconds": oneshot's own time} as its last line.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from transformers import AutoModelForCausalLM

folder, calib, out, ratio = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
windows = torch.load(calib)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
start = time.perf_counter()
oneshot(model=model, dataset=data, num_calibration_samples=windows.shape[0], max_seq_length=windows.shape[1],
        recipe=WandaPruningModifier(sparsity=ratio, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"]))
seconds = time.perf_counter() - start
model.save_pretrained(out, save_compressed=False)
for path in folder.iterdir():
    if path.is_file() and not path.name.startswith("model") and not (out / path.name).exists():
        shutil.copy2(path, out / path.name)
print(json.dumps({"seconds": seconds}))
