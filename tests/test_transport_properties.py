"""Property tests (hypothesis) of models.ot.transport over sizes, epsilons and alphas."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.ot.transport import fused_gromov_wasserstein, sinkhorn

torch.set_num_threads(1)
F64 = torch.float64
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    """A ragged float64 batch: (cost, struct_a, struct_b, a, b, n_lens, m_lens)."""
    batch = draw(st.integers(1, 3))
    n_lens = draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch))
    m_lens = draw(st.lists(st.integers(1, 5), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n, m = max(n_lens), max(m_lens)
    cost = torch.rand(batch, n, m, generator=g, dtype=F64)
    xa, xb = torch.rand(batch, n, 2, generator=g, dtype=F64), torch.rand(batch, m, 2, generator=g, dtype=F64)
    a = torch.zeros(batch, n, dtype=F64)
    b = torch.zeros(batch, m, dtype=F64)
    for i in range(batch):
        a[i, : n_lens[i]] = 1.0 / n_lens[i]
        b[i, : m_lens[i]] = 1.0 / m_lens[i]
    return cost, torch.cdist(xa, xa), torch.cdist(xb, xb), a, b, n_lens, m_lens


def check_plan(plan, a, b, n_lens, m_lens, atol, rows_exact=False):
    assert bool(torch.isfinite(plan).all()) and bool((plan >= 0).all())
    for i, (ni, mi) in enumerate(zip(n_lens, m_lens, strict=True)):
        assert bool((plan[i, ni:] == 0).all()) and bool((plan[i, :, mi:] == 0).all())
    # the side each projection ends on is exact: columns (sinkhorn, pgd), rows (ppa, as POT)
    exact, approx = (plan.sum(2), plan.sum(1)) if rows_exact else (plan.sum(1), plan.sum(2))
    assert torch.allclose(exact, a if rows_exact else b, atol=1e-10, rtol=0)
    assert torch.allclose(approx, b if rows_exact else a, atol=atol, rtol=0)


@SETTINGS
@given(problems(), st.floats(0.1, 1.0))
def test_sinkhorn_meets_marginals(problem, epsilon):
    cost, _, _, a, b, n_lens, m_lens = problem
    res = sinkhorn(cost, a, b, epsilon=epsilon, max_iter=2000, tol=1e-9)
    check_plan(res.plan, a, b, n_lens, m_lens, atol=1e-8)
    assert bool((res.iterations <= 2000).all()) and bool((res.iterations >= 1).all())


@SETTINGS
@given(problems(), st.floats(0.1, 1.0), st.floats(0.0, 1.0), st.sampled_from(["pgd", "ppa"]))
def test_fgw_plan_is_feasible_and_padding_is_zero(problem, epsilon, alpha, solver):
    cost, sa, sb, a, b, n_lens, m_lens = problem
    res = fused_gromov_wasserstein(
        cost, sa, sb, a, b, alpha=alpha, epsilon=epsilon, outer_iter=5, inner_iter=200, solver=solver
    )
    check_plan(res.plan, a, b, n_lens, m_lens, atol=1e-6, rows_exact=solver == "ppa")
    assert bool(torch.isfinite(res.value).all())
    # the objective is a sum of non-negative terms (plus KL >= 0 for pgd)
    assert bool((res.transport_cost >= -1e-12).all()) and bool((res.value >= res.transport_cost - 1e-9).all())


@SETTINGS
@given(problems(), st.floats(0.2, 1.0), st.floats(0.0, 1.0))
def test_fgw_is_equivariant_under_swapping_the_two_sides(problem, epsilon, alpha):
    cost, sa, sb, a, b, _, _ = problem
    kw = {"alpha": alpha, "epsilon": epsilon, "outer_iter": 4, "inner_iter": 400}
    fwd = fused_gromov_wasserstein(cost, sa, sb, a, b, **kw)
    rev = fused_gromov_wasserstein(cost.transpose(1, 2), sb, sa, b, a, **kw)
    assert torch.allclose(fwd.plan, rev.plan.transpose(1, 2), atol=1e-8)
    assert torch.allclose(fwd.value, rev.value, atol=1e-8)


@SETTINGS
@given(problems(), st.floats(0.01, 1.0), st.integers(1, 4), st.integers(1, 6))
def test_alpha_zero_equals_sinkhorn(problem, epsilon, outer, inner):
    cost, sa, sb, a, b, _, _ = problem
    fgw = fused_gromov_wasserstein(
        cost, sa, sb, a, b, alpha=0.0, epsilon=epsilon, outer_iter=outer, inner_iter=inner
    )
    sk = sinkhorn(cost, a, b, epsilon=epsilon, max_iter=outer * inner, check_every=inner)
    assert torch.equal(fgw.plan, sk.plan) and torch.equal(fgw.value, sk.value)
