"""Local pruning criteria (magnitude, wanda-sp, flap): scores, FLAP's bias compensation, errors, realisation."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import random_tokens, tiny_model
from tyr.supernet.builder import BuildPlan, build_supernet
from tyr.supernet.criteria import (
    CRITERIA,
    InputStats,
    LevelResult,
    accumulate_stats,
    group_scores,
    prune_by_criterion,
    reconstruction_errors,
)
from tyr.supernet.families import adapter_for
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of


def _stats(x: torch.Tensor) -> InputStats:
    return accumulate_stats(accumulate_stats(None, x[: len(x) // 2]), x[len(x) // 2 :])


def test_stats_match_direct_moments():
    x = torch.randn(50, 6, dtype=torch.float64) * torch.arange(1, 7) + 3.0
    stats = _stats(x.float())
    torch.testing.assert_close(stats.mean, x.mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.variance, x.var(0, unbiased=False), atol=1e-3, rtol=1e-4)
    assert stats.count == 50


def test_scores_rank_by_their_definition():
    torch.manual_seed(0)
    x = torch.randn(200, 8) * torch.tensor([1, 1, 1, 1, 10, 1, 1, 1.0])  # feature 4 has a large norm
    w = torch.ones(8, 3)
    w[1] *= 5.0  # row 1 has the largest weight norm
    stats = _stats(x)
    assert int(group_scores("magnitude", stats, w.double(), 1).argmax()) == 1
    assert int(group_scores("wanda-sp", stats, w.double(), 1).argmax()) == 4
    # grouped: the group score is the sum over its rows
    per_row = group_scores("wanda-sp", stats, w.double(), 1)
    torch.testing.assert_close(group_scores("wanda-sp", stats, w.double(), 2), per_row.view(4, 2).sum(1))


def test_flap_bias_compensates_a_constant_feature_exactly():
    torch.manual_seed(1)
    x = torch.randn(300, 6, dtype=torch.float64)
    x[:, 2] = 0.7  # zero variance: FLAP removes it first, and its mean contribution is exact
    w = torch.randn(6, 4, dtype=torch.float64)
    stats = _stats(x.float())
    (res,) = prune_by_criterion("flap", stats, w, 1, [1])
    assert res.kept.tolist() == [0, 1, 3, 4, 5] and res.bias is not None
    out = x[:, res.kept] @ res.weight.double() + res.bias.double()
    torch.testing.assert_close(out, x @ w, atol=1e-4, rtol=1e-4)
    assert reconstruction_errors(stats, w, [res], 1)[0] < 1e-6


@pytest.mark.parametrize("criterion", CRITERIA)
def test_reconstruction_error_matches_explicit_outputs(criterion):
    torch.manual_seed(2)
    x = torch.randn(400, 12, dtype=torch.float64) + 0.5
    w = torch.randn(12, 5, dtype=torch.float64)
    stats = _stats(x.float())
    results = prune_by_criterion(criterion, stats, w, 3, [0, 1, 2, 4], PrunerOptions(num_rounds=2))
    errors = reconstruction_errors(stats, w, results, 3)
    assert errors[0] == pytest.approx(0.0, abs=1e-6)
    # all removed: the error is the whole output, less the mean FLAP's bias puts back
    assert errors[-1] == pytest.approx(1.0, abs=1e-5) if criterion != "flap" else 0.0 < errors[-1] < 1.0
    for r, err in zip(results, errors, strict=True):
        rows = (r.kept[:, None] * 3 + torch.arange(3)).reshape(-1)
        out = x[:, rows] @ r.weight.double() + (r.bias.double() if r.bias is not None else 0.0)
        direct = float(((x @ w - out) ** 2).sum() / ((x @ w) ** 2).sum())
        assert err == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_tyr_criterion_beats_score_only_criteria_on_error():
    torch.manual_seed(3)
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)  # correlated
    w = torch.randn(16, 6, dtype=torch.float64)
    stats = _stats(x.float())
    err = {
        c: reconstruction_errors(stats, w, prune_by_criterion(c, stats, w, 1, [8]), 1)[0] for c in CRITERIA
    }
    assert err["tyr"] < min(err["magnitude"], err["wanda-sp"], err["flap"])


def test_unknown_criterion_is_refused():
    stats = _stats(torch.randn(10, 4))
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        prune_by_criterion("obs", stats, torch.randn(4, 2), 1, [1])
    with pytest.raises(ValueError):
        prune_by_criterion("flap", stats, torch.randn(4, 2), 1, [5])
    assert LevelResult(torch.tensor([0]), torch.zeros(1, 2)).bias is None


def _flap_supernet(tmp_path, model):
    adapter = adapter_for(model)
    ladders = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        multiple = 1 if gene.kind == "attn" else 4
        step = step_units(n, 0.125, 1, multiple)
        ladders.append(make_ladder(gene, n, centre_for_sparsity(n, 0.5, multiple), step, 3))
    plan = BuildPlan(ladders, "expectation", batch_size=2, criterion="flap")
    store = SupernetStore.create_or_resume(tmp_path / "sn", {"test": "flap"})
    build_supernet(model, adapter, random_tokens(4, 16), plan, store, progress=False)
    return adapter, store


def test_flap_supernet_masked_equals_compact_and_restores(tmp_path):
    model = tiny_model("llama_gqa", num_layers=2)
    adapter, store = _flap_supernet(tmp_path, model)
    genes = genes_of(adapter.num_layers)
    variants = [store.variant(g, 1) for g in genes]
    assert all(v.bias is not None and v.bias.shape == (adapter.hidden_size,) for v in variants)
    for g in genes:  # the compensation bias is counted: every level keeps d_out more parameters than without
        entry = store.level_entry(g, 1)
        assert entry.params == adapter.module_params(g.kind, entry.kept) + adapter.hidden_size
        assert entry.error is not None and 0.0 < entry.error < 1.0
    tokens = random_tokens(2, 10)
    with torch.no_grad():
        dense = model(tokens, use_cache=False).logits
        masked = Realiser(model, adapter, "masked")
        masked.apply(variants)
        out_masked = model(tokens, use_cache=False).logits
        masked.restore_dense()
        assert all(adapter.output_proj(g.layer, g.kind).bias is None for g in genes)
        compact = Realiser(model, adapter, "compact")
        compact.apply(variants)
        out_compact = model(tokens, use_cache=False).logits
        compact.restore_dense()
        assert torch.equal(model(tokens, use_cache=False).logits, dense)
    assert (out_masked - dense).abs().max() > 1e-3
    torch.testing.assert_close(out_compact, out_masked, atol=1e-5, rtol=1e-5)
