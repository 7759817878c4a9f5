"""SparseGPT: against a plain optimal-brain-surgeon reference, its reconstruction gain, and through `prune`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlsparse.compress.methods import method_named
from vlsparse.compress.methods.sparsegpt import DAMP, block_prune_counts, sparsegpt
from vlsparse.compress.wanda import row_prune_counts, wanda_mask


def reference_sparsegpt(weight, xxt, per_row=None, structure=None, block=128, damp=DAMP):
    """Column-by-column OBS in float64 with the inverse Hessian of the columns left kept explicitly.

    Column ``q`` loses weights by the OBS update ``W -= (w_q / Hinv_qq) Hinv_q,:``; then ``q``
    is frozen: Hinv becomes the inverse of H without ``q`` (a Schur downdate). Masks are
    chosen as SparseGPT does: per block (unstructured) or per group of M (N:M) from
    ``w^2 / U_jj^2``, with U the upper Cholesky factor of the full damped inverse.
    """
    w = weight.double().clone()
    h = xxt.double() + torch.eye(xxt.shape[0], dtype=torch.float64) * damp * float(torch.diagonal(xxt).mean())
    hinv = torch.linalg.inv(h)
    diag_u = torch.diagonal(torch.linalg.cholesky(hinv, upper=True))
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(cols, start + block)
        if per_row is not None:
            counts = block_prune_counts(per_row, cols, start, end)
            saliency = w[:, start:end] ** 2 / diag_u[start:end] ** 2
            for r in range(rows):
                order = sorted(range(end - start), key=lambda j: (float(saliency[r, j]), j))
                for j in order[:int(counts[r])]:
                    pruned[r, start + j] = True
        for q in range(start, end):
            if structure is not None and q % structure[1] == 0:
                n, m = structure
                saliency = w[:, q:q + m] ** 2 / diag_u[q:q + m] ** 2
                for r in range(rows):
                    for j in saliency[r].argsort()[:n].tolist():
                        pruned[r, q + j] = True
            for r in range(rows):
                if pruned[r, q]:
                    w[r] -= (w[r, q] / hinv[q, q]) * hinv[q]
            hinv = hinv - torch.outer(hinv[:, q], hinv[q]) / hinv[q, q]
    return ~pruned, w


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a low effective rank (a quarter of the features, plus noise), as real activations
    have: the kept weights can then stand in for the pruned ones, which OBS updates exploit."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, cols // 4)
    signal = torch.randn(tokens, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
    return signal + 0.1 * torch.randn(tokens, cols, generator=gen)


@pytest.mark.parametrize("structure", [None, (2, 4)])
def test_blockwise_lazy_updates_equal_the_column_by_column_reference(structure):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 24, generator=gen)
    x = correlated_inputs(200, 24)
    xxt = x.T @ x
    prune = 6 * 12
    keep, new = sparsegpt(weight, xxt, prune=None if structure else prune, structure=structure, block=8)
    ref_keep, ref_new = reference_sparsegpt(weight, xxt, None if structure else row_prune_counts(6, prune),
                                            structure, block=8)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new.double(), ref_new * ref_keep, atol=1e-4, rtol=1e-4)
    assert torch.all(new[~keep] == 0)
    # the reference's pruned weights were driven to zero by its own updates, not masked afterwards
    assert ref_new[~ref_keep].abs().max() < 1e-9


def test_exact_counts_per_row_and_valid_n_m_groups():
    gen = torch.Generator().manual_seed(2)
    weight, x = torch.randn(7, 40, generator=gen), correlated_inputs(100, 40, seed=3)
    keep, _ = sparsegpt(weight, x.T @ x, prune=131, block=16)
    assert int((~keep).sum()) == 131
    assert ((~keep).sum(1) == row_prune_counts(7, 131)).all()
    keep, _ = sparsegpt(weight, x.T @ x, structure=(2, 4), block=16)
    assert ((~keep).reshape(7, 10, 4).sum(-1) == 2).all()
    # N:M does not depend on the block size: groups never straddle blocks and see every earlier update
    keep_4, new_4 = sparsegpt(weight, x.T @ x, structure=(2, 4), block=4)
    keep_big, new_big = sparsegpt(weight, x.T @ x, structure=(2, 4), block=128)
    assert torch.equal(keep_4, keep_big) and torch.allclose(new_4, new_big, atol=1e-4)


@pytest.mark.parametrize("structure,prune", [(None, 16 * 32), ((2, 4), None)])
def test_reconstruction_error_is_well_below_wandas_at_the_same_sparsity(structure, prune):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 64, generator=gen)
    x = correlated_inputs(512, 64, seed=5)
    xxt = x.T @ x
    keep, new = sparsegpt(weight, xxt, prune=prune, structure=structure)
    wanda_keep = wanda_mask(weight, (x * x).sum(0), prune=prune, structure=structure)
    assert int((~keep).sum()) == int((~wanda_keep).sum())
    error_sparsegpt = ((weight - new) @ x.T).norm()
    error_wanda = ((weight * ~wanda_keep) @ x.T).norm()
    assert error_sparsegpt < 0.6 * error_wanda


def test_inputs_that_never_fire_are_pruned_freely_and_the_rest_still_solved():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 16, generator=gen)
    x = correlated_inputs(64, 16, seed=7)
    x[:, 3] = 0  # a dead input: its weights multiply zeros
    keep, new = sparsegpt(weight, x.T @ x, prune=4 * 8)
    assert torch.all(new[:, 3] == 0) and torch.isfinite(new).all()
    assert int((~keep).sum()) == 32


def test_statistics_accumulate_over_batches_like_one_batch():
    method = method_named("sparsegpt")
    x = correlated_inputs(30, 8)
    whole, parts = method.new_stats(None), method.new_stats(None)
    whole.add(x)
    parts.add(x[:11].reshape(1, 11, 8))
    parts.add(x[11:])
    assert parts.tokens == whole.tokens == 30
    assert torch.allclose(parts.xxt, whole.xxt, atol=1e-5)


def test_prune_with_sparsegpt_writes_corrected_weights_that_stock_transformers_loads(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from vlsparse.compress.api import PruneConfig, prune_model
    from vlsparse.models import load
    from vlsparse.profile import load_profile

    config = dict(ratio=0.5, allocation="uniform", samples=2, seq_len=16)
    plain = prune_model(str(llama_dir), tmp_path / "sparsegpt", PruneConfig(method="sparsegpt", **config))
    packed = prune_model(str(llama_dir), tmp_path / "packed", PruneConfig(method="sparsegpt", pack=True, **config))
    wanda = prune_model(str(llama_dir), tmp_path / "wanda", PruneConfig(method="wanda", **config))
    assert plain.achieved == wanda.achieved == 0.5
    assert load_profile(plain.out / "vlsparse.yaml").pruning["method"] == "sparsegpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "sparsegpt", "wanda"]  # no temporary left

    original = load_file(str(llama_dir / "model.safetensors"))
    pruned = load_file(str(plain.out / "model.safetensors"))
    names = [m["name"] for m in load_profile(plain.out / "vlsparse.yaml").pruning["matrices"]]
    changed = 0
    for name in names:
        zero = pruned[name] == 0
        assert int(zero.sum()) >= pruned[name].numel() // 2
        changed += int((pruned[name][~zero] != original[name][~zero]).sum())  # the kept weights were corrected
    assert changed > 0.9 * sum(int((pruned[n] != 0).sum()) for n in names)
    for name in set(original) - set(names):
        assert torch.equal(pruned[name], original[name])

    stock = LlamaForCausalLM.from_pretrained(plain.out).eval()
    ours = load(str(packed.out)).model  # the packed checkpoint carries the same corrected values
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)
