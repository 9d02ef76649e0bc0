"""The ladder of sparsities per gene (ALGORITHM §3): levels around a centre, one step in units apart."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tyr.supernet.variant import Gene


@dataclass(frozen=True)
class Ladder:
    """Levels of one gene: level l removes `centre_removed + l * step` of its `num_units` units."""

    gene: Gene
    num_units: int
    centre_removed: int
    step: int
    levels: tuple[int, ...]

    def removed(self, level: int) -> int:
        return self.centre_removed + level * self.step

    def sparsity(self, level: int) -> float:
        return self.removed(level) / self.num_units


def step_units(num_units: int, fraction: float, min_step: int, multiple: int = 1) -> int:
    """One ladder step in units: `fraction` of the module, rounded to `multiple`, at least `min_step`."""
    raw = fraction * num_units
    rounded = multiple * max(1, round(raw / multiple))
    return max(min_step, rounded)


def centre_for_sparsity(num_units: int, sparsity: float, multiple: int = 1) -> int:
    """Units removed at the centre: the target rounded *up* to `multiple` (the budget is never looser)."""
    removed = multiple * math.ceil(sparsity * num_units / multiple - 1e-9)
    return min(num_units, max(0, removed))


def make_ladder(gene: Gene, num_units: int, centre_removed: int, step: int, num_levels: int) -> Ladder:
    """Levels −h..+h (h = (num_levels-1)//2) clipped to those removing between 0 and all units."""
    if not 0 <= centre_removed <= num_units:
        raise ValueError(f"centre {centre_removed} outside [0, {num_units}] for gene {gene.name}")
    half = (num_levels - 1) // 2
    levels = tuple(lv for lv in range(-half, half + 1) if 0 <= centre_removed + lv * step <= num_units)
    return Ladder(gene, num_units, centre_removed, step, levels)
