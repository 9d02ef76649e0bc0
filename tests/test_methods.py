"""Allocation baselines: exact DP vs brute force, budgets, OWL, matched evaluation counts, sampler resume,
and every `--method` end to end on a tiny model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tests.conftest import smoke_args
from tests.test_search_core import SyntheticFitness, make_space
from tyr.cli import main
from tyr.errors import TyrError
from tyr.search.baselines import (
    allocate_exact,
    matched_budget,
    owl_layer_sparsities,
    project_units,
    units_at,
)
from tyr.search.evolution import EvolutionConfig, Stage, run_generation
from tyr.search.sampled import sampled_search


def _units(space, genome) -> dict[str, int]:
    return {k: space.units(genome, k) for k in space.kinds}


def test_allocate_exact_matches_brute_force():
    space = make_space(num_layers=3, levels=(-2, -1, 0, 1, 2))
    rng = np.random.default_rng(0)
    for _ in range(5):
        costs = [list(rng.random(5)) for _ in space.genes]
        genome = allocate_exact(space, costs)
        assert space.is_feasible(genome)
        brute = min(
            (g for g in itertools.product(range(-2, 3), repeat=space.num_genes) if space.is_feasible(g)),
            key=lambda g: sum(costs[i][lv + 2] for i, lv in enumerate(g)),
        )
        cost = sum(costs[i][lv + 2] for i, lv in enumerate(genome))
        assert cost == pytest.approx(sum(costs[i][lv + 2] for i, lv in enumerate(brute)))


def test_allocate_exact_prefers_the_centre_on_ties():
    space = make_space(num_layers=3, levels=(-2, -1, 0, 1, 2))
    assert allocate_exact(space, [[1.0] * 5 for _ in space.genes]) == (0,) * space.num_genes


def test_projection_keeps_the_budget_and_hits_feasible_targets():
    space = make_space()
    start = (0,) * space.num_genes
    rng = np.random.default_rng(1)
    for _ in range(20):
        positions = rng.uniform(space.lo, space.hi)
        genome = project_units(space, units_at(space, positions))
        assert space.is_feasible(genome) and _units(space, genome) == _units(space, start)
    # a feasible target is reproduced exactly
    target = (2, -1, -2, 2, 1, 0, -1, -2, 0, 1, 0, 0)
    assert project_units(space, units_at(space, target)) == target


def test_projection_needs_per_type_budget():
    with pytest.raises(TyrError, match="per_type"):
        allocate_exact(make_space(mode="joint"), [[0.0] * 9 for _ in range(12)])


def test_owl_layer_sparsities():
    s = owl_layer_sparsities([0.01, 0.03, 0.02, 0.05], target=0.5, lam=0.1)
    assert np.mean(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.2)
    assert np.argmin(s) == 3 and np.argmax(s) == 0  # most outliers -> least pruned
    assert owl_layer_sparsities([0.02, 0.02], 0.4, 0.1) == pytest.approx([0.4, 0.4])


@pytest.mark.parametrize("num_sequences", [3, 64])
def test_matched_budget_equals_what_the_evolution_spends(num_sequences):
    space = make_space()
    config = EvolutionConfig(
        num_generations=3, num_offspring=10, stages=(Stage(4, 256), Stage(2, 1024), Stage(1, 4096))
    )
    fitness = SyntheticFitness()
    rng = np.random.default_rng(0)
    evaluations, tokens, parent = 0, 0, (0,) * space.num_genes
    for _ in range(config.num_generations):
        result = run_generation(parent, space, config, fitness, rng, num_sequences, 128)
        evaluations += result.num_evaluations
        tokens += result.num_tokens_evaluated
        parent = result.parent
    matched, per_evaluation, positions = matched_budget(config, num_sequences, 128)
    assert matched == evaluations and positions is None
    assert abs(matched * per_evaluation * 128 - tokens) <= matched * 128 / 2 + 1


def test_matched_budget_of_prefix_stages():
    """Stages shorter than a sequence score prefixes: the matched batch is a prefix of one sequence too."""
    config = EvolutionConfig(num_generations=2, num_offspring=10, stages=(Stage(4, 32), Stage(1, 64)))
    fitness, rng, tokens = SyntheticFitness(), np.random.default_rng(0), 0
    for _ in range(config.num_generations):
        tokens += run_generation((0,) * 12, make_space(), config, fitness, rng, 16, 128).num_tokens_evaluated
    evaluations, per_evaluation, positions = matched_budget(config, 16, 128)
    assert (evaluations, per_evaluation) == (30, 1) and positions == round(tokens / evaluations)


class CountingFitness(SyntheticFitness):
    def __init__(self, fail_after: int | None = None):
        super().__init__(noise=0.1)
        self.genomes = 0
        self.fail_after = fail_after

    def __call__(self, genomes, sequence_indices):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the search
        self.genomes += len(genomes)
        return super().__call__(genomes, sequence_indices)


def _search(tmp_path, fitness, sampler, name="a", evaluations=30):
    space = make_space()
    return sampled_search(
        space,
        fitness,
        sampler=sampler,
        num_evaluations=evaluations,
        batch_size=8,
        indices=np.arange(4),
        seed=3,
        journal_path=tmp_path / name / "optuna.journal",
        history_path=tmp_path / name / "history.jsonl",
        identity="test",
    )


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampled_search_uses_the_stated_evaluations_and_resumes_exactly(tmp_path, sampler):
    space = make_space()
    full = _search(tmp_path, CountingFitness(), sampler, "full")
    assert full.evaluations == 30 and full.batches == 4  # 8 + 8 + 8 + 6 trials
    assert space.is_feasible(full.genome)
    history = [json.loads(line) for line in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    assert [h["num_evaluations"] for h in history] == [8, 8, 8, 6]
    assert all(a["fitness"] >= b["fitness"] for a, b in itertools.pairwise(history))  # best so far
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, CountingFitness(fail_after=2), sampler, "killed")
    resumed = _search(tmp_path, CountingFitness(), sampler, "killed")
    assert resumed.genome == full.genome and resumed.fitness == full.fitness
    assert resumed.evaluations == 30
    with pytest.raises(TyrError, match="another search"):
        space_b = make_space()
        sampled_search(
            space_b,
            CountingFitness(),
            sampler=sampler,
            num_evaluations=30,
            batch_size=8,
            indices=np.arange(4),
            seed=3,
            journal_path=tmp_path / "full" / "optuna.journal",
            history_path=tmp_path / "full" / "history.jsonl",
            identity="other",
        )


def test_sampled_search_scores_the_start_first(tmp_path):
    def centre_is_best(genomes, indices):
        return [float(sum(abs(v) for v in g)) for g in genomes]

    result = _search(tmp_path, centre_is_best, "random", "centre", evaluations=10)
    assert result.genome == (0,) * make_space().num_genes and result.fitness == 0.0


def test_tpe_beats_random_on_a_smooth_fitness(tmp_path):
    tpe = _search(tmp_path, CountingFitness(), "tpe", "tpe", evaluations=120)
    rnd = _search(tmp_path, CountingFitness(), "random", "rnd", evaluations=120)
    assert tpe.fitness <= rnd.fitness


# -- end to end --------------------------------------------------------------------------------------------------


def _kept(run_dir) -> tuple[int, int, int]:
    arch = json.loads((run_dir / "final" / "architecture.json").read_text())
    heads = sum(len(layer["attention"]["kept_heads"]) for layer in arch["layers"])
    channels = sum(layer["mlp"]["kept_channels_count"] for layer in arch["layers"])
    return heads, channels, arch["params"]["prunable_pruned"]


@pytest.fixture(scope="module")
def uniform_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "uniform"
    assert main(smoke_args(tiny_assets, out, "--method", "uniform")) == 0
    return out


@pytest.mark.parametrize("method", ["owl", "layer-error", "random", "optuna", "evolution"])
def test_every_method_keeps_the_budget(tiny_assets, tmp_path, uniform_run, method):
    out = tmp_path / method
    assert main(smoke_args(tiny_assets, out, "--method", method)) == 0
    heads, channels, params = _kept(out)
    u_heads, u_channels, u_params = _kept(uniform_run)
    assert (heads, channels) == (u_heads, u_channels)
    assert params <= u_params + 0  # the parameter cap: uniform with every KV head kept
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["method"] == method
    results = [json.loads(p.read_text()) for p in sorted(out.glob("iter-*/result.json"))]
    if method in ("owl", "layer-error"):
        assert len(results) == 1 and metrics["evaluations"] == 0  # one-shot: iteration 1 only
    else:
        assert len(results) == 2 and metrics["evaluations"] > 0
    if method in ("random", "optuna"):  # as many evaluations as the evolution's schedule
        assert [r["evaluations"] for r in results] == [(6 + 3 + 1) * 3, (6 + 3 + 1) * 2]
    # with validation windows (the smoke preset holds some), no result validates worse than its start
    assert all(r["validation_kl"] <= r["start_validation_kl"] for r in results)
    selection = json.loads((out / "final" / "selection.json").read_text())
    assert selection["validation_kl"] == min(r["validation_kl"] for r in results)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda-sp", "flap"])
def test_criteria_run_end_to_end(tiny_assets, tmp_path, uniform_run, criterion):
    out = tmp_path / criterion
    assert main(smoke_args(tiny_assets, out, "--criterion", criterion, "--method", "uniform")) == 0
    heads, channels, _ = _kept(out)
    assert (heads, channels) == _kept(uniform_run)[:2]
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["criterion"] == criterion and np.isfinite(metrics["searched"]["ppl"])


def test_method_needing_per_type_budget_is_refused(capsys, tiny_assets, tmp_path):
    args = smoke_args(tiny_assets, tmp_path / "run", "--method", "owl", "--set", "search.budget=joint")
    assert main(args) == 2
    assert "per_type" in capsys.readouterr().err
