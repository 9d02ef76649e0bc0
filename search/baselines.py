"""Allocation baselines under the same budget as the search (ALGORITHM §7). Pure functions, no I/O.

Every baseline ends in :func:`allocate_exact`: a dynamic program that picks one level per gene minimising a
sum of per-(gene, level) costs while each module type keeps exactly its budgeted number of units — the same
constraint the evolutionary search holds. The baselines differ only in the costs:

* ``layer-error``: the supernet's recorded local reconstruction error of each variant (EvoPress's DP baseline).
* ``owl`` / ``random`` / ``optuna``: the squared distance, in units, to a *desired* per-gene unit count
  (OWL's outlier-weighted layer sparsities; a sampler's proposal) — a projection onto the feasible set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import numpy as np

from tyr.errors import TyrError
from tyr.search.evolution import EvolutionConfig
from tyr.search.space import Genome, SearchSpace


def allocate_exact(space: SearchSpace, costs: Sequence[Sequence[float]]) -> Genome:
    """The genome minimising ``sum_g costs[g][level index]`` with each kind's kept units exactly on budget.

    ``costs[g]`` lists one finite cost per level of gene g, in ladder order. Ties prefer the level closest
    to 0 (the ladder centre). Needs a ``per_type`` budget. With Tyr's own budget the unit counts imply the
    parameter cap; for other caps a Lagrangian penalty on parameters is raised (bisection) until it holds.
    """
    if space.budget.units is None:
        raise TyrError("this allocation needs search.budget=per_type (exact unit counts per module type)")
    if len(costs) != space.num_genes:
        raise ValueError(f"got costs for {len(costs)} genes, the space has {space.num_genes}")
    genome = _allocate_units(space, costs)
    if space.params(genome) > space.budget.max_params:
        genome = _allocate_under_cap(space, costs)
    if not space.is_feasible(genome):
        raise TyrError(f"allocation is not feasible: {space.describe(genome)}")
    return genome


def _allocate_units(space: SearchSpace, costs: Sequence[Sequence[float]], penalty: float = 0.0) -> Genome:
    """Exact per-kind unit counts; ``penalty`` x the level's parameters is added to every cost."""
    if penalty:
        costs = [
            [c + penalty * p for c, p in zip(row, lad.params_kept, strict=True)]
            for row, lad in zip(costs, space.ladders, strict=True)
        ]
    genome = [0] * space.num_genes
    for kind, budget in space.budget.units.items():
        genes = [g for g in range(space.num_genes) if space.genes[g].kind == kind]
        for g, level in zip(genes, _allocate_kind(space, genes, costs, int(budget)), strict=True):
            genome[g] = level
    return tuple(genome)


def _allocate_under_cap(space: SearchSpace, costs: Sequence[Sequence[float]]) -> Genome:
    """Smallest parameter penalty (to bisection precision) whose allocation meets the parameter cap."""
    spread = max(max(row) - min(row) for row in costs) or 1.0
    hi = spread / max(max(lad.params_kept) for lad in space.ladders)
    best = None
    for _ in range(64):
        genome = _allocate_units(space, costs, hi)
        if space.params(genome) <= space.budget.max_params:
            best = genome
            break
        hi *= 2
    if best is None:
        raise TyrError(
            f"no allocation with these unit counts fits the parameter cap {space.budget.max_params}"
        )
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        genome = _allocate_units(space, costs, mid)
        if space.params(genome) <= space.budget.max_params:
            hi, best = mid, genome
        else:
            lo = mid
    return best


def _allocate_kind(
    space: SearchSpace, genes: list[int], costs: Sequence[Sequence[float]], budget: int
) -> list[int]:
    """Knapsack with an exact total over one kind's genes; units are divided by their common gcd."""
    ladders = [space.ladders[g] for g in genes]
    unit = reduce(math.gcd, [u for lad in ladders for u in lad.units_kept] + [budget]) or 1
    total = budget // unit
    width = sum(max(lad.units_kept) for lad in ladders) // unit + 1
    best = np.full(width, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(genes), width), dtype=np.int64)
    for row, (g, lad) in enumerate(zip(genes, ladders, strict=True)):
        cost = np.asarray(costs[g], dtype=np.float64)
        if cost.shape != (len(lad.levels),) or not np.isfinite(cost).all():
            raise ValueError(f"gene {g}: need {len(lad.levels)} finite costs, got {costs[g]!r}")
        nxt = np.full(width, np.inf)
        for i in sorted(range(len(lad.levels)), key=lambda i: (abs(lad.levels[i]), lad.levels[i])):
            shift = lad.units_kept[i] // unit
            cand = np.full(width, np.inf)
            cand[shift:] = best[: width - shift] + cost[i]
            better = cand < nxt  # strict: the first (most central) level keeps ties
            nxt[better] = cand[better]
            choices[row, better] = i
        best = nxt
    if not np.isfinite(best[total]):
        raise TyrError(f"no combination of levels keeps exactly {budget} units")
    levels = []
    for row in range(len(genes) - 1, -1, -1):
        i = int(choices[row, total])
        levels.append(ladders[row].levels[i])
        total -= ladders[row].units_kept[i] // unit
    return levels[::-1]


def project_units(space: SearchSpace, desired_units: Sequence[float]) -> Genome:
    """The feasible genome whose kept units are closest (least squares, in units) to ``desired_units``."""
    if len(desired_units) != space.num_genes:
        raise ValueError(
            f"got {len(desired_units)} desired unit counts, the space has {space.num_genes} genes"
        )
    costs = [
        [(u - float(d)) ** 2 for u in lad.units_kept]
        for lad, d in zip(space.ladders, desired_units, strict=True)
    ]
    return allocate_exact(space, costs)


def units_at(space: SearchSpace, positions: Sequence[float]) -> list[float]:
    """Kept units at fractional ladder positions (linear between levels): a sampler's continuous proposal."""
    return [
        float(np.interp(p, lad.levels, lad.units_kept))
        for lad, p in zip(space.ladders, positions, strict=True)
    ]


def owl_layer_sparsities(outlier_ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL: layer densities spread over a width of 2*lam in proportion to the outlier ratio, mean 1 - target.

    More outliers -> denser layer. Returns sparsities, clipped to [0, 1].
    """
    ratios = np.asarray(outlier_ratios, dtype=np.float64)
    spread = ratios.max() - ratios.min() if ratios.size else 0.0
    scaled = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(ratios)
    density = scaled - scaled.mean() + (1.0 - target)
    return [float(s) for s in np.clip(1.0 - density, 0.0, 1.0)]


def matched_budget(config: EvolutionConfig, num_sequences: int, seq_len: int) -> tuple[int, int, int | None]:
    """(fitness evaluations, sequences per evaluation, positions per sequence) equal to what `config`'s search
    spends; positions None means whole sequences.

    Evaluations count every candidate scored in every stage (the parent included); the tokens per evaluation
    spread the search's total tokens evenly over them (a stage below one sequence's length scores a prefix,
    see `tyr.search.batch`), so a random or Optuna search on one fixed batch processes as many tokens as the
    evolution does: whole sequences, or a prefix of one when that is less than a sequence.
    """
    per_generation, tokens = 0, 0
    count = config.num_offspring
    for s, stage in enumerate(config.stages):
        if s > 0:
            count = min(config.stages[s - 1].num_survivors, count)
        scored = count + (1 if s == len(config.stages) - 1 else 0)
        per_generation += scored
        n_seq = min(math.ceil(stage.num_tokens / seq_len), num_sequences)
        tokens += scored * (stage.num_tokens if stage.num_tokens < seq_len else n_seq * seq_len)
    evaluations = per_generation * config.num_generations
    if tokens < per_generation * seq_len:
        return evaluations, 1, max(1, round(tokens / per_generation))
    per_evaluation = max(1, min(num_sequences, round(tokens / (per_generation * seq_len))))
    return evaluations, per_evaluation, None
