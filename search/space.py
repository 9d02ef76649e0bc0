"""Search space: per-gene level ladders and the budget every candidate must respect.

A genome is a tuple of ints, one ladder *level* per gene, genes in `genes_of` order (layer-major, attention
before MLP). Level 0 is the gene's ladder centre, +1 is one step sparser (fewer units kept), -1 one step denser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from numbers import Integral
from typing import Literal

import numpy as np

from tyr.supernet.variant import GENE_KINDS, Gene, GeneKind

Genome = tuple[int, ...]
BudgetMode = Literal["per_type", "joint"]
BUDGET_MODES: tuple[str, ...] = ("per_type", "joint")


def _int_tuple(values: Sequence[int], what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ValueError(f"{what} must be integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class GeneLadder:
    """The levels one gene may take, with the units and exact prunable parameters each keeps.

    Attributes:
        gene: the module.
        levels: sorted ascending, contiguous, contains 0.
        units_kept: kept units per level (strictly decreasing with level).
        params_kept: exact prunable parameters kept per level (non-increasing with level).
    """

    gene: Gene
    levels: tuple[int, ...]
    units_kept: tuple[int, ...]
    params_kept: tuple[int, ...]

    def __post_init__(self) -> None:
        name = getattr(self.gene, "name", repr(self.gene))
        if not isinstance(self.gene, Gene) or self.gene.kind not in GENE_KINDS:
            raise ValueError(f"ladder gene must be a Gene of kind {GENE_KINDS}, got {self.gene!r}")
        levels = _int_tuple(self.levels, f"ladder {name}: levels")
        units = _int_tuple(self.units_kept, f"ladder {name}: units_kept")
        params = _int_tuple(self.params_kept, f"ladder {name}: params_kept")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "units_kept", units)
        object.__setattr__(self, "params_kept", params)
        if not levels:
            raise ValueError(f"ladder {name}: no levels")
        if len(units) != len(levels) or len(params) != len(levels):
            raise ValueError(
                f"ladder {name}: {len(levels)} levels but {len(units)} units_kept and {len(params)} params_kept"
            )
        if levels != tuple(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"ladder {name}: levels must be sorted, contiguous integers, got {levels}")
        if 0 not in levels:
            raise ValueError(f"ladder {name}: levels must contain the centre level 0, got {levels}")
        if min(units) < 0 or min(params) < 0:
            raise ValueError(f"ladder {name}: units_kept and params_kept must be non-negative")
        if any(a <= b for a, b in pairwise(units)):
            raise ValueError(f"ladder {name}: units_kept must strictly decrease with level, got {units}")
        if any(a < b for a, b in pairwise(params)):
            raise ValueError(f"ladder {name}: params_kept must not increase with level, got {params}")

    def index(self, level: int) -> int:
        """Position of `level` in the per-level tuples (no range check)."""
        return level - self.levels[0]

    def has_level(self, level: int) -> bool:
        return self.levels[0] <= level <= self.levels[-1]


@dataclass(frozen=True)
class Budget:
    """What every candidate must satisfy.

    Attributes:
        mode: "per_type" keeps the kept-unit count of each kind exactly; "joint" only bounds the parameters.
        max_params: no candidate may keep more prunable parameters than this.
        units: per_type only: the exact kept-unit count per kind ("attn", "mlp").
    """

    mode: BudgetMode
    max_params: int
    units: Mapping[str, int] | None = None


class SearchSpace:
    """Ladders of all genes plus the budget; answers feasibility questions about genomes."""

    def __init__(self, ladders: Sequence[GeneLadder], budget: Budget):
        ladders = tuple(ladders)
        if not ladders:
            raise ValueError("search space needs at least one gene ladder")
        for lad in ladders:
            if not isinstance(lad, GeneLadder):
                raise ValueError(f"expected GeneLadder, got {type(lad).__name__}")
        order = [(lad.gene.layer, GENE_KINDS.index(lad.gene.kind)) for lad in ladders]
        if any(a >= b for a, b in pairwise(order)):
            raise ValueError(
                "ladders must be unique genes in canonical order (layer-major, attn before mlp), got "
                + ", ".join(lad.gene.name for lad in ladders)
            )
        if budget.mode not in BUDGET_MODES:
            raise ValueError(f"budget mode must be one of {BUDGET_MODES}, got {budget.mode!r}")
        if isinstance(budget.max_params, bool) or not isinstance(budget.max_params, Integral):
            raise ValueError(f"budget max_params must be an integer, got {budget.max_params!r}")
        kinds = tuple(k for k in GENE_KINDS if any(lad.gene.kind == k for lad in ladders))
        if budget.mode == "per_type":
            if budget.units is None or set(budget.units) != set(kinds):
                got = None if budget.units is None else sorted(budget.units)
                raise ValueError(
                    f"per_type budget needs units for exactly the kinds {list(kinds)}, got {got}"
                )
        elif budget.units is not None:
            raise ValueError("joint budget takes no per-kind units (units must be None)")

        self.ladders: tuple[GeneLadder, ...] = ladders
        self.budget = budget
        self.kinds: tuple[GeneKind, ...] = kinds
        self.genes: tuple[Gene, ...] = tuple(lad.gene for lad in ladders)
        self.num_genes: int = len(ladders)
        self._unit_budget = None if budget.units is None else {k: int(v) for k, v in budget.units.items()}
        # numpy views for the mutation operator (levels outside a ladder are padded and never read)
        self.lo = np.array([lad.levels[0] for lad in ladders], dtype=np.int64)
        self.hi = np.array([lad.levels[-1] for lad in ladders], dtype=np.int64)
        self.kind_index = np.array([GENE_KINDS.index(g.kind) for g in self.genes], dtype=np.int64)
        width = max(len(lad.levels) for lad in ladders)
        self.units_table = np.zeros((self.num_genes, width), dtype=np.int64)
        for i, lad in enumerate(ladders):
            self.units_table[i, : len(lad.levels)] = lad.units_kept

    # -- genome queries ---------------------------------------------------------------------------------

    def _check(self, genome: Sequence[int]) -> None:
        if len(genome) != self.num_genes:
            raise ValueError(f"genome has {len(genome)} levels, the search space has {self.num_genes} genes")
        for i, (lad, level) in enumerate(zip(self.ladders, genome, strict=True)):
            if not lad.has_level(level):
                raise ValueError(
                    f"gene {i} ({lad.gene.name}) has no level {level} (ladder {lad.levels[0]}..{lad.levels[-1]})"
                )

    def has_level(self, gene_index: int, level: int) -> bool:
        return self.ladders[gene_index].has_level(level)

    def params(self, genome: Sequence[int]) -> int:
        """Exact prunable parameters kept by `genome` (ValueError if a level does not exist)."""
        self._check(genome)
        return sum(lad.params_kept[lad.index(level)] for lad, level in zip(self.ladders, genome, strict=True))

    def units(self, genome: Sequence[int], kind: str) -> int:
        """Kept units of one kind (attention query heads or MLP channels)."""
        self._check(genome)
        return sum(
            lad.units_kept[lad.index(level)]
            for lad, level in zip(self.ladders, genome, strict=True)
            if lad.gene.kind == kind
        )

    def is_feasible(self, genome: Sequence[int]) -> bool:
        """Levels exist, params <= max_params and (per_type) each kind keeps exactly its budgeted units."""
        if len(genome) != self.num_genes:
            return False
        if not all(lad.has_level(level) for lad, level in zip(self.ladders, genome, strict=True)):
            return False
        if self.params(genome) > self.budget.max_params:
            return False
        if self._unit_budget is not None:
            return all(self.units(genome, k) == u for k, u in self._unit_budget.items())
        return True

    def describe(self, genome: Sequence[int]) -> str:
        """Short human summary of why a genome is (in)feasible, for error messages."""
        if len(genome) != self.num_genes:
            return f"genome has {len(genome)} levels, the search space has {self.num_genes} genes"
        try:
            self._check(genome)
        except ValueError as e:
            return str(e)
        parts = [f"params {self.params(genome)} (max {self.budget.max_params})"]
        if self._unit_budget is not None:
            parts += [f"{k} units {self.units(genome, k)} (budget {u})" for k, u in self._unit_budget.items()]
        return ", ".join(parts)


def budget_for_start(ladders: Sequence[GeneLadder], start: Sequence[int], mode: BudgetMode) -> Budget:
    """The budget that `start` meets exactly: max_params = its params; per_type: its unit count per kind."""
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}")
    probe = SearchSpace(ladders, Budget("joint", 0))
    max_params = probe.params(start)
    if mode == "joint":
        return Budget("joint", max_params)
    return Budget("per_type", max_params, {k: probe.units(start, k) for k in probe.kinds})
