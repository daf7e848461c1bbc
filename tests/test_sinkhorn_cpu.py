"""The compiled CPU Sinkhorn iterations (models.sinkhorn_cpu) against the same iterations in torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import models
from models import sinkhorn_cpu, transport
from models.transport import fused_gromov_wasserstein, sinkhorn
from tests.test_transport import ragged_problem

torch.set_num_threads(1)
F64 = torch.float64


def solve_both(monkeypatch: pytest.MonkeyPatch, solve):
    """Results of ``solve()`` with the torch loop and with the compiled one."""
    out = {}
    for loop in ("torch", "compiled"):
        monkeypatch.setattr(transport, "CPU_LOOP", loop)
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
            return transport.unbalanced_fused_gromov_wasserstein(
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

    assert transport._compiled_loop_for(cost)  # the compiled loop is what "compiled" runs here
    ref, got = solve_both(monkeypatch, solve)
    # the same arithmetic, summed in another order: round-off apart
    tol = 1e-11 if dtype == F64 else 2e-5
    scale = ref.plan.abs().max()
    assert float((got.plan - ref.plan).abs().max() / scale) < tol
    assert torch.allclose(got.value, ref.value, rtol=tol, atol=0)
    valid = a > 0
    assert torch.allclose(got.log_u[valid], ref.log_u[valid], rtol=0, atol=tol * 10)
    assert bool((got.plan[~valid] == 0).all())


def test_scaling_iterations_on_a_padded_item_match_the_definition():
    g = torch.Generator().manual_seed(0)
    kernel = torch.rand(2, 6, 4, generator=g, dtype=F64) + 0.1  # (B, N, M)
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [1 / 6] * 6], dtype=F64)
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4], dtype=F64)
    kernel[0, 4:] = 0
    kernel[0, :, 2:] = 0
    pad_a, pad_b = (a == 0).to(F64), (b == 0).to(F64)
    u, v = sinkhorn_cpu.scaling_iterations(
        kernel.transpose(1, 2).contiguous(), a, b, pad_a, pad_b, None, None, 7, False
    )
    # by hand: v from u = 1, then 7 times u = a / (K v), v = b / (K^T u)
    uu, vv = torch.ones_like(a), b / (kernel.sum(1) + pad_b)
    for _ in range(7):
        uu = a / (torch.einsum("bnm,bm->bn", kernel, vv) + pad_a)
        vv = b / (torch.einsum("bnm,bn->bm", kernel, uu) + pad_b)
    assert torch.allclose(u, uu, rtol=1e-13, atol=0) and torch.allclose(v, vv, rtol=1e-13, atol=0)
    assert bool((u[0, 4:] == 0).all()) and bool((v[0, 2:] == 0).all())


def test_compiled_loop_keeps_non_finite_scalings_non_finite():
    # a zero column divides by zero: inf as in torch (numba's default would raise ZeroDivisionError)
    kernel_t = torch.ones(1, 2, 3)
    kernel_t[0, 1] = 0
    u, v = sinkhorn_cpu.scaling_iterations(
        kernel_t, torch.full((1, 3), 1 / 3), torch.full((1, 2), 0.5), None, None, None, None, 2, False
    )
    assert not bool(torch.isfinite(u).all()) and not bool(torch.isfinite(v).all())


def test_without_numba_the_torch_loop_runs_with_a_warning(monkeypatch):
    cost, sa, sb, a, b = ragged_problem(seed=1)
    want = fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=3, inner_iter=10)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "models.sinkhorn_cpu")
    monkeypatch.delattr(models, "sinkhorn_cpu")
    transport._sinkhorn_cpu.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=3, inner_iter=10)
        assert any("numba is not importable" in str(w.message) for w in caught)
        assert torch.allclose(got.plan, want.plan, rtol=1e-11, atol=1e-15)
    finally:
        transport._sinkhorn_cpu.cache_clear()


def test_an_unknown_cpu_loop_is_refused_by_name(monkeypatch):
    cost, sa, sb, a, b = ragged_problem(seed=2)
    monkeypatch.setattr(transport, "CPU_LOOP", "fast")
    with pytest.raises(ValueError, match=r"GMOT_CPU_LOOP.*'fast'"):
        fused_gromov_wasserstein(cost, sa, sb, a, b, epsilon=0.05, outer_iter=2, inner_iter=5)


@pytest.mark.parametrize("value", ["torch", "compiled"])
def test_the_environment_variable_chooses_the_loop_at_import(value):
    code = (
        "import torch; from models import transport as t; "
        "print(t.CPU_LOOP, t._compiled_loop_for(torch.zeros(1)))"
    )
    env = {**os.environ, "GMOT_CPU_LOOP": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [value, str(value == "compiled")]
