"""vlsparse's uniform Wanda against a plain whole-model reference pipeline (tests/reference_prune.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from reference_prune import reference_wanda, wanda_keep


def test_wanda_keep_drops_the_lowest_weight_times_input_norm_per_row():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, 2.0, 1.0]])
    column_sq = torch.tensor([16.0, 1.0, 1.0, 0.01])  # input norms 4, 1, 1, 0.1
    # scores: row 0 -> 4, 2, 3, 0.4; row 1 -> 16, 3, 2, 0.1
    assert wanda_keep(weight, column_sq, 0.5).tolist() == [[True, False, True, False], [True, True, False, False]]
    nm = wanda_keep(torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]]), torch.ones(8), 0.5, (2, 4))
    assert nm.tolist() == [[False, False, True, True, True, True, False, False]]


@pytest.mark.parametrize("structure,nm", [("unstructured", None), ("2:4", (2, 4))])
def test_uniform_wanda_masks_equal_the_whole_model_reference(llama_dir, tmp_path, structure, nm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlsparse.compress.api import PruneConfig, prune_model
    from vlsparse.compress.calibration import text_calibration

    samples, seq_len, seed = 4, 32, 0
    ours = prune_model(str(llama_dir), tmp_path / "ours", PruneConfig(
        ratio=0.5, allocation="uniform", structure=structure, samples=samples, seq_len=seq_len, seed=seed))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    calib = text_calibration(AutoTokenizer.from_pretrained(llama_dir), None, samples, seq_len, seed)
    masks = reference_wanda(model, calib.batches, 0.5, nm)

    pruned = load_file(str(ours.out / "model.safetensors"))
    assert len(masks) == 7 * model.config.num_hidden_layers  # q k v o gate up down in every layer
    agree = total = 0
    for name, keep in masks.items():
        ours_keep = pruned[name] != 0
        assert int(ours_keep.sum()) == int(keep.sum())  # the same count in every matrix
        agree += int((ours_keep == keep).sum())
        total += keep.numel()
    assert agree / total > 0.999  # float summation order may swap a near-tie, nothing more
    assert set(pruned) - set(masks) == {n for n in pruned if not (".layers." in n and n.endswith("proj.weight"))}
