"""The recall guard on a prompt unlike the profile's: a tiny Qwen2-VL built by the tests, profiled at the
default sizes (demo scenes, about 1k tokens, 64 image tokens per image), then one image of 1,600 tokens
(what Qwen2-VL makes of a 1120-px image). Prints the layout warnings, then, with and without the guard,
the heads that fell back and the first-token logit difference from dense.

    .venv/bin/python benchmarks/recall_guard_qwen.py [WORKDIR]
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_models import tiny_qwen2_vl  # noqa: E402

from vlsparse.kernels.runtime import attach, detach  # noqa: E402
from vlsparse.models import load  # noqa: E402
from vlsparse.profile.layout import layout_warnings  # noqa: E402
from vlsparse.search.api import profile_model  # noqa: E402
from vlsparse.search.calibration import calibration_from  # noqa: E402

path = tiny_qwen2_vl(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="vlsparse-guard-"), layers=2)
lm = load(str(path))
profile = profile_model(lm, calibration_from(lm, None, samples=2, seq_len=1024), threads=2)
print("calibration layout:", profile.calibration.layout)
print("heads:", [[(h.pattern, round(h.density, 3)) for h in layer] for layer in profile.attention.layers])
# Qwen2-VL at 1120 px: (1120 / 14 / 2)^2 = 1600 image tokens; the tiny model (patch 4, merge 2) gives 1600 at 320 px
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (320, 320, 3), dtype=np.uint8))
ip = lm.processor.image_processor
print("processor pixels:", getattr(ip, "min_pixels", None), getattr(ip, "max_pixels", None), getattr(ip, "size", None))
ip.max_pixels = 4096 * 4096
if isinstance(getattr(ip, "size", None), dict) and "longest_edge" in ip.size:
    ip.size = {**ip.size, "longest_edge": 4096 * 4096}
inputs = lm.prepare([image], "what is in the picture")
print("prompt tokens:", inputs["input_ids"].shape[1])
spans = lm.adapter.image_spans(inputs)
print("layout warnings:", layout_warnings(profile.calibration.layout, (inputs["input_ids"].shape[1], spans), 512))
with torch.inference_mode():
    dense = lm.model(**inputs).logits[0, -1].float()
for guard in (False, True):
    rt = attach(lm, profile, min_len=512, guard=guard, dense_above=1.0)
    with torch.inference_mode():
        out = lm.model(**inputs).logits[0, -1].float()
    fell, checked = rt.fallbacks()
    density = rt.mean_density()
    detach(lm, rt)
    print(f"guard={guard}: heads dense {fell}/{checked}, density kept {density}, "
          f"max |first-token logit - dense| {float((out - dense).abs().max()):.4f} (dense max |logit| {float(dense.abs().max()):.3f}), "
          f"top-1 same: {int(out.argmax()) == int(dense.argmax())}")
