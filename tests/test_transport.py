"""models.ot.transport against POT 0.9.7 (float64), padding, stability, gradients and input validation."""

from __future__ import annotations

import warnings

import ot
import pytest
import torch

from models.ot import transport
from models.ot.problem import cost_spread
from models.ot.transport import fused_gromov_wasserstein, sinkhorn

torch.set_num_threads(1)
F64 = torch.float64

# ragged batch with lengths of 1 on both sides
N_LENS = [1, 4, 6, 3, 5]
M_LENS = [3, 1, 4, 5, 2]


def ragged_problem(seed: int = 0, dtype: torch.dtype = F64, scale: float = 1.0):
    """Padded costs/structures with garbage at padding, and marginals (uniform over valid entries)."""
    g = torch.Generator().manual_seed(seed)
    batch, n, m = len(N_LENS), max(N_LENS), max(M_LENS)
    cost = torch.rand(batch, n, m, generator=g, dtype=dtype)
    xa = torch.rand(batch, n, 2, generator=g, dtype=dtype)
    xb = torch.rand(batch, m, 2, generator=g, dtype=dtype)
    struct_a, struct_b = torch.cdist(xa, xa) * scale, torch.cdist(xb, xb) * scale
    a = torch.zeros(batch, n, dtype=dtype)
    b = torch.zeros(batch, m, dtype=dtype)
    for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        a[i, :ni] = torch.rand(ni, generator=g, dtype=dtype) + 0.5
        b[i, :mi] = torch.rand(mi, generator=g, dtype=dtype) + 0.5
        # garbage (finite) at padded positions must not matter
        cost[i, ni:, :] = 7.0
        cost[i, :, mi:] = -3.0
        struct_a[i, ni:, :] = struct_a[i, :, ni:] = 5.0
        struct_b[i, mi:, :] = struct_b[i, :, mi:] = 5.0
    return cost, struct_a, struct_b, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def valid_block(x: torch.Tensor, i: int) -> torch.Tensor:
    return x[i, : N_LENS[i], : M_LENS[i]]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def assert_padding_zero(plan: torch.Tensor) -> None:
    for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        assert torch.all(plan[i, ni:, :] == 0)
        assert torch.all(plan[i, :, mi:] == 0)


def test_sinkhorn_matches_pot_sinkhorn_log_on_ragged_batch():
    cost, _, _, a, b = ragged_problem()
    res = sinkhorn(cost, a, b, epsilon=0.05, max_iter=3000, tol=1e-13)
    for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        ref = ot.bregman.sinkhorn_log(
            a[i, :ni], b[i, :mi], cost[i, :ni, :mi], 0.05, numItermax=20000, stopThr=1e-14
        )
        assert rel_err(valid_block(res.plan, i), ref) < 1e-6
    assert_padding_zero(res.plan)
    assert res.plan.shape == cost.shape and res.iterations.dtype == torch.int64


@pytest.mark.parametrize("solver", ["pgd", "ppa"])
def test_fgw_matches_pot_per_pair_on_ragged_batch(solver):
    cost, sa, sb, a, b = ragged_problem(1)
    outer = 12
    res = fused_gromov_wasserstein(
        cost, sa, sb, a, b, alpha=0.6, epsilon=0.08, outer_iter=outer, inner_iter=3000, solver=solver
    )
    assert_padding_zero(res.plan)
    for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        ref, log = ot.gromov.entropic_fused_gromov_wasserstein(
            cost[i, :ni, :mi],
            sa[i, :ni, :ni],
            sb[i, :mi, :mi],
            a[i, :ni],
            b[i, :mi],
            alpha=0.6,
            epsilon=0.08,
            solver=solver.upper(),
            max_iter=outer,
            tol=0.0,
            numItermax=20000,
            stopThr=1e-14,
            log=True,
        )
        assert rel_err(valid_block(res.plan, i), ref) < 1e-6
        assert float(res.transport_cost[i]) == pytest.approx(float(log["fgw_dist"]), rel=1e-6, abs=1e-9)


def test_fgw_pgd_run_to_convergence_matches_pot():
    cost, sa, sb, a, b = ragged_problem(2)
    res = fused_gromov_wasserstein(
        cost, sa, sb, a, b, alpha=0.5, epsilon=0.1, outer_iter=300, inner_iter=200, tol=1e-12, check_every=5
    )
    assert int(res.iterations.max()) < 300  # the tolerance stopped it
    for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        ref = ot.gromov.entropic_fused_gromov_wasserstein(
            cost[i, :ni, :mi],
            sa[i, :ni, :ni],
            sb[i, :mi, :mi],
            a[i, :ni],
            b[i, :mi],
            alpha=0.5,
            epsilon=0.1,
            max_iter=1000,
            tol=1e-13,
            numItermax=20000,
            stopThr=1e-14,
        )
        assert rel_err(valid_block(res.plan, i), ref) < 1e-6


def test_fgw_matches_pot_batch_solver_on_equal_lengths():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 6, 4, generator=g, dtype=F64)
    xa, xb = torch.rand(3, 6, 3, generator=g, dtype=F64), torch.rand(3, 4, 3, generator=g, dtype=F64)
    sa, sb = torch.cdist(xa, xa), torch.cdist(xb, xb)
    # POT's batch solver is the proximal point method started from a b^T
    ref = ot.batch.solve_gromov_batch(
        sa, sb, reg=0.1, M=cost, alpha=0.3, max_iter=15, tol=0.0, max_iter_inner=5000, tol_inner=1e-14
    )
    res = fused_gromov_wasserstein(
        cost, sa, sb, alpha=0.3, epsilon=0.1, outer_iter=15, inner_iter=3000, solver="ppa"
    )
    for i in range(3):
        assert rel_err(res.plan[i], ref.plan[i]) < 1e-6
    assert torch.allclose(res.transport_cost, ref.value, rtol=1e-6)
    assert torch.allclose(res.value, res.transport_cost)  # ppa: no entropic term


def test_marginals_met_at_convergence():
    cost, sa, sb, a, b = ragged_problem(4)
    sk = sinkhorn(cost, a, b, epsilon=0.1, max_iter=2000, tol=1e-10)
    fgw = fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.1, outer_iter=50, inner_iter=300, tol=1e-10)
    for res in (sk, fgw):
        assert torch.allclose(res.plan.sum(2), a, atol=1e-6, rtol=0)
        assert torch.allclose(res.plan.sum(1), b, atol=1e-6, rtol=0)
        assert bool((res.plan >= 0).all())


def test_tolerance_is_per_item_and_converged_items_stop():
    cost = torch.rand(2, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    cost[0] = 0.3  # a constant cost is solved by the first iteration
    res = sinkhorn(cost, epsilon=0.02, max_iter=500, tol=1e-9, check_every=5)
    assert int(res.iterations[0]) == 5
    assert int(res.iterations[1]) > 5
    fixed = sinkhorn(cost, epsilon=0.02, max_iter=500)
    assert bool((fixed.iterations == 500).all())


@pytest.mark.filterwarnings("ignore:.*did not converge:RuntimeWarning")  # small budgets on purpose
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_finite_at_small_epsilon_and_large_structures(dtype):
    g = torch.Generator().manual_seed(6)
    cost = 2 * torch.rand(4, 12, 7, generator=g, dtype=dtype)
    xa, xb = torch.rand(4, 12, 3, generator=g, dtype=dtype), torch.rand(4, 7, 3, generator=g, dtype=dtype)
    sa, sb = torch.cdist(xa, xa), torch.cdist(xb, xb)
    a = torch.full((4, 12), 1 / 12, dtype=dtype)
    a[1, 9:] = 0
    a[1, :9] = 1 / 9
    cases = [
        sinkhorn(cost.requires_grad_(), a, epsilon=1e-3, max_iter=200),
        fused_gromov_wasserstein(cost, sa, sb, a, epsilon=1e-3, outer_iter=5, inner_iter=50),
        fused_gromov_wasserstein(cost, sa, sb, a, epsilon=1e-3, outer_iter=5, inner_iter=50, solver="ppa"),
        fused_gromov_wasserstein(cost, sa * 1e3, sb * 1e3, a, epsilon=1e-3, outer_iter=5, inner_iter=50),
        fused_gromov_wasserstein(cost, sa * 1e3, sb * 1e3, a, epsilon=0.1, outer_iter=5, inner_iter=50),
    ]
    for k, res in enumerate(cases):
        for t in (res.plan, res.value, res.log_u, res.log_v):
            assert bool(torch.isfinite(t).all())
        assert bool((res.plan >= 0).all())
        # columns are exact after each projection: the total mass is 1 (float32 cannot resolve
        # G / epsilon ~ 1e7..1e9 of the structures x 1e3 cases: there only finiteness is asked for)
        if dtype == F64 or k < 3:
            assert torch.allclose(res.plan.sum((1, 2)), torch.ones(4, dtype=dtype), atol=1e-4)
        (grad,) = torch.autograd.grad(res.value.sum(), cost)
        assert bool(torch.isfinite(grad).all())
        assert bool((res.plan[1, 9:] == 0).all())


def test_kernel_domain_alone_fails_where_the_fallback_is_needed():
    cost = 2 * torch.rand(2, 30, 20, dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    kernel_only = sinkhorn(cost, epsilon=1e-3, max_iter=50, domain="kernel")
    auto = sinkhorn(cost, epsilon=1e-3, max_iter=50)
    log = sinkhorn(cost, epsilon=1e-3, max_iter=50, domain="log")
    assert not bool(torch.isfinite(kernel_only.plan).all())
    assert torch.allclose(auto.plan, log.plan)


def test_alpha_zero_is_exactly_sinkhorn():
    cost, sa, sb, a, b = ragged_problem(8)
    fgw = fused_gromov_wasserstein(cost, sa, sb, a, b, alpha=0.0, epsilon=0.05, outer_iter=7, inner_iter=10)
    sk = sinkhorn(cost, a, b, epsilon=0.05, max_iter=70, check_every=10)
    assert torch.equal(fgw.plan, sk.plan)
    assert torch.equal(fgw.value, sk.value)
    assert torch.equal(fgw.log_u, sk.log_u) and torch.equal(fgw.log_v, sk.log_v)


def test_padded_plan_and_gradients_are_exactly_zero():
    cost, sa, sb, a, b = ragged_problem(9)
    for grad in ("envelope", "unrolled"):
        c, da, dl = (t.clone().requires_grad_() for t in (cost, sa, sb))
        res = fused_gromov_wasserstein(c, da, dl, a, b, epsilon=0.1, outer_iter=4, inner_iter=10, grad=grad)
        assert res.plan.requires_grad == (grad == "unrolled")
        assert_padding_zero(res.plan.detach())
        gc, ga, gl = torch.autograd.grad(res.value.sum(), (c, da, dl))
        assert_padding_zero(gc)
        for i, (ni, mi) in enumerate(zip(N_LENS, M_LENS, strict=True)):
            assert bool((ga[i, ni:] == 0).all()) and bool((ga[i, :, ni:] == 0).all())
            assert bool((gl[i, mi:] == 0).all()) and bool((gl[i, :, mi:] == 0).all())
            assert bool(valid_block(gc, i).abs().sum() > 0)


def test_envelope_gradients_match_unrolled_when_converged():
    cost, sa, sb, a, b = ragged_problem(10)
    grads, values = [], []
    for grad in ("envelope", "unrolled"):
        ins = tuple(t.clone().requires_grad_() for t in (cost, sa, sb))
        res = fused_gromov_wasserstein(
            *ins, a, b, alpha=0.5, epsilon=0.3, outer_iter=40, inner_iter=40, grad=grad
        )
        grads.append(torch.autograd.grad(res.value.sum(), ins))
        values.append(res.value.detach())
    for g_e, g_u in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(g_e, g_u, atol=1e-7, rtol=1e-5)
        assert bool(g_e.abs().sum() > 0)
    assert torch.allclose(values[0], values[1], atol=1e-12)


def test_sinkhorn_envelope_gradient_matches_unrolled():
    cost, _, _, a, b = ragged_problem(11)
    grads = []
    for grad in ("envelope", "unrolled"):
        c = cost.clone().requires_grad_()
        res = sinkhorn(c, a, b, epsilon=0.3, max_iter=300, grad=grad)
        grads.append(torch.autograd.grad(res.value.sum(), c)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-8, rtol=1e-6)


def test_envelope_passes_gradcheck_on_a_tiny_converged_problem():
    g = torch.Generator().manual_seed(12)
    cost = torch.rand(1, 3, 2, generator=g, dtype=F64, requires_grad=True)
    x, y = torch.rand(1, 3, 2, generator=g, dtype=F64), torch.rand(1, 2, 2, generator=g, dtype=F64)
    sa = torch.cdist(x, x).requires_grad_()
    sb = torch.cdist(y, y).requires_grad_()

    def value(c, da, dl):
        return fused_gromov_wasserstein(
            c, da, dl, alpha=0.5, epsilon=0.5, outer_iter=200, inner_iter=100, tol=1e-14, check_every=5
        ).value

    assert torch.autograd.gradcheck(value, (cost, sa, sb), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_half_precision_inputs_are_computed_in_float32():
    cost, sa, sb, a, b = ragged_problem(13, dtype=torch.float32)
    res16 = fused_gromov_wasserstein(cost.half(), sa.half(), sb.half(), a, b, outer_iter=3, inner_iter=10)
    res32 = fused_gromov_wasserstein(
        cost.half().float(), sa.half().float(), sb.half().float(), a, b, outer_iter=3, inner_iter=10
    )
    assert res16.plan.dtype == torch.float32 and res16.value.dtype == torch.float32
    assert torch.equal(res16.plan, res32.plan)
    bf = sinkhorn(cost.bfloat16(), a, b)
    assert bf.plan.dtype == torch.float32 and bool(torch.isfinite(bf.plan).all())


def _bad(**changes):
    cost, sa, sb, a, b = ragged_problem(14)
    args = {"cost": cost, "struct_a": sa, "struct_b": sb, "a": a, "b": b}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"cost": torch.rand(5, 6)}, "cost"),
        ({"struct_a": torch.rand(5, 6, 5)}, "struct_a"),
        ({"struct_b": torch.rand(5, 4, 4)}, "struct_b"),
        ({"a": torch.full((5, 5), 0.2)}, "a"),
        ({"b": torch.full((5, 4), 0.25, dtype=F64)}, "b"),
        ({"a": torch.tensor([[1.5, -0.5, 0, 0, 0, 0]] * 5, dtype=F64)}, "a"),
        ({"b": torch.full((5, 5), 0.1, dtype=F64)}, "b"),
        ({"a": torch.full((5, 6), float("nan"), dtype=F64)}, "a"),
        ({"cost": torch.full((5, 6, 5), float("inf"), dtype=F64)}, "cost"),
        ({"struct_b": torch.full((5, 5, 5), float("nan"), dtype=F64)}, "struct_b"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"solver": "newton"}, "solver"),
        ({"grad": "magic"}, "grad"),
        ({"domain": "fourier"}, "domain"),
        ({"outer_iter": 0}, "outer_iter"),
        ({"tol": -1.0}, "tol"),
        ({"scale_cost": "max"}, "scale_cost"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(changes, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        fused_gromov_wasserstein(**_bad(**changes))


def test_sinkhorn_bad_input():
    cost = torch.rand(2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"^epsilon"):
        sinkhorn(cost, epsilon=0)
    with pytest.raises(ValueError, match=r"^max_iter"):
        sinkhorn(cost, max_iter=0)
    with pytest.raises(ValueError, match=r"^b"):
        sinkhorn(cost, b=torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"^cost"):
        sinkhorn(cost.long())


def test_convergence_is_reported_per_item_and_warned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_WARNED", set())
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 12, 5, generator=g, dtype=torch.float64)
    done = transport.sinkhorn(cost, epsilon=0.1, max_iter=500)
    assert done.marginal_error.shape == (3,) and float(done.marginal_error.max()) < 1e-9
    with pytest.warns(RuntimeWarning, match=r"sinkhorn: 3 item\(s\) did not converge.*items \[0, 1, 2\]"):
        short = transport.sinkhorn(cost, epsilon=0.01, max_iter=1, domain="log")
    assert float(short.marginal_error.min()) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per solver: no second warning
        transport.sinkhorn(cost, epsilon=0.01, max_iter=1, domain="log")
    monkeypatch.setattr(transport, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trusted calls and check_convergence=False do not check
        transport.sinkhorn(cost, epsilon=0.01, max_iter=1, domain="log", validate=False)
        transport.sinkhorn(cost, epsilon=0.01, max_iter=1, domain="log", check_convergence=False)
    with pytest.warns(RuntimeWarning, match="mine: 3 item"):
        assert transport.warn_unconverged(short, 1e-3, "mine") == [0, 1, 2]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_potentials_give_back_the_plan(dtype, domain):
    """plan = exp(log_u - C / epsilon + log_v) at valid entries; the kernel domain computes in bits and
    returns nats."""
    cost, _, _, a, b = ragged_problem(11, dtype)
    res = sinkhorn(cost, a, b, epsilon=0.05, max_iter=60, domain=domain)
    rebuilt = torch.exp(res.log_u[:, :, None] - cost / 0.05 + res.log_v[:, None, :])
    tol = 1e-12 if dtype == F64 else 1e-5
    for i in range(len(N_LENS)):
        assert torch.allclose(valid_block(rebuilt, i), valid_block(res.plan, i), rtol=tol * 10, atol=tol)
        assert bool((res.log_u[i, N_LENS[i] :] == 0).all()) and bool((res.log_v[i, M_LENS[i] :] == 0).all())
    assert res.plan.is_contiguous()


def test_envelope_gradients_are_those_of_the_objective_at_the_plan():
    """The FGW cost's written-out gradients equal autograd through the objective at the returned plan,
    with non-symmetric structures and padding."""
    cost, sa, sb, a, b = ragged_problem(12)
    g = torch.Generator().manual_seed(12)
    sa = sa + 0.3 * torch.rand(sa.shape, generator=g, dtype=F64)  # not symmetric any more
    sb = sb + 0.3 * torch.rand(sb.shape, generator=g, dtype=F64)
    alpha, eps = 0.4, 0.1
    c, da, dl = (t.clone().requires_grad_() for t in (cost, sa, sb))
    res = fused_gromov_wasserstein(c, da, dl, a, b, alpha=alpha, epsilon=eps, outer_iter=5, inner_iter=30)
    got = torch.autograd.grad(res.transport_cost.sum(), (c, da, dl))
    plan = res.plan.detach()
    c2, da2, dl2 = (t.clone().requires_grad_() for t in (cost, sa, sb))
    r, k = plan.sum(2), plan.sum(1)
    quad = torch.einsum("bi,bik,bk->b", r, da2**2, r) + torch.einsum("bj,bjl,bl->b", k, dl2**2, k)
    cross = torch.einsum("bik,bjl,bij,bkl->b", da2, dl2, plan, plan)
    expected = (1 - alpha) * (c2 * plan).sum((1, 2)) + alpha * (quad - 2 * cross)
    assert torch.allclose(res.transport_cost.detach(), expected.detach(), rtol=1e-12, atol=1e-14)
    want = torch.autograd.grad(expected.sum(), (c2, da2, dl2))
    for ours, ref in zip(got, want, strict=True):
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_cold_start_beyond_float32_range_is_solved_in_the_log_domain():
    """At epsilon 0.005 the row potentials of this GW problem span up to ~49 bits, more than the 32 at which
    float32 can offer the cold start as a row scaling of the warm kernel: under domain="auto" those items
    are solved again in the log domain, where both starts are exact. float64 offers it in the kernel
    domain, and then agrees with the log domain."""
    xs = torch.randn(12, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    c1 = torch.cdist(xs, xs) ** 2
    c1 = c1 / c1.max()
    sa, sb, cost = c1[None], c1.flip(0).flip(1)[None], torch.zeros(1, 12, 12, dtype=F64)
    kw = {"alpha": 1.0, "epsilon": 0.005, "outer_iter": 5, "inner_iter": 100, "check_convergence": False}
    args32 = (cost.float(), sa.float(), sb.float())
    auto = fused_gromov_wasserstein(*args32, **kw)
    log = fused_gromov_wasserstein(*args32, domain="log", **kw)
    kernel = fused_gromov_wasserstein(*args32, domain="kernel", **kw)
    assert torch.equal(auto.plan, log.plan)
    assert bool(torch.isfinite(kernel.plan).all())  # the kernel domain alone keeps the warm start there
    in64 = fused_gromov_wasserstein(cost, sa, sb, domain="kernel", **kw)
    log64 = fused_gromov_wasserstein(cost, sa, sb, domain="log", **kw)
    assert torch.allclose(in64.plan, log64.plan, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["sinkhorn", "pgd", "ppa"])
def test_scale_cost_std_is_the_given_problem_at_epsilon_times_the_spread(solver):
    # each item alone at epsilon * s_k, s_k its cost's spread over the valid entries (the padding's garbage
    # left out): the same plan, value, transport cost and gradients, in the given cost's units
    cost, sa, sb, a, b = ragged_problem(15)
    cost = 3.0 * cost
    spread = cost_spread(cost, (a > 0)[:, :, None] & (b > 0)[:, None, :])

    def solve(c, s_a, s_b, a_, b_, epsilon, **kw):
        c = c.clone().requires_grad_(True)
        if solver == "sinkhorn":
            res = sinkhorn(c, a_, b_, epsilon, max_iter=40, check_convergence=False, **kw)
        else:
            res = fused_gromov_wasserstein(c, s_a, s_b, a_, b_, 0.5, epsilon, outer_iter=5, inner_iter=20,
                                           solver=solver, check_convergence=False, **kw)  # fmt: skip
        res.value.sum().backward()
        return res, c.grad

    scaled, grad = solve(cost, sa, sb, a, b, 0.1, scale_cost="std")
    assert float((spread - 1).abs().min()) > 0.05  # far enough from 1 for the scaling to matter
    for i, (n, m) in enumerate(zip(N_LENS, M_LENS, strict=True)):
        one, one_grad = solve(cost[i : i + 1, :n, :m], sa[i : i + 1, :n, :n], sb[i : i + 1, :m, :m],
                              a[i : i + 1, :n], b[i : i + 1, :m], 0.1 * float(spread[i]))  # fmt: skip
        torch.testing.assert_close(valid_block(scaled.plan, i), one.plan[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(valid_block(grad, i), one_grad[0], rtol=1e-9, atol=1e-12)
        for field in ("value", "transport_cost"):
            torch.testing.assert_close(getattr(scaled, field)[i], getattr(one, field)[0], rtol=1e-9, atol=0)
