"""models.ot.transport against POT's entropic Gromov-Wasserstein solvers on small dense problems.

The problems are of the kind POT's own entropic GW / FGW tests use (a 2D Gaussian sample matched with its
reversed copy, distance matrices scaled to a maximum of 1; asymmetric random structures matched with a
permutation of themselves) and the tolerances are POT's: plans within 1e-6 of POT's, values within 1e-6,
marginals within 1e-4 (1e-2 for one proximal iteration). Every case also asks that our plan be at least
as close as POT's to the iterates of exact projections (the same outer steps, Sinkhorn run to 1e-15) at the
same budget; those exact iterates come from POT's gradient of the linearised objective and a Newton solve
of each projection's dual (Sinkhorn itself needs over 10^5 iterations on these problems at epsilon 1e-2).
Square loss only: models.ot.transport has no KL loss.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.special import logsumexp

from models.ot.transport import fused_gromov_wasserstein

torch.set_num_threads(1)
F64 = torch.float64
OUTER = 10
INNER = 1000  # POT's default numItermax of the inner Sinkhorn


def gaussian_pair(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point cloud, its reversed copy, and a node cost between random labels (and theirs reversed)."""
    xs = ot.datasets.make_2D_samples_gauss(n, np.array([0.0, 0.0]), np.eye(2), random_state=42)
    xt = xs[::-1].copy()
    c1, c2 = ot.dist(xs, xs), ot.dist(xt, xt)
    ys = np.random.RandomState(42).randn(n, 2)
    return c1 / c1.max(), c2 / c2.max(), ot.dist(ys, ys[::-1].copy())


def asymmetric_pair(n: int, high: float) -> tuple[np.ndarray, np.ndarray]:
    """A random non-symmetric structure in [0, high) and the same one with its nodes permuted."""
    rng = np.random.RandomState(0)
    c1 = rng.uniform(0.0, high, size=(n, n))
    perm = rng.permutation(n)
    return c1, c1[perm][:, perm]


def batch(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(np.ascontiguousarray(x), dtype=F64)[None] for x in arrays]


def exact_projection(log_k: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The entropic projection diag(e^f) exp(log_k) diag(e^g) with marginals a, b, to round-off: Sinkhorn
    to get close, then Newton steps on the convex dual sum exp(log_k + f + g) - <f, a> - <g, b> (gauge
    g_last = 0), each with a backtracking line search."""
    n, m = log_k.shape
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(200):
        g = np.log(b) - logsumexp(log_k + f[:, None], axis=0)
        f = np.log(a) - logsumexp(log_k + g[None, :], axis=1)
    g, f = g - g[-1], f + g[-1]

    def dual(f_: np.ndarray, g_: np.ndarray) -> float:
        return float(np.exp(log_k + f_[:, None] + g_[None, :]).sum() - f_ @ a - g_ @ b)

    for _ in range(100):
        plan = np.exp(log_k + f[:, None] + g[None, :])
        grad = np.concatenate([plan.sum(1) - a, plan.sum(0)[:-1] - b[:-1]])
        if np.abs(grad).sum() < 1e-15:
            break
        hess = np.block([[np.diag(plan.sum(1)), plan[:, :-1]], [plan[:, :-1].T, np.diag(plan.sum(0)[:-1])]])
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        t, start = 1.0, dual(f, g)
        while t > 1e-12:
            f_new, g_new = f + t * step[:n], np.concatenate([g[:-1] + t * step[n:], [0.0]])
            if dual(f_new, g_new) <= start:
                break
            t /= 2
        f, g = f_new, g_new
    return np.exp(log_k + f[:, None] + g[None, :])


def exact_iterates(m, c1, c2, alpha, epsilon, solver="PGD", outer=OUTER, symmetric=True) -> torch.Tensor:
    """POT's outer steps (linearised cost from POT's own gradient) with exact projections: the plan."""
    n, k = c1.shape[0], c2.shape[0]
    a, b = ot.unif(n), ot.unif(k)
    m = np.zeros((n, k)) if m is None else m
    plan = np.outer(a, b)
    parts = [ot.gromov.init_matrix(c1, c2, a, b, "square_loss")]
    if not symmetric:
        parts.append(ot.gromov.init_matrix(c1.T, c2.T, a, b, "square_loss"))
    for _ in range(outer):
        gw_grad = sum(ot.gromov.gwggrad(*part, plan) for part in parts) / len(parts)
        cost = (1 - alpha) * m + alpha * gw_grad
        if solver == "PPA":
            with np.errstate(divide="ignore"):  # entries that underflowed stay 0, as in POT
                cost = cost - epsilon * np.log(plan)
        plan = exact_projection(-cost / epsilon, a, b)
    return torch.tensor(plan)


def pot_fgw(m, c1, c2, alpha, epsilon, solver="PGD", outer=OUTER, inner=INNER, stop=1e-9, symmetric=None):
    """POT's plan and FGW value (alpha=1: plain entropic GW, through POT's GW entry points)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge" at small budgets
        kw = {"epsilon": epsilon, "max_iter": outer, "solver": solver, "numItermax": inner, "stopThr": stop}
        if alpha == 1:
            plan = ot.gromov.entropic_gromov_wasserstein(c1, c2, symmetric=symmetric, **kw)
            value = ot.gromov.entropic_gromov_wasserstein2(c1, c2, symmetric=symmetric, **kw)
        else:
            plan = ot.gromov.entropic_fused_gromov_wasserstein(
                m, c1, c2, alpha=alpha, symmetric=symmetric, **kw
            )
            value = ot.gromov.entropic_fused_gromov_wasserstein2(
                m, c1, c2, alpha=alpha, symmetric=symmetric, **kw
            )
    return torch.tensor(plan), float(value)


def ours(m, c1, c2, alpha, epsilon, solver="pgd", inner=INNER, **kw):
    cost, sa, sb = batch(m, c1, c2)
    return fused_gromov_wasserstein(
        cost, sa, sb, alpha=alpha, epsilon=epsilon, outer_iter=OUTER, inner_iter=inner, solver=solver,
        check_convergence=False, **kw,
    )  # fmt: skip


def check_against_pot(m, c1, c2, alpha, epsilon, solver="PGD", symmetric=None) -> None:
    ref_plan, ref_value = pot_fgw(m, c1, c2, alpha, epsilon, solver, symmetric=symmetric)
    exact_plan = exact_iterates(m, c1, c2, alpha, epsilon, solver, symmetric=symmetric is not False)
    res = ours(m, c1, c2, alpha, epsilon, solver.lower())
    plan = res.plan[0]
    n, k = plan.shape
    np.testing.assert_allclose(plan.numpy(), ref_plan.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(res.transport_cost[0]), ref_value, atol=1e-6, rtol=0)
    np.testing.assert_allclose(plan.sum(1).numpy(), np.full(n, 1 / n), atol=1e-4)
    np.testing.assert_allclose(plan.sum(0).numpy(), np.full(k, 1 / k), atol=1e-4)
    # at least as accurate as POT at the same budget (1e-12: both at round-off)
    ours_error = float((plan - exact_plan).abs().max())
    pot_error = float((ref_plan - exact_plan).abs().max())
    assert ours_error <= max(pot_error, 1e-12), (ours_error, pot_error)


@pytest.mark.parametrize("epsilon", [1e-1, 1e-2, 1e-3])
def test_entropic_gw_matches_pot_at_every_epsilon(epsilon):
    c1, c2, _ = gaussian_pair(10)
    check_against_pot(np.zeros((10, 10)), c1, c2, 1.0, epsilon)


@pytest.mark.parametrize("epsilon", [1e-1, 1e-2, 1e-3])
def test_entropic_gw_value_matches_pot_and_is_near_zero(epsilon):
    # the reversed copy is isometric: GW is 0, and the entropic plan nearly reaches it
    c1, c2, _ = gaussian_pair(10)
    _, ref_value = pot_fgw(None, c1, c2, 1.0, epsilon)
    value = float(ours(np.zeros((10, 10)), c1, c2, 1.0, epsilon).transport_cost[0])
    np.testing.assert_allclose(value, ref_value, atol=1e-6, rtol=0)
    np.testing.assert_allclose(value, 0, atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize(("epsilon", "high"), [(1e-1, 10.0), (1e-2, 1.0), (1e-3, 1.0)])
def test_asymmetric_entropic_gw_matches_pot(epsilon, high):
    c1, c2 = asymmetric_pair(10, high)
    check_against_pot(np.zeros((10, 10)), c1, c2, 1.0, epsilon, symmetric=False)
    res = ours(np.zeros((10, 10)), c1, c2, 1.0, epsilon)  # symmetric=None detects the asymmetry
    ref, _ = pot_fgw(None, c1, c2, 1.0, epsilon, symmetric=False)
    np.testing.assert_allclose(res.plan[0].numpy(), ref.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("epsilon", [1e-1, 1e-2, 1e-3])
def test_entropic_fgw_matches_pot(alpha, epsilon):
    c1, c2, m = gaussian_pair(5)
    check_against_pot(m, c1, c2, alpha, epsilon)


@pytest.mark.parametrize(("alpha", "epsilon"), [(1.0, 1e-1), (1.0, 1e-2), (0.5, 1e-1), (0.5, 1e-2)])
def test_proximal_solver_matches_pot(alpha, epsilon):
    c1, c2, m = gaussian_pair(10 if alpha == 1 else 5)
    check_against_pot(m, c1, c2, alpha, epsilon, solver="PPA")


@pytest.mark.parametrize(("alpha", "n"), [(1.0, 10), (0.5, 5)])
def test_one_proximal_iteration_is_one_pot_iteration(alpha, n):
    # POT counts a Sinkhorn iteration as a column then a row update, ending on the rows; so does our ppa, so
    # inner_iter=k is POT's numItermax=k, k=1 included. Rows are then exact, columns are not.
    # POT's value assumes the marginals a, b; ours is the objective at the plan with its own marginals, so
    # the value is compared with POT's formula at the plan's marginals.
    c1, c2, m = gaussian_pair(n)
    m = np.zeros((n, n)) if alpha == 1 else m
    for inner in (1, 2, 7):
        ref, _ = pot_fgw(m, c1, c2, alpha, 0.1, "PPA", inner=inner)
        r, c = ref.sum(1).numpy(), ref.sum(0).numpy()
        gw = ot.gromov.gwloss(*ot.gromov.init_matrix(c1, c2, r, c, "square_loss"), ref.numpy())
        ref_value = (1 - alpha) * float((m * ref.numpy()).sum()) + alpha * float(gw)
        for domain in ("kernel", "log"):
            res = ours(m, c1, c2, alpha, 0.1, "ppa", inner=inner, domain=domain)
            np.testing.assert_allclose(res.plan[0].numpy(), ref.numpy(), atol=1e-12, rtol=0)
            np.testing.assert_allclose(float(res.transport_cost[0]), ref_value, atol=1e-12, rtol=0)
    plan = res.plan[0]
    np.testing.assert_allclose(plan.sum(1).numpy(), np.full(n, 1 / n), atol=1e-4)
    np.testing.assert_allclose(plan.sum(0).numpy(), np.full(n, 1 / n), atol=1e-2)


def test_warm_start_alone_is_what_loses_accuracy_at_small_epsilon():
    # the cause of the default's per-item choice of start: from the previous step's potentials, 1000
    # iterations at epsilon 1e-2 leave the plan ~1e-5 from the exact iterates on this problem
    c1, c2, _ = gaussian_pair(10)
    exact = exact_iterates(None, c1, c2, 1.0, 1e-2)
    error = {
        start: float((ours(np.zeros((10, 10)), c1, c2, 1.0, 1e-2, start=start).plan[0] - exact).abs().max())
        for start in ("warm", "cold", "auto")
    }
    assert error["warm"] > 1e-6 > error["cold"]
    assert error["auto"] <= error["cold"] * 1.01


def test_auto_start_keeps_what_the_warm_start_buys():
    # random cosine costs (the transfer loss's problems) at a small budget: warm starts are far closer to
    # the exact iterates than cold ones, and "auto" keeps that
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 24, 16, generator=g, dtype=F64), torch.randn(4, 6, 16, generator=g, dtype=F64)
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    cost = 1 - xn @ yn.mT
    sa, sb = 1 - xn @ xn.mT, 1 - yn @ yn.mT
    kw = {"alpha": 0.5, "epsilon": 0.02, "outer_iter": 10, "check_convergence": False}
    items = [[t[i].numpy() for t in (cost, sa, sb)] for i in range(4)]
    exact = torch.stack([exact_iterates(*item, 0.5, 0.02) for item in items])
    error = {
        start: float((fused_gromov_wasserstein(cost, sa, sb, inner_iter=50, start=start, **kw).plan - exact)
                     .abs().max())
        for start in ("warm", "cold", "auto")
    }  # fmt: skip
    assert error["warm"] * 3 < error["cold"]
    assert error["auto"] <= error["warm"] * 1.01
