"""Local pruning criteria: which units of one output projection to drop at each ladder level.

``tyr`` (the default) is the second-order pruner of :mod:`supernet.pruner` (progressive OBS mask + exact
least-squares refit). The others are the score-only baselines users compare against; they keep the surviving
columns unchanged:

* ``magnitude``: ``sum ||W_j||^2`` over the unit's input columns j (Torch-Pruning's L2 group norm).
* ``wanda-sp``: ``sum_j sum_i |W_ij| * ||X_j||`` (Wanda's |W|·‖X‖ score summed per structured group).
* ``flap``: ``sum_j Var(X_j) * ||W_j||^2`` (FLAP's fluctuation metric), plus FLAP's bias compensation:
  the removed columns' mean contribution ``sum_{j removed} E[X_j] W_j`` becomes an output bias.

FLAP's own cross-layer score standardisation is an *allocation* rule; here the allocation comes from the
search (or a baseline method), so only its per-module ranking and compensation are used.

Pure tensor math, no I/O. ``W`` is the projection weight transposed, ``(d_in, d_out)``, as in the pruner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tyr.supernet.pruner import PrunerOptions, accumulate_hessian, prune_levels
from tyr.supernet.units import unit_rows

_COMPUTE = torch.float64


@dataclass
class InputStats:
    """Sufficient statistics of a projection's inputs over the calibration tokens.

    Attributes:
        hessian: ``sum X^T X``, (d_in, d_in) float32.
        total: ``sum X`` over tokens, (d_in,) float64.
        count: number of tokens.
    """

    hessian: torch.Tensor
    total: torch.Tensor
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-feature variance over tokens (population), clamped at 0 against rounding."""
        second = self.hessian.diagonal().to(_COMPUTE) / max(self.count, 1)
        return (second - self.mean.square()).clamp_min(0.0)


def accumulate_stats(stats: InputStats | None, X: torch.Tensor) -> InputStats:
    """Add the tokens of ``X`` (..., d_in) to ``stats`` (None starts new statistics)."""
    x = X.reshape(-1, X.shape[-1])
    if stats is None:
        total = torch.zeros(x.shape[1], dtype=_COMPUTE, device=x.device)
        stats = InputStats(accumulate_hessian(None, x), total, 0)
    else:
        accumulate_hessian(stats.hessian, x)
    stats.total += x.to(_COMPUTE).sum(0)
    stats.count += x.shape[0]
    return stats


@dataclass(frozen=True)
class LevelResult:
    """One pruned level: kept unit indices, their (d_kept, d_out) weight, optional (d_out,) output bias."""

    kept: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


class Criterion(ABC):
    """A local pruning criterion: which units of one output projection to keep at every ladder level.

    Subclasses set `name` and implement `prune`; `register_criterion` makes them `supernet.criterion: <name>`.
    """

    name: ClassVar[str]
    # May give a pruned projection an output bias it did not have (FLAP's compensation): the budget then
    # counts d_out more parameters per pruned module, and the dense-masked export cannot hold it.
    adds_output_bias: ClassVar[bool] = False

    @abstractmethod
    def prune(
        self,
        stats: InputStats,
        W: torch.Tensor,
        group_size: int,
        num_remove_per_level: Sequence[int],
        options: PrunerOptions,
    ) -> list[LevelResult]:
        """Prune the dense ``W`` (d_in, d_out) once per removal count; one LevelResult per count."""


class ScoreCriterion(Criterion):
    """Score-only criteria: drop the lowest-scoring units, keep the surviving columns unchanged."""

    @abstractmethod
    def row_scores(self, stats: InputStats, w: torch.Tensor) -> torch.Tensor:
        """Importance of every input row of ``w`` (d_in, d_out) float64; a unit's score is its rows' sum."""

    def compensation(
        self, stats: InputStats, w: torch.Tensor, removed_rows: torch.Tensor
    ) -> torch.Tensor | None:
        """An output bias standing in for the removed rows (None: no compensation)."""
        return None

    def scores(self, stats: InputStats, w: torch.Tensor, group_size: int) -> torch.Tensor:
        """Importance of every unit (higher = keep)."""
        return self.row_scores(stats, w).view(-1, group_size).sum(1)

    def prune(self, stats, W, group_size, num_remove_per_level, options=None) -> list[LevelResult]:
        w = W.to(device=stats.hessian.device, dtype=_COMPUTE)
        num_groups = w.shape[0] // group_size
        order = torch.sort(
            self.scores(stats, w, group_size), stable=True
        ).indices  # lowest first: removed first
        out = []
        for num_remove in num_remove_per_level:
            if not 0 <= num_remove <= num_groups:
                raise ValueError(f"num_remove must be in [0, {num_groups}], got {num_remove}")
            kept = torch.sort(order[num_remove:]).values
            bias = None
            if num_remove > 0:
                bias = self.compensation(
                    stats, w, unit_rows(torch.sort(order[:num_remove]).values, group_size)
                )
            rows = unit_rows(kept, group_size)
            out.append(LevelResult(kept, w.index_select(0, rows).to(torch.float32), bias))
        return out


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make `cls` available as `supernet.criterion: <cls.name>`."""
    CRITERIA[cls.name] = cls
    return cls


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {name!r}; expected one of {', '.join(CRITERIA)}")
    return CRITERIA[name]()


@register_criterion
class TyrCriterion(Criterion):
    """Second-order OBS mask selection plus an exact least-squares re-fit (supernet/pruner.py)."""

    name = "tyr"

    def prune(self, stats, W, group_size, num_remove_per_level, options=None) -> list[LevelResult]:
        options = options if options is not None else PrunerOptions()
        results = prune_levels(stats.hessian, W, group_size, num_remove_per_level, options)
        return [LevelResult(kept, weight) for kept, weight in results]


@register_criterion
class Magnitude(ScoreCriterion):
    """``sum ||W_j||^2`` over the unit's rows (Torch-Pruning's L2 group norm)."""

    name = "magnitude"

    def row_scores(self, stats, w):
        return w.square().sum(1)


@register_criterion
class WandaSP(ScoreCriterion):
    """``sum_i |W_ji| * ||X_j||`` (Wanda's |W|·‖X‖ score summed per structured group)."""

    name = "wanda-sp"

    def row_scores(self, stats, w):
        return w.abs().sum(1) * stats.hessian.diagonal().to(_COMPUTE).clamp_min(0.0).sqrt()


@register_criterion
class Flap(ScoreCriterion):
    """``Var(X_j) * ||W_j||^2`` (FLAP's fluctuation) with FLAP's bias compensation: the removed rows' mean
    contribution ``sum_{j removed} E[X_j] W_j`` becomes an output bias."""

    name = "flap"
    adds_output_bias = True

    def row_scores(self, stats, w):
        return stats.variance.to(w.device) * w.square().sum(1)

    def compensation(self, stats, w, removed_rows):
        return (stats.mean.to(w.device)[removed_rows] @ w[removed_rows]).to(torch.float32)


def prune_by_criterion(
    name: str,
    stats: InputStats,
    W: torch.Tensor,
    group_size: int,
    num_remove_per_level: Sequence[int],
    options: PrunerOptions = PrunerOptions(),  # noqa: B008 - frozen, immutable default
) -> list[LevelResult]:
    """Prune the dense ``W`` once per removal count with the registered criterion `name`."""
    return criterion(name).prune(stats, W, group_size, num_remove_per_level, options)


def group_scores(name: str, stats: InputStats, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Importance of every unit (higher = keep) under a score-only criterion."""
    crit = criterion(name)
    if not isinstance(crit, ScoreCriterion):
        raise ValueError(f"{name!r} is not a score-only criterion")
    return crit.scores(stats, w, group_size)


def reconstruction_errors(
    stats: InputStats, W: torch.Tensor, results: Sequence[LevelResult], group_size: int
) -> list[float]:
    """Relative output error ``sum_t ||x_t W - (x_t W_hat + b)||^2 / sum_t ||x_t W||^2`` of every level.

    ``W_hat`` is the level's weight scattered back to the dense rows (removed rows zero). Computed from the
    statistics in float32 (a ranking proxy for the ``layer-error`` allocation baseline, which minimises the
    sum of per-module errors by dynamic programming), one (d_in, d_in) x (d_in, d_out) product per level.
    """
    h = stats.hessian.float()
    w = W.to(device=h.device, dtype=torch.float32)
    dense = float((w * (h @ w)).sum())
    errors = []
    for result in results:
        diff = w.clone()
        rows = unit_rows(result.kept.to(h.device), group_size)
        diff[rows] -= result.weight.to(device=h.device, dtype=torch.float32)
        err = float((diff * (h @ diff)).sum())
        if result.bias is not None:  # residual is x D - b: expand the square with the token sum and count
            b = result.bias.to(device=h.device, dtype=torch.float32)
            err += -2.0 * float(stats.total.float() @ diff @ b) + stats.count * float(b.square().sum())
        errors.append(max(err, 0.0) / dense if dense > 0 else 0.0)
    return errors
