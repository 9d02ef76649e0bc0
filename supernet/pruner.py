"""Týr-the-Pruner local pruner for one output projection (pure tensor math, no I/O).

A unit of a module is a group of ``group_size`` contiguous input columns of its output projection
(``o_proj``: one query head, ``group_size = head_dim``; ``down_proj``: one MLP channel, ``group_size = 1``).
Removing a unit removes those rows of ``W = linear.weight.T`` (shape ``(d_in, d_out)``).

Given ``H = sum X^T X`` over calibration tokens, the pruner

1. chooses the mask progressively with second-order (OBS) scores plus an optional first-order term,
   compensating the remaining rows after every round, and
2. re-fits the kept rows by exact ridge-damped least squares against the dense output ``X W``.

The ridge has two forms (``PrunerOptions.refit``): ``zero`` solves ``Hd[K, K] W_K = (H W)[K]``, which shrinks
the kept rows toward zero (Tyr's default); ``dense`` solves ``Hd[K, K] W_K = (Hd W)[K]``, which shrinks them
toward the dense weights (the official Týr code: its G is computed from the damped H). With nothing removed
``dense`` gives back W exactly, and its refit is the all-at-once OBS compensation of W.

The solves run on the device of ``H`` in ``PrunerOptions.solve_dtype``: float64 by default, float32 as the fast
path for GPUs whose float64 rate is a small fraction of their float32 rate (most non-datacenter ones); the
float32 path keeps the same units on the test models and re-fits within 1e-4 of float64 (tests/test_pruner.py).
Returned weights are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from tyr.supernet.units import unit_rows

_COMPUTE = torch.float64
_JITTERS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
REFITS = ("zero", "dense")  # PrunerOptions.refit


@dataclass(frozen=True)
class PrunerOptions:
    """Options of the local pruner.

    Attributes:
        damp: ridge damping, ``H += damp * mean(diag H) * I``.
        use_hessian: if False, H is replaced by the identity (magnitude scores, no compensation, no refit).
        use_first_order: if False, the first-order score term ``sum(W_g * G_g)`` is dropped.
        num_rounds: number of progressive rounds; None means one group per round. Removal counts are split as
            evenly as possible (earlier rounds get the extra one), never more rounds than groups to remove.
        solve_dtype: dtype of the damped Hessian, its inverse and every solve (float64 or float32).
        refit: the ridge's target: ``zero`` (``(H W)[K]``: shrink toward zero) or ``dense`` (``(Hd W)[K]``:
            shrink toward the dense weights). See the module docstring.
    """

    damp: float = 0.01
    use_hessian: bool = True
    use_first_order: bool = False  # the paper's term; measured harmful on SmolLM2 (see tyr/config.py)
    num_rounds: int | None = None
    solve_dtype: torch.dtype = _COMPUTE
    refit: str = "zero"

    def __post_init__(self) -> None:
        if not self.damp >= 0:  # also rejects NaN
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.num_rounds is not None and (isinstance(self.num_rounds, bool) or self.num_rounds < 1):
            raise ValueError(f"num_rounds must be None or >= 1, got {self.num_rounds}")
        if self.solve_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"solve_dtype must be torch.float64 or torch.float32, got {self.solve_dtype}")
        if self.refit not in REFITS:
            raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {self.refit!r}")


@dataclass
class _Prepared:
    """Quantities shared by every removal level of one module (all in the solve dtype)."""

    hd: torch.Tensor  # damped Hessian (dead diagonal set to 1), (d_in, d_in)
    hinv: torch.Tensor  # inverse of hd, (d_in, d_in)
    g: torch.Tensor  # H_raw @ W, (d_in, d_out): the gradient term of the scores
    w: torch.Tensor  # W with dead rows zeroed, (d_in, d_out)
    refit: str = "zero"  # PrunerOptions.refit

    @cached_property
    def target(self) -> torch.Tensor:
        """The right-hand side of the refit: ``H W`` (refit zero) or ``hd W`` (refit dense)."""
        return self.hd @ self.w if self.refit == "dense" else self.g

    @cached_property
    def z(self) -> torch.Tensor:
        """``hd^-1 target`` (the ridge solution with nothing removed), used by the Schur-complement refit; for
        refit dense that is W itself (taken exactly rather than through the inverse)."""
        return self.w if self.refit == "dense" else self.hinv @ self.g


def accumulate_hessian(H: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """Accumulate ``H += X^T X`` in place.

    Args:
        H: running (d_in, d_in) float32/float64 sum, or None to start a new float32 one on ``X.device``.
        X: inputs of any floating dtype, shape (..., d_in); leading dims are flattened.

    Returns:
        The updated H (the same tensor when H was given).
    """
    if X.dim() < 1:
        raise ValueError("X must have at least one dimension")
    d_in = X.shape[-1]
    if H is None:
        H = torch.zeros(d_in, d_in, dtype=torch.float32, device=X.device)
    elif H.shape != (d_in, d_in):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(d_in, d_in)}")
    elif H.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"H must be float32 or float64, got {H.dtype}")
    x = X.reshape(-1, d_in).to(device=H.device, dtype=H.dtype)
    return H.addmm_(x.T, x)


def split_rounds(num_remove: int, num_rounds: int | None) -> list[int]:
    """Split a removal count over progressive rounds.

    Args:
        num_remove: groups to remove in total.
        num_rounds: requested rounds; None means one group per round.

    Returns:
        Per-round counts, as even as possible with the extra ones first; empty when num_remove is 0.
    """
    rounds = num_remove if num_rounds is None else min(num_rounds, num_remove)
    if rounds <= 0:
        return []
    base, extra = divmod(num_remove, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def prune_groups(
    H: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    num_remove: int,
    options: PrunerOptions = PrunerOptions(),  # noqa: B008 - frozen, immutable default
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``num_remove`` groups of input rows of one output projection.

    Args:
        H: undamped ``sum X^T X``, (d_in, d_in).
        W: projection weight transposed, (d_in, d_out), any floating dtype.
        group_size: rows per group (head_dim for attention heads, 1 for MLP channels).
        num_remove: groups to remove, in ``[0, d_in // group_size]``.
        options: pruner options.

    Returns:
        ``(kept_groups, W_kept)``: sorted int64 indices of the kept groups and float32 re-fitted weights
        of shape ``(num_kept * group_size, d_out)``, both on ``H.device``.
    """
    return prune_levels(H, W, group_size, [num_remove], options)[0]


def prune_levels(
    H: torch.Tensor,
    W: torch.Tensor,
    group_size: int,
    num_remove_per_level: Sequence[int],
    options: PrunerOptions = PrunerOptions(),  # noqa: B008 - frozen, immutable default
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune the dense W independently for each removal count, sharing the damped H, its inverse and G.

    Args:
        H: undamped ``sum X^T X``, (d_in, d_in).
        W: projection weight transposed, (d_in, d_out), any floating dtype.
        group_size: rows per group.
        num_remove_per_level: removal count of each level.
        options: pruner options.

    Returns:
        One ``(kept_groups, W_kept)`` per level, as :func:`prune_groups` returns them.
    """
    num_groups = _validate(H, W, group_size, num_remove_per_level)
    device = H.device
    prep = None
    results = []
    for num_remove in num_remove_per_level:
        if num_remove == 0:
            kept = torch.arange(num_groups, dtype=torch.int64, device=device)
            results.append((kept, W.to(device=device, dtype=torch.float32, copy=True)))
        elif num_remove == num_groups:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            results.append((empty, torch.zeros(0, W.shape[1], dtype=torch.float32, device=device)))
        elif not options.use_hessian:
            results.append(_prune_magnitude(W.to(device), group_size, num_remove, options.use_first_order))
        else:
            if prep is None:
                prep = _prepare(H, W, options.damp, options.solve_dtype, options.refit)
            kept = _select_mask(prep, group_size, num_remove, options)
            w_kept = _refit(prep, unit_rows(kept, group_size))
            results.append((kept, w_kept.to(torch.float32)))
    return results


def refit_kept_rows(
    H: torch.Tensor,
    W: torch.Tensor,
    kept_rows: torch.Tensor,
    damp: float,
    dtype: torch.dtype = _COMPUTE,
    refit: str = "zero",
) -> torch.Tensor:
    """Ridge-damped least-squares refit of the kept rows against the dense output ``X W``.

    Solves ``Hd[K, K] W_K = (H W)[K]`` (refit zero) or ``Hd[K, K] W_K = (Hd W)[K]`` (refit dense) with
    ``Hd = H + damp * mean(diag H) * I`` (dead diagonal set to 1). With ``damp = 0`` both are
    ``argmin ||X[:, K] W_K - X W||``.

    Args:
        H: undamped ``sum X^T X``, (d_in, d_in).
        W: dense weight transposed, (d_in, d_out).
        kept_rows: int64 row indices K.
        damp: relative ridge damping.
        dtype: dtype of the solve (float64 or float32).
        refit: ``zero`` or ``dense`` (see `PrunerOptions.refit`).

    Returns:
        ``W_K`` in `dtype`, (len(K), d_out), on ``H.device``.
    """
    if refit not in REFITS:
        raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {refit!r}")
    return _refit(_prepare(H, W, damp, dtype, refit), kept_rows.to(device=H.device, dtype=torch.int64))


def working_bytes(d_in: int, d_out: int, options: PrunerOptions) -> int:
    """Estimated peak bytes `prune_levels` holds on H's device for a (d_in, d_out) projection.

    Five (d_in, d_in) matrices (H in the solve dtype, the damped H, its inverse, one Cholesky factor, and the
    progressive rounds' downdate factor, which grows to at most d_in columns) and five (d_in, d_out) ones
    (W, G, Z, the compensated W and one level's refit), all in ``options.solve_dtype``. For the memory ledger of
    the supernet build (supernet/ledger.py), not an allocator measurement.
    """
    return (5 * d_in * d_in + 5 * d_in * d_out) * options.solve_dtype.itemsize


def _validate(H: torch.Tensor, W: torch.Tensor, group_size: int, counts: Sequence[int]) -> int:
    """Check shapes and counts; return the number of groups."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square 2-D, got shape {tuple(H.shape)}")
    if W.dim() != 2 or W.shape[0] != H.shape[0]:
        raise ValueError(f"W must be (d_in={H.shape[0]}, d_out), got shape {tuple(W.shape)}")
    if not H.is_floating_point() or not W.is_floating_point():
        raise ValueError("H and W must be floating point")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if H.shape[0] % group_size:
        raise ValueError(f"d_in={H.shape[0]} is not divisible by group_size={group_size}")
    num_groups = H.shape[0] // group_size
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= num_groups:
            raise ValueError(f"num_remove must be an int in [0, {num_groups}], got {n!r}")
    return num_groups


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a (batch of) SPD matrices, adding tiny jitter only if it fails."""
    factor, info = torch.linalg.cholesky_ex(a)
    if not bool((info != 0).any()):
        return factor
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
    for jitter in _JITTERS:
        factor, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if not bool((info != 0).any()):
            return factor
    raise ValueError("matrix is not positive definite even with jitter (non-finite H or W?)")


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``h + damp * mean(diag h) * I`` with the diagonal of dead inputs (diag h == 0) set to 1."""
    diag = h.diagonal()
    hd = h.clone()
    hd.diagonal().add_(damp * diag.mean())
    hd.diagonal()[diag == 0] = 1.0
    return hd


def _prepare(
    H: torch.Tensor, W: torch.Tensor, damp: float, dtype: torch.dtype = _COMPUTE, refit: str = "zero"
) -> _Prepared:
    """Compute the damped Hessian, its inverse, G and the dead-zeroed W in `dtype`."""
    h = H.to(dtype)
    dead = h.diagonal() == 0
    w = W.to(device=H.device, dtype=dtype).masked_fill(dead[:, None], 0.0)
    hd = _damped(h, damp)
    hinv = torch.cholesky_inverse(_cholesky(hd))
    return _Prepared(hd=hd, hinv=hinv, g=h @ w, w=w, refit=refit)


def _diag_blocks(hinv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks of Hinv per group: (d_in,) for group_size 1, else (groups, gs, gs)."""
    if group_size == 1:
        return hinv.diagonal().clone()
    num_groups = hinv.shape[0] // group_size
    blocks = hinv.view(num_groups, group_size, num_groups, group_size)
    return torch.diagonal(blocks, dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _group_scores(
    w: torch.Tensor, blocks: torch.Tensor, g: torch.Tensor, group_size: int, first_order: bool
) -> torch.Tensor:
    """``0.5 * tr(W_g^T (Hinv_gg)^-1 W_g) [+ sum(W_g * G_g)]`` for every current group."""
    num_groups = w.shape[0] // group_size
    if group_size == 1:
        scores = 0.5 * torch.linalg.vector_norm(w, dim=1).square() / blocks
    else:
        eye = torch.eye(group_size, dtype=w.dtype, device=w.device).expand_as(blocks)
        factor_inv = torch.linalg.solve_triangular(_cholesky(blocks), eye, upper=False)  # L_g^-1
        scores = 0.5 * (factor_inv @ w.view(num_groups, group_size, -1)).square().sum((1, 2))
    if first_order:
        scores = scores + (w * g).view(num_groups, -1).sum(1)
    return scores


def _split_lowest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local indices ``(drop, keep)``, both sorted: the k lowest scores (ties: lower index) and the rest."""
    drop = torch.sort(torch.sort(scores, stable=True).indices[:k]).values
    keep_mask = torch.ones_like(scores, dtype=torch.bool)
    keep_mask[drop] = False
    return drop, keep_mask.nonzero().squeeze(1)


def _downdate_blocks(blocks: torch.Tensor, t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Subtract the diagonal blocks of ``t^T t`` (t: (p, rows)) from the per-group blocks."""
    if group_size == 1:
        return blocks - t.square().sum(0)
    tg = t.view(t.shape[0], -1, group_size).transpose(0, 1)  # (groups, p, gs)
    return blocks - tg.transpose(1, 2) @ tg


class _ObsState:
    """Progressive OBS state over the current (remaining) rows, with the inverse Hessian kept lazily.

    The current inverse is ``Hinv[R, R] = hinv0[rows, rows] - ct @ ct.T``; only its diagonal blocks and the
    rows being removed are ever formed, which avoids the full ``|R|^2`` downdate each round.
    """

    def __init__(self, prep: _Prepared, group_size: int) -> None:
        self.hinv0 = prep.hinv
        self.group_size = group_size
        self.rows = torch.arange(prep.w.shape[0], dtype=torch.int64, device=prep.w.device)
        self.w, self.g = prep.w, prep.g
        self.blocks = _diag_blocks(prep.hinv, group_size)
        self.ct = prep.w.new_zeros(prep.w.shape[0], 0)

    def scores(self, first_order: bool) -> torch.Tensor:
        return _group_scores(self.w, self.blocks, self.g, self.group_size, first_order)

    def remove(self, drop: torch.Tensor, keep: torch.Tensor) -> None:
        """Remove local groups ``drop`` with OBS compensation of W and downdate of Hinv."""
        p_loc, q_loc = unit_rows(drop, self.group_size), unit_rows(keep, self.group_size)
        hinv_p = self.hinv0.index_select(0, self.rows.index_select(0, p_loc)).index_select(1, self.rows)
        hinv_p.addmm_(self.ct.index_select(0, p_loc), self.ct.T, alpha=-1.0)  # current Hinv[P, R]
        factor = _cholesky(hinv_p.index_select(1, p_loc))
        t = torch.linalg.solve_triangular(
            factor, hinv_p.index_select(1, q_loc), upper=False
        )  # L^-1 Hinv[P, Q]
        u = torch.linalg.solve_triangular(factor, self.w.index_select(0, p_loc), upper=False)  # L^-1 W[P]
        self.w = self.w.index_select(0, q_loc).addmm_(t.T, u, alpha=-1.0)
        self.blocks = _downdate_blocks(self.blocks.index_select(0, keep), t, self.group_size)
        self.ct = torch.cat([self.ct.index_select(0, q_loc), t.T], 1)
        self.rows, self.g = self.rows.index_select(0, q_loc), self.g.index_select(0, q_loc)


def _select_mask(prep: _Prepared, group_size: int, num_remove: int, options: PrunerOptions) -> torch.Tensor:
    """Progressive second-order mask selection; returns the sorted kept group indices."""
    state = _ObsState(prep, group_size)
    remaining = torch.arange(prep.w.shape[0] // group_size, dtype=torch.int64, device=prep.w.device)
    counts = split_rounds(num_remove, options.num_rounds)
    for i, k in enumerate(counts):
        drop, keep = _split_lowest(state.scores(options.use_first_order), k)
        remaining = remaining.index_select(0, keep)
        if i < len(counts) - 1:
            state.remove(drop, keep)
    return remaining


def _refit(prep: _Prepared, kept_rows: torch.Tensor) -> torch.Tensor:
    """Solve ``hd[K, K] W_K = target[K]`` (solve dtype), by the cheaper of a direct and a Schur-complement
    solve."""
    d_in, d_out = prep.g.shape
    k, n = kept_rows.numel(), d_in - kept_rows.numel()
    if n**3 / 3 + n * n * k + 2 * n * k * d_out < k**3 / 3 + 2 * k * k * d_out:
        return _refit_schur(prep, kept_rows)
    a = prep.hd.index_select(0, kept_rows).index_select(1, kept_rows)
    return torch.cholesky_solve(prep.target.index_select(0, kept_rows), _cholesky(a))


def _refit_schur(prep: _Prepared, kept_rows: torch.Tensor) -> torch.Tensor:
    """``W_K = Z_K - Hinv_KP Hinv_PP^-1 Z_P`` with ``Z = hd^-1 target``: equal to the direct solve, cheap when few
    rows are removed (it is the all-at-once OBS compensation of the dense ridge solution)."""
    keep_mask = torch.zeros(prep.g.shape[0], dtype=torch.bool, device=prep.g.device)
    keep_mask[kept_rows] = True
    drop_rows = (~keep_mask).nonzero().squeeze(1)
    hinv_p = prep.hinv.index_select(0, drop_rows)
    factor = _cholesky(hinv_p.index_select(1, drop_rows))
    t = torch.linalg.solve_triangular(factor, hinv_p.index_select(1, kept_rows), upper=False)
    v = torch.linalg.solve_triangular(factor, prep.z.index_select(0, drop_rows), upper=False)
    return torch.addmm(prep.z.index_select(0, kept_rows), t.T, v, alpha=-1.0)


def _prune_magnitude(
    W: torch.Tensor, group_size: int, num_remove: int, first_order: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian-free ablation (H = I): magnitude scores, no compensation, kept rows unchanged."""
    w = W.to(_COMPUTE)
    norms = w.square().view(w.shape[0] // group_size, -1).sum(1)
    scores = 0.5 * norms + norms if first_order else 0.5 * norms
    _, kept = _split_lowest(scores, num_remove)
    return kept, W.index_select(0, unit_rows(kept, group_size)).to(torch.float32)
