"""The compiled CPU Sinkhorn iterations (models.ot._sinkhorn_cpu) against the same iterations in torch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import models.ot
from models.ot import _sinkhorn_cpu as sinkhorn_cpu
from models.ot import backend, problem, transport, unbalanced
from models.ot.transport import fused_gromov_wasserstein, sinkhorn
from tests.test_transport import ragged_problem

torch.set_num_threads(1)
F64 = torch.float64


def solve_both(monkeypatch: pytest.MonkeyPatch, solve):
    """Results of ``solve()`` with the torch loop and with the compiled one."""
    out = {}
    for loop in ("torch", "compiled"):
        monkeypatch.setattr(backend, "CPU_LOOP", loop)
        out[loop] = solve()
    return out["torch"], out["compiled"]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "kind", ["sinkhorn", "pgd-auto", "pgd-warm", "pgd-cold", "ppa", "pgd-non-symmetric", "unbalanced"]
)
def test_compiled_loop_gives_the_torch_loop_result(monkeypatch, dtype, kind):
    cost, sa, sb, a, b = ragged_problem(seed=3, dtype=dtype)
    if kind == "pgd-non-symmetric":
        sa = sa + 0.3 * torch.rand(sa.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    solver, _, start = kind.partition("-")

    def solve():
        if kind == "sinkhorn":
            return sinkhorn(cost, a, b, epsilon=0.05, max_iter=30, check_convergence=False)
        if kind == "unbalanced":
            return unbalanced.unbalanced_fused_gromov_wasserstein(
                cost, sa, sb, a, b, epsilon=0.05, tau_a=1.0, outer_iter=5, inner_iter=15
            )
        return fused_gromov_wasserstein(
            cost,
            sa,
            sb,
            a,
            b,
            epsilon=0.05,
            outer_iter=6,
            inner_iter=15,
            solver=solver,
            start=start if start in transport.STARTS else "auto",
            symmetric=kind != "pgd-non-symmetric",
            check_convergence=False,
        )

    assert backend.compiled_loop_for(cost)  # the compiled loop is what "compiled" runs here
    ref, got = solve_both(monkeypatch, solve)
    # the same arithmetic, summed in another order: round-off apart
    tol = 1e-11 if dtype == F64 else 2e-5
    scale = ref.plan.abs().max()
    assert float((got.plan - ref.plan).abs().max() / scale) < tol
    assert torch.allclose(got.value, ref.value, rtol=tol, atol=0)
    valid = a > 0
    assert torch.allclose(got.log_u[valid], ref.log_u[valid], rtol=0, atol=tol * 10)
    assert bool((got.plan[~valid] == 0).all())


def _padded_log_kernel(dtype: torch.dtype = F64):
    """A (2, 6, 4) log kernel in bits (-inf at padding: item 0 has 4 rows and 2 columns), its marginals and
    pads, and row potentials f (0 at padding)."""
    g = torch.Generator().manual_seed(0)
    log_k = torch.randn(2, 6, 4, generator=g, dtype=dtype) * 3
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [1 / 6] * 6], dtype=dtype)
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4], dtype=dtype)
    log_k[0, 4:] = -math.inf
    log_k[0, :, 2:] = -math.inf
    f = torch.randn(2, 6, generator=g, dtype=dtype).masked_fill(a == 0, 0.0)
    return log_k, a, b, (a == 0).to(dtype), (b == 0).to(dtype), f


@pytest.mark.parametrize("warm", [False, True])
def test_project_on_a_padded_item_matches_the_definition(warm):
    log_k, a, b, pad_a, pad_b, f = _padded_log_kernel()
    plan, f_new, g_new, ok = sinkhorn_cpu.project(
        log_k.transpose(1, 2).contiguous(), f if warm else None, a, b, pad_a, pad_b, None, 7, False
    )
    assert ok is None
    # by hand, on the kernel with f absorbed: v from u = 1, then 7 times u = a / (K v), v = b / (K^T u)
    kernel = torch.exp2(log_k + (f[:, :, None] if warm else 0))
    u, v = torch.ones_like(a), b / (kernel.sum(1) + pad_b)
    for _ in range(7):
        u = a / (torch.einsum("bnm,bm->bn", kernel, v) + pad_a)
        v = b / (torch.einsum("bnm,bn->bm", kernel, u) + pad_b)
    want = u[:, :, None] * kernel * v[:, None, :]
    assert torch.allclose(plan, want, rtol=1e-12, atol=1e-300)
    assert bool((plan[0, 4:] == 0).all()) and bool((plan[0, :, 2:] == 0).all())
    # the potentials say the same: plan = 2^(log_k + f + g) at valid entries, 0 at padding
    valid = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    again = torch.exp2(log_k + f_new[:, :, None] + g_new[:, None, :])
    assert torch.allclose(again[valid], plan[valid], rtol=1e-12, atol=0)
    assert bool((f_new[a == 0] == 0).all()) and bool((g_new[b == 0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_absorb_finds_column_maxima_and_non_finite_columns(dtype):
    log_k, a, b, pad_a, pad_b, f = _padded_log_kernel(dtype)
    log_k_t = log_k.transpose(1, 2).contiguous()  # (B, M, N)
    log_k_t[1, 0, 2] = math.nan  # a NaN with the sign bit clear
    log_k_t[1, 1, 3] = (torch.tensor(math.inf) - math.inf).item()  # x86's default NaN: sign bit set
    log_k_t[1, 2, 0] = math.inf
    out = torch.empty_like(log_k_t)
    shift, u_cold, col_max = torch.empty_like(f), torch.empty_like(f), torch.empty_like(b)
    try_cold = torch.zeros(2, dtype=torch.bool)
    bits = sinkhorn_cpu._BITS[dtype]
    sinkhorn_cpu._absorb(
        log_k_t.numpy(), f.numpy(), True, pad_a.numpy(), pad_b.numpy(), 32.0, out.numpy(),
        out.numpy().view(bits.dtype), bits, shift.numpy(), col_max.numpy(), u_cold.numpy(), try_cold.numpy(),
    )  # fmt: skip
    want_shift = (f - f.masked_fill(a == 0, -math.inf).amax(1, keepdim=True)).masked_fill(a == 0, 0.0)
    assert torch.equal(shift, want_shift)
    exponent = log_k_t + want_shift[:, None, :]
    want = exponent.amax(2).masked_fill(b == 0, 0.0)  # torch's amax: NaN where a column holds NaN or +inf
    assert torch.equal(col_max[0], want[0]) and torch.equal(col_max[1, 3], want[1, 3])
    assert bool(col_max[1, :3].isnan().all())
    finite = torch.isfinite(col_max)
    assert torch.equal(out[finite], (exponent - col_max[:, :, None])[finite])
    assert bool(out[1, :3].isnan().all())  # NaN columns stay NaN: the log-domain rerun finds them
    assert bool((out[0, :, 4:] == -math.inf).all())  # padding stays -inf (a kernel of 0)
    assert try_cold.tolist() == [True, True] and torch.equal(u_cold, -want_shift)  # exponents of u0


def test_compiled_projection_keeps_non_finite_scalings_non_finite():
    # a row whose kernel underflows to 0 divides by zero: inf as in torch (numba's default would raise
    # ZeroDivisionError), and the potentials say so
    log_k_t = torch.zeros(1, 2, 3)
    log_k_t[0, :, 1] = -1000.0
    plan, f, _, _ = sinkhorn_cpu.project(
        log_k_t, None, torch.full((1, 3), 1 / 3), torch.full((1, 2), 0.5), None, None, None, 2, False
    )
    assert not bool(torch.isfinite(f).all()) and not bool(torch.isfinite(plan).all())


def test_without_numba_the_torch_loop_runs_with_a_warning(monkeypatch):
    cost, sa, sb, a, b = ragged_problem(seed=1)
    want = fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=3, inner_iter=10)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "models.ot._sinkhorn_cpu")
    monkeypatch.delattr(models.ot, "_sinkhorn_cpu")  # or `from . import _sinkhorn_cpu` would find it there
    backend.compiled_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=3, inner_iter=10)
        assert any("numba is not importable" in str(w.message) for w in caught)
        assert torch.allclose(got.plan, want.plan, rtol=1e-11, atol=1e-15)
    finally:
        backend.compiled_kernels.cache_clear()


def test_an_unknown_cpu_loop_is_refused_by_name(monkeypatch):
    cost, sa, sb, a, b = ragged_problem(seed=2)
    monkeypatch.setattr(backend, "CPU_LOOP", "fast")
    with pytest.raises(ValueError, match=r"GMOT_CPU_LOOP.*'fast'"):
        fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=2, inner_iter=5)


@pytest.mark.parametrize("value", ["torch", "compiled"])
def test_the_environment_variable_chooses_the_loop_at_import(value):
    code = (
        "import torch; from models.ot import backend as t; "
        "print(t.CPU_LOOP, t.compiled_loop_for(torch.zeros(1)))"
    )
    env = {**os.environ, "GMOT_CPU_LOOP": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [value, str(value == "compiled")]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_weighted_squares_match_the_definition(dtype):
    g = torch.Generator().manual_seed(2)
    s, w = torch.randn(3, 7, 7, generator=g, dtype=dtype), torch.rand(3, 7, generator=g, dtype=dtype)
    got = sinkhorn_cpu.weighted_squares(s, w)
    want = torch.einsum("bl,bli->bi", w, s * s)
    assert got.dtype == dtype
    assert torch.allclose(got, want, rtol=1e-12 if dtype == F64 else 1e-5, atol=0)


def test_compiled_fgw_makes_no_squared_structures(monkeypatch):
    # on the CPU the constant term and the objective take w^T (D * D) in one pass over D: no (B, N, N)
    # squares are allocated (the torch loop still builds them once per call)
    cost, sa, sb, a, b = ragged_problem(seed=4)
    made = []
    squares = problem.Problem.squares
    monkeypatch.setattr(problem.Problem, "squares", lambda self: made.append(1) or squares(self))
    ref, got = solve_both(
        monkeypatch,
        lambda: fused_gromov_wasserstein(
            cost, sa, sb, a, b, epsilon=0.05, outer_iter=4, inner_iter=10, check_convergence=False
        ),
    )
    assert made == [1, 1]  # the torch loop: the constant term and the objective, none in the compiled run
    assert torch.allclose(got.value, ref.value, rtol=1e-11, atol=0)
