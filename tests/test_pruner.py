"""Tests of the local pruner against brute-force least squares and a literal full-matrix reference."""

from __future__ import annotations

import pytest
import torch

from tyr.supernet.pruner import (
    PrunerOptions,
    accumulate_hessian,
    prune_groups,
    prune_levels,
    refit_kept_rows,
    split_rounds,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The problems here are tiny: thread start-up and contention would dominate, so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(
    seed: int, tokens: int = 200, d_in: int = 24, d_out: int = 7, correlated: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 inputs X (tokens, d_in) with correlated, unevenly scaled columns, and W (d_in, d_out)."""
    gen = _gen(seed)
    X = torch.randn(tokens, d_in, generator=gen, dtype=F64)
    if correlated:
        mix = torch.eye(d_in, dtype=F64) + 0.6 * torch.randn(d_in, d_in, generator=gen, dtype=F64)
        scale = torch.exp(torch.randn(d_in, generator=gen, dtype=F64))
        X = (X @ mix) * scale
    W = torch.randn(d_in, d_out, generator=gen, dtype=F64)
    return X, W


def _rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def _recon_error(X: torch.Tensor, W: torch.Tensor, rows: torch.Tensor, W_kept: torch.Tensor) -> float:
    return float((X @ W - X[:, rows] @ W_kept.to(F64)).square().sum())


def _lstsq(X: torch.Tensor, W: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(X[:, rows], X @ W).solution


def _reference(
    H: torch.Tensor, W: torch.Tensor, group_size: int, num_remove: int, options: PrunerOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm exactly as specified, on full matrices with explicit inverses (slow, small sizes only)."""
    h, w = H.to(F64), W.to(F64).clone()
    d_in = h.shape[0]
    dead = h.diagonal() == 0
    w[dead] = 0
    g = h @ w
    hd = h + options.damp * h.diagonal().mean() * torch.eye(d_in, dtype=F64)
    hd[dead, dead] = 1.0
    hinv = torch.linalg.inv(hd)
    remaining = list(range(d_in // group_size))
    for k in split_rounds(num_remove, options.num_rounds):
        scores = []
        for grp in remaining:
            idx = torch.arange(grp * group_size, (grp + 1) * group_size)
            wg, block = w[idx], hinv[idx][:, idx]
            score = 0.5 * torch.trace(wg.T @ torch.linalg.inv(block) @ wg)
            if options.use_first_order:
                score = score + (wg * g[idx]).sum()
            scores.append(float(score))
        order = sorted(range(len(remaining)), key=lambda i: (scores[i], remaining[i]))
        removed = sorted(remaining[i] for i in order[:k])
        remaining = [grp for grp in remaining if grp not in removed]
        P = _rows(torch.tensor(removed), group_size)
        inv_pp = torch.linalg.inv(hinv[P][:, P])
        w = w - hinv[:, P] @ inv_pp @ w[P]
        hinv = hinv - hinv[:, P] @ inv_pp @ hinv[P, :]
        w[P] = 0
    kept = torch.tensor(remaining, dtype=torch.int64)
    K = _rows(kept, group_size)
    return kept, torch.linalg.solve(hd[K][:, K], g[K])


def test_split_rounds() -> None:
    assert split_rounds(10, 4) == [3, 3, 2, 2]
    assert split_rounds(3, 16) == [1, 1, 1]
    assert split_rounds(5, None) == [1] * 5
    assert split_rounds(0, 4) == []


def test_accumulate_hessian_matches_xtx() -> None:
    X, _ = _problem(0)
    H = accumulate_hessian(None, X[:120].reshape(4, 30, -1).to(torch.bfloat16))
    H = accumulate_hessian(H, X[120:].to(torch.float16))
    assert H.dtype == torch.float32 and H.shape == (24, 24)
    ref = X[:120].to(torch.bfloat16).to(F64).T @ X[:120].to(torch.bfloat16).to(F64)
    ref += X[120:].to(torch.float16).to(F64).T @ X[120:].to(torch.float16).to(F64)
    torch.testing.assert_close(H.to(F64), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("num_kept", [3, 12, 21])  # both refit paths (direct and Schur complement)
def test_refit_equals_lstsq_and_ridge(num_kept: int) -> None:
    X, W = _problem(1)
    H = X.T @ X
    K = torch.sort(torch.randperm(24, generator=_gen(2))[:num_kept]).values
    torch.testing.assert_close(refit_kept_rows(H, W, K, damp=0.0), _lstsq(X, W, K), rtol=1e-9, atol=1e-9)
    damp = 0.05
    lam = damp * H.diagonal().mean()
    ridge = torch.linalg.solve(H[K][:, K] + lam * torch.eye(num_kept, dtype=F64), (H @ W)[K])
    torch.testing.assert_close(refit_kept_rows(H, W, K, damp=damp), ridge, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_kept", [3, 12, 21, 24])  # direct and Schur paths, and nothing removed
def test_dense_refit_is_ridge_toward_the_dense_weights(num_kept: int) -> None:
    """refit dense = argmin ||X_K W_K - X W||^2 + lam ||W_K - W[K]||^2, by brute-force least squares on the
    augmented system [X_K; sqrt(lam) I] W_K = [X W; sqrt(lam) W[K]]."""
    X, W = _problem(3)
    H = X.T @ X
    K = torch.sort(torch.randperm(24, generator=_gen(4))[:num_kept]).values
    damp = 0.05
    lam = damp * H.diagonal().mean()
    a = torch.cat([X[:, K], lam.sqrt() * torch.eye(num_kept, dtype=F64)])
    b = torch.cat([X @ W, lam.sqrt() * W[K]])
    brute = torch.linalg.lstsq(a, b).solution
    dense = refit_kept_rows(H, W, K, damp=damp, refit="dense")
    torch.testing.assert_close(dense, brute, rtol=1e-8, atol=1e-8)
    if num_kept == 24:  # nothing removed: the dense weights themselves
        torch.testing.assert_close(dense, W, rtol=0, atol=1e-12)
    else:  # the two forms differ when rows are removed
        assert not torch.allclose(dense, refit_kept_rows(H, W, K, damp=damp))
    # with no damping both forms are plain least squares
    torch.testing.assert_close(
        refit_kept_rows(H, W, K, damp=0.0, refit="dense"), _lstsq(X, W, K), rtol=1e-9, atol=1e-9
    )


def test_prune_levels_dense_refit_keeps_the_mask_and_refits_toward_w() -> None:
    """The refit target does not change which units are removed, only the kept rows' weights."""
    X, W = _problem(5)
    H = X.T @ X
    zero = prune_levels(H, W, 4, [1, 3], PrunerOptions(num_rounds=2))
    dense = prune_levels(H, W, 4, [1, 3], PrunerOptions(num_rounds=2, refit="dense"))
    for (kz, wz), (kd, wd) in zip(zero, dense, strict=True):
        assert torch.equal(kz, kd)
        ref = refit_kept_rows(H, W, _rows(kd, 4), damp=0.01, refit="dense")
        torch.testing.assert_close(wd.to(F64), ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(wz, wd)
    with pytest.raises(ValueError, match="refit must be one of"):
        PrunerOptions(refit="ones")


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("num_rounds", [None, 3])
def test_prune_groups_refit_is_least_squares(group_size: int, num_rounds: int | None) -> None:
    X, W = _problem(3)
    num_groups = 24 // group_size
    for num_remove in range(1, num_groups):
        kept, W_kept = prune_groups(
            X.T @ X, W, group_size, num_remove, PrunerOptions(0.0, num_rounds=num_rounds)
        )
        assert kept.dtype == torch.int64 and W_kept.dtype == torch.float32
        assert kept.tolist() == sorted(kept.tolist()) and kept.numel() == num_groups - num_remove
        rows = _rows(kept, group_size)
        assert W_kept.shape == (rows.numel(), 7)
        torch.testing.assert_close(W_kept.to(F64), _lstsq(X, W, rows), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize(
    "options",
    [
        PrunerOptions(),
        PrunerOptions(damp=0.0, num_rounds=4),
        PrunerOptions(use_first_order=False, num_rounds=2),
        PrunerOptions(damp=0.1, use_first_order=False),
    ],
)
def test_matches_literal_reference(group_size: int, options: PrunerOptions) -> None:
    X, W = _problem(4)
    X[:, 5] = 0  # one dead input
    H = X.T @ X
    for num_remove in (1, 3, 5, 7):
        kept, W_kept = prune_groups(H, W, group_size, num_remove, options)
        ref_kept, ref_W = _reference(H, W, group_size, num_remove, options)
        assert kept.tolist() == ref_kept.tolist()
        torch.testing.assert_close(W_kept.to(F64), ref_W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 4])
def test_error_non_decreasing_with_num_remove(group_size: int) -> None:
    X, W = _problem(5)
    counts = list(range(24 // group_size + 1))
    results = prune_levels(X.T @ X, W, group_size, counts, PrunerOptions(damp=0.0))
    errors = [_recon_error(X, W, _rows(kept, group_size), W_kept) for kept, W_kept in results]
    assert errors[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b >= a - 1e-6 * (1 + a) for a, b in zip(errors, errors[1:]))


def test_obs_mask_beats_magnitude_mask_on_average() -> None:
    obs_total = magnitude_total = 0.0
    for seed in range(20):
        X, W = _problem(100 + seed)
        H = X.T @ X
        kept, W_kept = prune_groups(H, W, 1, 12, PrunerOptions(damp=0.01, num_rounds=4))
        obs_total += _recon_error(X, W, kept, W_kept)
        mag_kept, _ = prune_groups(H, W, 1, 12, PrunerOptions(use_hessian=False))
        mag_W = refit_kept_rows(H, W, mag_kept, damp=0.01)
        magnitude_total += _recon_error(X, W, mag_kept, mag_W)
    assert obs_total < magnitude_total


def test_num_remove_zero_returns_dense_exactly() -> None:
    X, W = _problem(6)
    W16 = W.to(torch.bfloat16)
    kept, W_kept = prune_groups(accumulate_hessian(None, X), W16, 4, 0)
    assert kept.tolist() == list(range(6))
    assert torch.equal(W_kept, W16.to(torch.float32))
    assert W_kept.data_ptr() != W16.data_ptr()


def test_num_remove_all_returns_empty() -> None:
    X, W = _problem(7)
    kept, W_kept = prune_groups(X.T @ X, W, 4, 6)
    assert kept.shape == (0,) and kept.dtype == torch.int64
    assert W_kept.shape == (0, 7) and W_kept.dtype == torch.float32


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_dead_inputs_no_nan(damp: float) -> None:
    X, W = _problem(8)
    X[:, [0, 1, 2, 3, 9]] = 0  # a whole dead head (group 0) and a dead channel
    H = X.T @ X
    for group_size in (1, 4):
        for kept, W_kept in prune_levels(H, W, group_size, [1, 2, 3], PrunerOptions(damp=damp, num_rounds=2)):
            assert torch.isfinite(W_kept).all()
            rows = _rows(kept, group_size)
            # Dead kept rows contribute nothing: their refitted weights are zero.
            dead = (rows[:, None] == torch.tensor([0, 1, 2, 3, 9])).any(1)
            assert torch.equal(W_kept[dead], torch.zeros_like(W_kept[dead]))
    kept, _ = prune_groups(H, W, 4, 1)
    assert 0 not in kept.tolist()  # the dead head costs nothing to remove


def test_rank_deficient_without_damping_is_finite() -> None:
    X, W = _problem(
        12, tokens=10
    )  # fewer tokens than inputs: H is singular, damp=0 needs the jitter fallback
    dense = float((X @ W).square().sum())
    for kept, W_kept in prune_levels(X.T @ X, W, 1, [4, 12, 20], PrunerOptions(damp=0.0, num_rounds=3)):
        assert torch.isfinite(W_kept).all()
        if kept.numel() >= 10:  # the kept columns still span X's 10-dim column space: exact reconstruction
            assert _recon_error(X, W, kept, W_kept) < 1e-6 * dense


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    X, W = _problem(9, correlated=False)
    H = accumulate_hessian(None, X.to(dtype))
    kept, W_kept = prune_groups(H, W.to(dtype), 4, 2, PrunerOptions(num_rounds=2))
    assert kept.numel() == 4 and W_kept.dtype == torch.float32 and torch.isfinite(W_kept).all()
    ref = refit_kept_rows(H, W.to(dtype), _rows(kept, 4), damp=0.01)
    torch.testing.assert_close(W_kept, ref.to(torch.float32), rtol=1e-5, atol=1e-5)


def test_without_hessian_keeps_rows_unchanged() -> None:
    X, W = _problem(10)
    for group_size in (1, 4):
        for first_order in (True, False):
            options = PrunerOptions(use_hessian=False, use_first_order=first_order, num_rounds=2)
            kept, W_kept = prune_groups(X.T @ X, W, group_size, 3, options)
            rows = _rows(kept, group_size)
            assert torch.equal(W_kept, W[rows].to(torch.float32))
            norms = W.square().view(24 // group_size, -1).sum(1)
            assert kept.tolist() == sorted(torch.sort(norms, stable=True).indices[3:].tolist())


@pytest.mark.parametrize("group_size", [1, 4])
def test_prune_levels_equals_separate_calls(group_size: int) -> None:
    X, W = _problem(11)
    H = accumulate_hessian(None, X)
    options = PrunerOptions(num_rounds=3)
    counts = [0, 1, 3, 5, 24 // group_size]
    for (kept, W_kept), n in zip(prune_levels(H, W, group_size, counts, options), counts):
        ref_kept, ref_W = prune_groups(H, W, group_size, n, options)
        assert torch.equal(kept, ref_kept)
        torch.testing.assert_close(W_kept, ref_W, rtol=1e-6, atol=1e-7)


def test_ties_remove_lower_index_first() -> None:
    W = torch.ones(6, 2)
    kept, _ = prune_groups(torch.eye(6), W, 1, 2, PrunerOptions(damp=0.0))
    assert kept.tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(
    ("H", "W", "group_size", "num_remove"),
    [
        (torch.eye(6), torch.ones(6, 2), 4, 1),  # d_in not divisible
        (torch.eye(6), torch.ones(6, 2), 1, -1),
        (torch.eye(6), torch.ones(6, 2), 2, 4),  # more than num_groups
        (torch.eye(6), torch.ones(5, 2), 1, 1),  # shape mismatch
        (torch.ones(6, 5), torch.ones(6, 2), 1, 1),  # H not square
        (torch.eye(6), torch.ones(6), 1, 1),  # W not 2-D
        (torch.eye(6), torch.ones(6, 2), 0, 1),  # group_size 0
    ],
)
def test_invalid_arguments(H: torch.Tensor, W: torch.Tensor, group_size: int, num_remove: int) -> None:
    with pytest.raises(ValueError):
        prune_groups(H, W, group_size, num_remove)


def test_invalid_options_and_hessian() -> None:
    with pytest.raises(ValueError):
        PrunerOptions(damp=-0.1)
    with pytest.raises(ValueError):
        PrunerOptions(num_rounds=0)
    with pytest.raises(ValueError):
        PrunerOptions(solve_dtype=torch.float16)
    with pytest.raises(ValueError):
        accumulate_hessian(torch.zeros(3, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        prune_levels(torch.eye(4), torch.ones(4, 2), 1, [1, 5])


@pytest.mark.parametrize("group_size", [1, 4])
def test_float32_solves_match_float64(group_size: int) -> None:
    """The float32 solve path (PrunerOptions.solve_dtype) on a well-conditioned problem: the same mask, and
    the refit in float32 within 1e-4 of the float64 one (the builder's test repeats this on tiny models)."""
    X, W = _problem(12, tokens=400)
    H = accumulate_hessian(None, X)
    counts = [1, 2, 24 // group_size - 1]
    ref = prune_levels(H, W, group_size, counts, PrunerOptions(num_rounds=2))
    fast = prune_levels(H, W, group_size, counts, PrunerOptions(num_rounds=2, solve_dtype=torch.float32))
    for (kept, W_kept), (kept32, W_kept32) in zip(ref, fast, strict=True):
        assert torch.equal(kept, kept32)
        assert float((W_kept - W_kept32).norm() / W_kept.norm()) <= 1e-4
    rows = _rows(ref[0][0], group_size)
    assert refit_kept_rows(H, W, rows, 0.01, dtype=torch.float32).dtype == torch.float32
