"""EvoPress-style (1+lambda) evolutionary search with level-switch mutations and multi-stage selection.

Pure functions: randomness comes in as an `np.random.Generator`, fitness as a callable; no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

import numpy as np

from tyr.errors import TyrError
from tyr.search.batch import Batch, stage_batch
from tyr.search.space import Genome, SearchSpace

__all__ = [
    "Batch",
    "EvolutionConfig",
    "FitnessFn",
    "GenerationResult",
    "Genome",
    "SELECTIONS",
    "Stage",
    "mutate",
    "run_generation",
    "sample_offspring",
    "select_survivors",
]


@dataclass(frozen=True)
class Stage:
    """One selection stage: evaluate all candidates on `num_tokens` tokens, keep the best `num_survivors`."""

    num_survivors: int
    num_tokens: int


# How a generation decides between its parent and its children (`EvolutionConfig.selection`):
# legacy: the parent joins the last stage only, and the best of that stage (a child on a tie) is the next parent.
# paired: the parent is scored on every stage's batch beside the children; only children that beat it on that
#         batch go on, and a child replaces it only by beating it on the last stage's batch.
SELECTIONS = ("paired", "legacy")


@dataclass(frozen=True)
class EvolutionConfig:
    """Schedule of the search.

    Attributes:
        num_generations: generations to run (a resumed search continues up to this number).
        num_offspring: children drawn per generation (the parent competes in the last stage on top of these).
        stages: selection stages, e.g. Týr: (16, 2048), (4, 16384), (1, 131072); the last keeps 1.
        max_mutations: level switches per child: n = min(U{1..max}, U{1..max}).
        max_level_distance: optional: reject children with any |level| > this.
        max_tries: consecutive failed attempts to draw one more unique feasible child before giving up.
        selection: `paired` or `legacy` (see `SELECTIONS`); legacy is what searches did before paired existed.
    """

    num_generations: int
    num_offspring: int
    stages: tuple[Stage, ...]
    max_mutations: int = 4
    max_level_distance: int | None = None
    max_tries: int = 1000
    selection: str = "legacy"

    def validate(self) -> None:
        """TyrError for schedules that cannot run."""

        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TyrError(f"search: {name} must be a positive integer, got {value!r}")

        positive_int("num_generations", self.num_generations)
        positive_int("num_offspring", self.num_offspring)
        positive_int("max_mutations", self.max_mutations)
        positive_int("max_tries", self.max_tries)
        if self.max_level_distance is not None:
            positive_int("max_level_distance", self.max_level_distance)
        if self.selection not in SELECTIONS:
            raise TyrError(
                f"search: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if not self.stages:
            raise TyrError("search: at least one selection stage is needed, e.g. [[1, 131072]]")
        for i, st in enumerate(self.stages):
            if not isinstance(st, Stage):
                raise TyrError(f"search: stage {i} must be (num_survivors, num_tokens), got {st!r}")
            positive_int(f"stage {i} num_survivors", st.num_survivors)
            positive_int(f"stage {i} num_tokens", st.num_tokens)
        first = self.stages[0]
        if first.num_survivors > self.num_offspring:
            raise TyrError(
                f"search: stage 0 keeps {first.num_survivors} survivors but only {self.num_offspring} offspring "
                "are drawn per generation: raise num_offspring or lower the survivors"
            )
        for i, (a, b) in enumerate(pairwise(self.stages), start=1):
            if b.num_survivors >= a.num_survivors:
                raise TyrError(
                    f"search: survivors must strictly decrease from stage to stage, but stage {i} keeps "
                    f"{b.num_survivors} after stage {i - 1} kept {a.num_survivors}"
                )
            if b.num_tokens < a.num_tokens:
                raise TyrError(
                    f"search: tokens must not decrease from stage to stage, but stage {i} uses {b.num_tokens} "
                    f"after stage {i - 1} used {a.num_tokens}"
                )
        if self.stages[-1].num_survivors != 1:
            raise TyrError(
                f"search: the last stage must keep exactly 1 survivor, got {self.stages[-1].num_survivors}"
            )


class FitnessFn(Protocol):
    def __call__(self, genomes: Sequence[Genome], batch: Batch) -> list[float]:
        """Fitness of each genome on the calibration tokens of `batch`; lower is better.

        A backend may also expose `io_counters` (`tyr.search.counters.IOCounters`, running totals); the search
        records their change per generation.
        """
        ...


@dataclass
class GenerationResult:
    parent: Genome  # the winner of the generation: the next parent
    fitness: float  # its fitness on the batch of the last stage evaluated
    num_evaluations: int  # candidate evaluations over all stages
    num_tokens_evaluated: int  # sum over stages of candidates * tokens of the stage's batch
    stage_best: list[float] = field(default_factory=list)  # best fitness per stage evaluated
    replaced: bool = True  # paired: whether a child replaced the parent (legacy: the winner is always "new")


# -- mutation -----------------------------------------------------------------------------------------------


def _switch_pairs(levels: np.ndarray, space: SearchSpace) -> np.ndarray:
    """Flat indices (i * G + j) of valid level switches: gene i one level denser, gene j one level sparser."""
    g = space.num_genes
    down_ok = levels - 1 >= space.lo
    up_ok = levels + 1 <= space.hi
    valid = down_ok[:, None] & up_ok[None, :]
    np.fill_diagonal(valid, False)
    if space.budget.mode == "per_type":
        rows = np.arange(g)
        idx = levels - space.lo
        here = space.units_table[rows, idx]
        gain = np.where(down_ok, space.units_table[rows, np.maximum(idx - 1, 0)] - here, -1)
        loss = np.where(
            up_ok, here - space.units_table[rows, np.minimum(idx + 1, space.units_table.shape[1] - 1)], -2
        )
        same_kind = space.kind_index[:, None] == space.kind_index[None, :]
        valid &= same_kind & (gain[:, None] == loss[None, :])
    return np.flatnonzero(valid)


def mutate(
    parent: Sequence[int],
    space: SearchSpace,
    rng: np.random.Generator,
    max_mutations: int,
    max_tries: int = 1000,
) -> Genome:
    """A child of `parent` after n = min(U{1..max}, U{1..max}) level switches.

    Each switch moves one gene one level denser (-1) and a different gene one level sparser (+1); per_type: both
    genes have the same kind and the same unit step, so each kind's kept-unit count stays exactly the same.
    Children keeping more than `max_params` are drawn again. The child may equal the parent (switches can cancel).
    """
    if max_mutations < 1:
        raise ValueError(f"max_mutations must be >= 1, got {max_mutations}")
    g = space.num_genes
    start = np.asarray(parent, dtype=np.int64)
    for _ in range(max_tries):
        n = int(min(rng.integers(1, max_mutations + 1), rng.integers(1, max_mutations + 1)))
        child = start.copy()
        for _ in range(n):
            pairs = _switch_pairs(child, space)
            if pairs.size == 0:
                raise TyrError(
                    "search: no level switch is possible from this genome (each switch needs two genes of the "
                    "same kind, one able to go denser and one sparser): use longer ladders or another budget mode"
                )
            i, j = divmod(int(pairs[rng.integers(pairs.size)]), g)
            child[i] -= 1
            child[j] += 1
        out = tuple(int(v) for v in child)
        if space.params(out) <= space.budget.max_params:
            return out
    raise TyrError(
        f"search: no mutation within the parameter budget ({space.budget.max_params}) found in {max_tries} "
        "tries: the budget is too tight for this genome"
    )


def sample_offspring(
    parent: Sequence[int],
    space: SearchSpace,
    rng: np.random.Generator,
    num_offspring: int,
    max_mutations: int,
    max_level_distance: int | None = None,
    max_tries: int = 1000,
) -> list[Genome]:
    """`num_offspring` unique feasible children, each different from `parent`.

    TyrError when `max_tries` consecutive draws fail to give a new child (the space around the parent is too small).
    """
    parent = tuple(int(v) for v in parent)
    if not space.is_feasible(parent):
        raise TyrError(f"search: the parent genome is not feasible: {space.describe(parent)}")
    if max_level_distance is not None and any(abs(v) > max_level_distance for v in parent):
        raise TyrError(
            f"search: the parent genome already has a level beyond max_level_distance={max_level_distance}"
        )
    seen = {parent}
    out: list[Genome] = []
    failures = 0
    while len(out) < num_offspring:
        child = mutate(parent, space, rng, max_mutations, max_tries=max_tries)
        ok = child not in seen and space.is_feasible(child)
        if ok and max_level_distance is not None:
            ok = all(abs(v) <= max_level_distance for v in child)
        if ok:
            seen.add(child)
            out.append(child)
            failures = 0
            continue
        failures += 1
        if failures >= max_tries:
            raise TyrError(
                f"search: found only {len(out)} of {num_offspring} unique feasible offspring "
                f"({max_tries} draws in a row gave nothing new): lower num_offspring, raise max_mutations "
                "or max_level_distance, or use longer ladders"
            )
    return out


# -- selection ----------------------------------------------------------------------------------------------


def select_survivors(fitnesses: Sequence[float], k: int) -> list[int]:
    """Indices of the k lowest fitnesses, best first; ties keep the earlier index; NaN ranks last."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    keys = [math.inf if math.isnan(float(f)) else float(f) for f in fitnesses]
    return sorted(range(len(keys)), key=keys.__getitem__)[:k]


def _evaluate(fitness: FitnessFn, genomes: list[Genome], batch: Batch) -> list[float]:
    values = [float(v) for v in fitness(genomes, batch)]
    if len(values) != len(genomes):
        raise ValueError(f"fitness returned {len(values)} values for {len(genomes)} genomes")
    return values


def run_generation(
    parent: Sequence[int],
    space: SearchSpace,
    config: EvolutionConfig,
    fitness: FitnessFn,
    rng: np.random.Generator,
    num_sequences: int,
    seq_len: int,
) -> GenerationResult:
    """One generation: draw offspring, then select through the stages (`config.selection`).

    Each stage draws ceil(num_tokens / seq_len) distinct sequence indices (at most num_sequences), sorted, shared
    by all candidates of the stage; a stage of fewer tokens than one sequence scores a prefix of one
    (`tyr.search.batch.stage_batch`). The offspring and every stage's batch are drawn before anything is scored,
    so the generator's draws never depend on fitness values (`paired` may stop before its last stage).

    legacy: the parent is appended after the survivors of the last stage, so on a tie a child wins; returns the
    best candidate of the last stage with its last-stage fitness.
    paired: see `_paired_selection`.
    """
    if num_sequences < 1 or seq_len < 1:
        raise TyrError(
            f"search: need at least one calibration sequence of length >= 1, got {num_sequences} x {seq_len}"
        )
    parent = tuple(int(v) for v in parent)
    children = sample_offspring(
        parent,
        space,
        rng,
        config.num_offspring,
        config.max_mutations,
        max_level_distance=config.max_level_distance,
        max_tries=config.max_tries,
    )
    batches = [stage_batch(rng, st.num_tokens, num_sequences, seq_len) for st in config.stages]
    select = _paired_selection if config.selection == "paired" else _legacy_selection
    return select(parent, children, config.stages, batches, fitness, seq_len)


def _legacy_selection(
    parent: Genome,
    candidates: list[Genome],
    stages: Sequence[Stage],
    batches: list[Batch],
    fitness: FitnessFn,
    seq_len: int,
) -> GenerationResult:
    """Children through the stages; the parent joins the last one; its best candidate is the next parent."""
    num_evaluations = 0
    num_tokens = 0
    stage_best: list[float] = []
    best, best_fitness = parent, math.nan
    for s, (stage, batch) in enumerate(zip(stages, batches, strict=True)):
        if s == len(stages) - 1:
            candidates = [*candidates, parent]
        values = _evaluate(fitness, candidates, batch)
        num_evaluations += len(candidates)
        num_tokens += len(candidates) * batch.num_tokens(seq_len)
        keep = select_survivors(values, min(stage.num_survivors, len(candidates)))
        stage_best.append(values[keep[0]])
        best, best_fitness = candidates[keep[0]], values[keep[0]]
        candidates = [candidates[i] for i in keep]
    return GenerationResult(best, best_fitness, num_evaluations, num_tokens, stage_best, best != parent)


def _paired_selection(
    parent: Genome,
    children: list[Genome],
    stages: Sequence[Stage],
    batches: list[Batch],
    fitness: FitnessFn,
    seq_len: int,
) -> GenerationResult:
    """The parent is scored beside the children on every stage's batch (a paired comparison: the same tokens).

    A stage keeps its best `num_survivors` children among those that beat the parent on its batch (strictly
    lower fitness); when none does, the generation ends there and the parent stays. A child replaces the parent
    only by beating it on the last stage's batch. So the parent is never replaced by a child that lost to it on
    a batch both were scored on, and a generation whose children all lose early skips its costlier stages.
    """
    num_evaluations = 0
    num_tokens = 0
    stage_best: list[float] = []
    for stage, batch in zip(stages, batches, strict=True):
        values = _evaluate(fitness, [*children, parent], batch)
        num_evaluations += len(children) + 1
        num_tokens += (len(children) + 1) * batch.num_tokens(seq_len)
        parent_value, child_values = values[-1], values[:-1]
        keep = select_survivors(child_values, min(stage.num_survivors, len(children)))
        stage_best.append(min(parent_value, child_values[keep[0]]) if keep else parent_value)
        winners = [i for i in keep if child_values[i] < parent_value]  # NaN never wins
        if not winners:
            return GenerationResult(parent, parent_value, num_evaluations, num_tokens, stage_best, False)
        children = [children[i] for i in winners]
        best_value = child_values[winners[0]]
    return GenerationResult(children[0], best_value, num_evaluations, num_tokens, stage_best, True)
