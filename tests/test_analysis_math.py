"""Known-answer tests for the stability-analysis maths in loopwm.analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopwm.analysis.agreement import agreement_score, prediction_depth, readout_errors
from loopwm.analysis.convergence import aposteriori_bound, contraction_ratios, relative_residuals
from loopwm.analysis.cycles import detect_period, lag_distances, recurrence_matrix, step_cosines
from loopwm.analysis.fit import fit_saturating
from loopwm.analysis.geometry import effective_rank, path_independence
from loopwm.analysis.jacobian import hutchinson_frobenius, spectral_norm, spectral_radius
from loopwm.analysis.rollout import lyapunov_rate
from loopwm.analysis.stats import auroc, rankdata, spearman, top_fraction


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _iterate(A: torch.Tensor, c: torch.Tensor, h0: torch.Tensor, loops: int) -> torch.Tensor:
    """States h_0..h_T of the affine loop h <- A h + c, `[T+1, B, d]`."""
    hs = [h0]
    for _ in range(loops):
        hs.append(hs[-1] @ A.T + c)
    return torch.stack(hs)


def _nonnormal(eigs: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    S = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return S @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ torch.linalg.inv(S)


def test_contraction_ratios_recover_kappa_of_scaled_orthogonal_map():
    kappa = 0.7
    A = kappa * _orthogonal(6, 0)
    h = _iterate(A, torch.ones(6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), 20)
    r = contraction_ratios(h)
    assert r.shape == (19, 4)
    torch.testing.assert_close(r, torch.full_like(r, kappa))


def test_contraction_ratios_approach_dominant_eigenvalue():
    A = torch.diag(torch.tensor([0.8, 0.4, -0.3, 0.1], dtype=torch.float64))
    h = _iterate(A, torch.zeros(4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 40)
    assert torch.allclose(contraction_ratios(h)[-1], torch.full((3,), 0.8, dtype=torch.float64), atol=1e-6)


def test_relative_residuals_and_ratios_on_hand_sequence():
    h = torch.tensor([1.0, 2.0, 4.0]).reshape(3, 1, 1)
    torch.testing.assert_close(relative_residuals(h), torch.tensor([[0.5], [0.5]]))
    torch.testing.assert_close(contraction_ratios(h), torch.tensor([[2.0]]))
    assert torch.isnan(contraction_ratios(torch.ones(3, 1, 2))).all()


def test_aposteriori_bound_is_tight_for_scalar_contraction_and_valid_in_general():
    kappa = 0.6
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    h = _iterate(kappa * torch.eye(3, dtype=torch.float64), c, torch.randn(5, 3, dtype=torch.float64), 15)
    bound, dist = aposteriori_bound(h, kappa, c / (1 - kappa))
    torch.testing.assert_close(bound, dist)
    A = _orthogonal(3, 1) @ torch.diag(torch.tensor([kappa, 0.3, -0.2], dtype=torch.float64)) @ _orthogonal(3, 2)
    h = _iterate(A, c, torch.randn(5, 3, dtype=torch.float64), 15)
    h_star = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - A, c).expand(5, 3)
    bound, dist = aposteriori_bound(h, kappa, h_star)
    assert (bound >= dist - 1e-12).all()
    with pytest.raises(ValueError):
        aposteriori_bound(h, 1.0, h_star)


def test_power_iteration_matches_linear_map_norm_and_radius():
    torch.manual_seed(0)
    A = _nonnormal([0.8, 0.5, -0.3, 0.2, 0.1], seed=3)
    f = lambda h: h @ A.T + 1.0  # noqa: E731
    h = torch.randn(4, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sigma = spectral_norm(f, h, iters=100, generator=g)
    torch.testing.assert_close(sigma, torch.full((4,), float(torch.linalg.matrix_norm(A, 2)), dtype=torch.float64))
    rho = spectral_radius(f, h, iters=80, generator=g)
    torch.testing.assert_close(rho, torch.full((4,), 0.8, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_spectral_radius_of_rotation_pair():
    theta, r = 1.0, 0.9
    block = r * torch.tensor(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64
    )
    D = torch.block_diag(block, torch.diag(torch.tensor([0.3, -0.2], dtype=torch.float64)))
    S = torch.eye(4, dtype=torch.float64) + 0.2 * torch.randn(
        4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    A = S @ D @ torch.linalg.inv(S)
    rho = spectral_radius(
        lambda h: h @ A.T, torch.randn(3, 4, dtype=torch.float64), iters=200, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(rho, torch.full((3,), r, dtype=torch.float64), rtol=0.02, atol=0.0)


def test_jacobian_estimates_of_elementwise_map_are_per_sample():
    a = torch.tensor([0.5, -1.5, 1.0, 0.2], dtype=torch.float64)
    f = lambda h: a * torch.tanh(h)  # noqa: E731
    h = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = a * (1 - torch.tanh(h) ** 2)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(spectral_norm(f, h, iters=200, generator=g), J.abs().amax(-1), rtol=1e-4, atol=0)
    torch.testing.assert_close(hutchinson_frobenius(f, h, probes=3, generator=g), J.pow(2).mean(-1))


def test_hutchinson_matches_frobenius_of_dense_map():
    W = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) / 3
    est = hutchinson_frobenius(
        lambda h: h @ W.T,
        torch.zeros(64, 8, dtype=torch.float64),
        probes=32,
        generator=torch.Generator().manual_seed(0),
    )
    assert est.mean().item() == pytest.approx((W**2).sum().item() / 8, rel=0.05)


def test_period_detection_fixed_point_two_and_three_cycles():
    h0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    c = torch.tensor([0.3, -0.1, 1.0, 0.5], dtype=torch.float64)
    flip = _iterate(torch.diag(torch.tensor([-1.0, -1.0, 0.5, 0.5], dtype=torch.float64)), c, h0, 60)
    assert detect_period(flip).tolist() == [2, 2, 2]
    torch.testing.assert_close(step_cosines(flip)[-1], torch.full((3,), -1.0, dtype=torch.float64))
    contract = _iterate(0.5 * _orthogonal(4, 6), c, h0, 60)
    assert detect_period(contract).tolist() == [1, 1, 1]
    third = 2 * math.pi / 3
    rot = torch.block_diag(
        torch.tensor([[math.cos(third), -math.sin(third)], [math.sin(third), math.cos(third)]], dtype=torch.float64),
        torch.eye(2, dtype=torch.float64),
    )
    assert detect_period(_iterate(rot, torch.zeros(4, dtype=torch.float64), h0, 30)).tolist() == [3, 3, 3]
    drift = _iterate(torch.eye(4, dtype=torch.float64), c, h0, 30)
    assert detect_period(drift).tolist() == [0, 0, 0]
    lags = lag_distances(flip, 4)
    assert lags.shape == (4, 3) and (lags[1] < 1e-9).all() and (lags[0] > 0.1).all()


def test_recurrence_matrix_is_symmetric_distance_matrix():
    h = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1)
    torch.testing.assert_close(recurrence_matrix(h)[0], torch.tensor([[0.0, 1, 3], [1, 0, 2], [3, 2, 0]]))


def test_prediction_depth_and_agreement_on_constructed_readouts():
    final = torch.tensor([1.0, 2.0, 3.0])
    r = final.repeat(5, 1).clone()
    r[:2, 1] += 1.0  # sample 1 settles at loop 3
    r[3, 2] -= 1.0  # sample 2 agrees early, strays at loop 4, settles at loop 5
    r[1, 2] += 0.05  # within tolerance: does not count
    readouts = r.unsqueeze(-1)
    assert prediction_depth(readouts, delta=0.1).tolist() == [1, 3, 5]
    torch.testing.assert_close(agreement_score(readouts), torch.tensor([0.0, -0.5, -0.2625]))
    torch.testing.assert_close(agreement_score(readouts, last=1), torch.tensor([0.0, 0.0, -1.0]))
    truth = torch.tensor([[1.0], [2.0], [2.0]])
    torch.testing.assert_close(readout_errors(readouts, truth)[-1], torch.tensor([0.0, 0.0, 1.0]))


def test_auroc_known_values_and_ties():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_rankdata_and_spearman_known_values():
    np.testing.assert_allclose(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman(torch.tensor([3.0, 1.0, 2.0]), np.array([30, 10, 20])) == pytest.approx(1.0)


def test_top_fraction_marks_largest():
    assert top_fraction([0.1, 5.0, 0.3, 2.0, 0.2, 0.0, 0.4, 0.5, 0.6, 0.7], 0.2).nonzero()[0].tolist() == [1, 3]


def test_ties_and_non_finite_values_never_decide_a_statistic_by_position():
    tied = [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the top 10% is a three-way tie
    assert top_fraction(tied, 0.1).tolist() == [True] * 3 + [False] * 7
    assert top_fraction([1.0] * 10, 0.1).all()  # all equal: no sample is worse than another
    assert math.isnan(auroc(np.arange(10.0), top_fraction([1.0] * 10, 0.1)))
    assert top_fraction([0.0, float("nan"), 1.0, 0.5], 0.25).tolist() == [False, True, False, False]
    assert math.isnan(spearman([np.nan, np.nan, np.nan], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, np.nan], [1, 2, 3]))
    assert math.isnan(auroc([np.nan, 1, 2, 3], [1, 0, 1, 0]))


def test_saturating_fit_recovers_parameters():
    T = np.arange(1, 13)
    fit = fit_saturating(T, 0.1 + 2.0 * np.exp(-T / 1.5))
    assert fit.tau == pytest.approx(1.5, rel=0.02)
    assert fit.a == pytest.approx(0.1, abs=0.01)
    assert fit.b == pytest.approx(2.0, rel=0.03)
    assert fit.best_T == 12 and not fit.regresses
    np.testing.assert_allclose(fit.predict(T), 0.1 + 2.0 * np.exp(-T / 1.5), atol=0.01)


def test_saturating_fit_flags_regression_past_best_loop_count():
    T = [4, 1, 2, 3, 5, 6]
    err = [0.6, 1.0, 0.5, 0.4, 0.7, 0.9]
    fit = fit_saturating(T, err)
    assert fit.best_T == 3 and fit.best_err == pytest.approx(0.4)
    assert fit.regression == pytest.approx(0.5) and fit.regresses


def test_effective_rank_of_equal_singular_values():
    d, k = 12, 4
    U, V = _orthogonal(d, 7)[:, :k], _orthogonal(d, 8)[:, :k]
    assert effective_rank(3.0 * U @ V.T) == pytest.approx(k, rel=1e-9)
    assert effective_rank(torch.zeros(5, 3)) == 0.0
    x = torch.randn(50, 1, dtype=torch.float64) @ torch.ones(1, 6, dtype=torch.float64) + 5.0
    assert effective_rank(x, center=True) == pytest.approx(1.0, rel=1e-6)


def test_path_independence_known_spread():
    same = torch.randn(1, 2, 4).expand(5, 2, 4)
    spread = path_independence(same)
    assert torch.allclose(spread.pairwise, torch.zeros(2)) and torch.allclose(spread.centroid, torch.zeros(2))
    opposite = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    spread = path_independence(opposite)
    torch.testing.assert_close(spread.pairwise, torch.tensor([2.0]))
    torch.testing.assert_close(spread.centroid, torch.tensor([1.0]))


def test_lyapunov_rate_of_linear_contraction_is_log_kappa():
    kappa = 0.8
    A = kappa * _orthogonal(5, 9)
    h0 = torch.randn(3, 5, dtype=torch.float64)
    c = torch.ones(5, dtype=torch.float64)
    a = _iterate(A, c, h0, 50)
    b = _iterate(A, c, h0 + 1e-3, 50)
    torch.testing.assert_close(lyapunov_rate(a, b), torch.full((3,), math.log(kappa), dtype=torch.float32))
    same = lyapunov_rate(a, a.clone())
    assert torch.isnan(same).all()


def test_contraction_ratios_floor_masks_rounding_noise():
    h = torch.tensor([1.0, 2.0, 2.0 + 1e-9, 2.0], dtype=torch.float64).reshape(4, 1, 1)
    assert contraction_ratios(h).isfinite().all()
    r = contraction_ratios(h, floor=1e-6)
    assert r[0].isfinite().all() and r[1].isnan().all()


def test_step_cosines_floor_masks_converged_loops():
    h = torch.tensor([0.0, 1.0, 1.5, 1.5, 1.5], dtype=torch.float64).reshape(5, 1, 1)
    cos = step_cosines(h, floor=1e-9)
    assert cos[0].item() == pytest.approx(1.0) and cos[1:].isnan().all()


def test_lyapunov_rate_fits_only_inside_the_window():
    t = torch.arange(30, dtype=torch.float64)
    delta = (1e-3 * 2.0**t).clamp_max(1.0)
    a = torch.zeros(30, 1, 1, dtype=torch.float64)
    b = delta.reshape(30, 1, 1)
    assert lyapunov_rate(a, b, ceiling=0.5).item() == pytest.approx(math.log(2.0), rel=1e-5)
    assert lyapunov_rate(a, b).item() < 0.9 * math.log(2.0)
