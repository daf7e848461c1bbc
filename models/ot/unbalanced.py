"""Entropic transport with KL-relaxed marginals (unbalanced OT), batched and ragged, in the log domain: the
generalised Sinkhorn iterations of Chizat et al. 2018 (POT's ``ot.unbalanced.sinkhorn_unbalanced``), fused
with a linearised square-loss Gromov term where alpha > 0. It shares the problem set-up
(`models.ot.problem`) and the objective (`models.ot.objective`) with the balanced solvers of
`models.ot.transport`, not their iterations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .objective import objective
from .problem import Problem, TransportResult, build_problem, in_given_units, marginal_error

__all__ = ["unbalanced_fused_gromov_wasserstein"]


def _relaxed_fraction(tau: float | None, epsilon: float) -> float:
    """Exponent of the KL-relaxed Sinkhorn update: tau / (tau + epsilon); 1 (exact marginal) for None."""
    return 1.0 if tau is None else tau / (tau + epsilon)


def _unbalanced_projection(
    neg_k: Tensor, p: Problem, lu: Tensor, lv: Tensor, phi_a: float, phi_b: float, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`n` KL-relaxed Sinkhorn iterations on the Gibbs kernel exp(neg_k) relative to a b^T.

    neg_k (B, N, M) is -G/epsilon with -inf at padded entries; lu (B, N), lv (B, M) are the potentials
    divided by epsilon. Returns log plan (B, N, M) (-inf at padding), lu, lv. Ends on the column update.
    """
    k_b = neg_k + p.log_b[:, None, :]  # row sums: T 1 = a * exp(lu) * sum_j b_j exp(lv_j + neg_k_ij)
    k_a = neg_k + p.log_a[:, :, None]
    for _ in range(n):
        lu = (-phi_a * torch.logsumexp(k_b + lv[:, None, :], dim=2)).masked_fill(~p.row_valid, 0.0)
        lv = (-phi_b * torch.logsumexp(k_a + lu[:, :, None], dim=1)).masked_fill(~p.col_valid, 0.0)
    return k_a + p.log_b[:, None, :] + lu[:, :, None] + lv[:, None, :], lu, lv


def _kl_mass(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Generalised KL(x || y) = sum x log(x / y) - x + y over valid entries: (B, K) -> (B,)."""
    safe_x = torch.where(valid, x, torch.ones_like(x))
    safe_y = torch.where(valid, y, torch.ones_like(y))
    log_ratio = safe_x.clamp(min=torch.finfo(x.dtype).tiny).log() - safe_y.log()
    terms = torch.where(valid, x * log_ratio - x + y, 0.0)
    return terms.sum(1)


def unbalanced_fused_gromov_wasserstein(
    cost: Tensor,
    struct_a: Tensor | None,
    struct_b: Tensor | None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    alpha: float = 0.0,
    epsilon: float = 0.1,
    *,
    tau_a: float | None = 1.0,
    tau_b: float | None = None,
    outer_iter: int = 10,
    inner_iter: int = 20,
    grad: str = "envelope",
    validate: bool = True,
    scale_cost: str | None = None,
) -> TransportResult:
    """Entropic transport with KL-relaxed marginals, batched and ragged, in the log domain.

    With alpha = 0 (structures may be None) it solves the entropic unbalanced OT problem
    ``min_T <C, T> + epsilon KL(T || a b^T) + tau_a KL(T 1 || a) + tau_b KL(T^T 1 || b)`` (the plan of
    ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, epsilon, reg_m=(tau_a, tau_b))``) by
    ``outer_iter * inner_iter`` generalised Sinkhorn iterations. ``tau_b=None`` (or ``tau_a=None``) keeps that
    marginal exact. With alpha > 0 the node cost is fused with the square-loss Gromov term as in
    `models.ot.transport.fused_gromov_wasserstein` (pgd): each outer step linearises the Gromov term at the
    current plan, using the plan's own marginals, and projects with ``inner_iter`` relaxed iterations (a
    linearised semi-relaxed FGW; docs/transfer.md).

    Args:
        cost: (B, N, M) node cost; struct_a (B, N, N), struct_b (B, M, M) structures (needed when alpha > 0).
        a, b: (B, N), (B, M) reference weights (rows sum to 1, 0 at padding); None = uniform.
        tau_a, tau_b: KL relaxation strengths (> 0) or None for an exact marginal.
        outer_iter, inner_iter: the iteration budget (fixed; no host synchronisation).
        grad: "envelope" or "unrolled", as in `models.ot.transport.sinkhorn`.
        validate: as in `models.ot.transport.sinkhorn` (this routine has no other synchronisation).
        scale_cost: as in `models.ot.transport.fused_gromov_wasserstein`; epsilon, tau_a and tau_b then
            count in units of each item's spread s.

    Returns:
        TransportResult: ``plan`` (B, N, M), 0 at padding, its row sums free when tau_a is set; ``value``
        the full objective; ``transport_cost`` the (F)GW cost at the plan without the entropic and KL
        terms; ``iterations`` the outer steps.
    """
    for name, tau in (("tau_a", tau_a), ("tau_b", tau_b)):
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"{name}: must be None or a finite number > 0, got {tau!r}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
    if alpha > 0 and (struct_a is None or struct_b is None):
        raise ValueError("struct_a, struct_b: both structure matrices are required when alpha > 0")
    iters = {"outer_iter": outer_iter, "inner_iter": inner_iter}
    p = build_problem(cost, struct_a if alpha > 0 else None, struct_b if alpha > 0 else None, a, b,
                      epsilon=epsilon, grad=grad, iters=iters, tol=None, validate=validate,
                      scale_cost=scale_cost)  # fmt: skip
    phi_a, phi_b = _relaxed_fraction(tau_a, epsilon), _relaxed_fraction(tau_b, epsilon)
    valid = p.row_valid[:, :, None] & p.col_valid[:, None, :]

    def solve(q: Problem) -> tuple[Tensor, Tensor, Tensor]:
        lu, lv = torch.zeros_like(q.a), torch.zeros_like(q.b)
        plan = q.a[:, :, None] * q.b[:, None, :]
        for _ in range(outer_iter if alpha > 0 else 1):
            g = q.cost
            if alpha > 0:
                assert q.struct_a is not None and q.struct_b is not None
                r, c = plan.sum(2), plan.sum(1)
                const = torch.bmm(q.struct_a**2, r.unsqueeze(2)) + torch.bmm(q.struct_b**2, c.unsqueeze(2)).mT
                cross = torch.bmm(torch.bmm(q.struct_a, plan), q.struct_b.mT)
                g = (1 - alpha) * q.cost + 2 * alpha * (const - 2 * cross)
            neg_k = (g * (-1.0 / epsilon)).masked_fill(~valid, -math.inf)
            budget = inner_iter if alpha > 0 else outer_iter * inner_iter
            log_plan, lu, lv = _unbalanced_projection(neg_k, q, lu, lv, phi_a, phi_b, budget)
            plan = log_plan.exp()
        return plan, lu, lv

    if grad == "envelope":
        with torch.no_grad():
            detached = p.detached()
            plan, lu, lv = solve(detached)
    else:
        plan, lu, lv = solve(p)
    # the Gromov term at the plan's own marginals (not a, b)
    transport_cost = objective(p, plan, plan, alpha=alpha, epsilon=epsilon, entropy=False)[1]
    r, c = plan.sum(2), plan.sum(1)
    ref = p.a[:, :, None] * p.b[:, None, :]
    value = transport_cost + epsilon * _kl_mass(plan.flatten(1), ref.flatten(1), valid.flatten(1))
    if tau_a is not None:
        value = value + tau_a * _kl_mass(r, p.a, p.row_valid)
    if tau_b is not None:
        value = value + tau_b * _kl_mass(c, p.b, p.col_valid)
    iterations = torch.full((cost.shape[0],), outer_iter, dtype=torch.int64, device=cost.device)
    error = marginal_error(
        plan.detach(), None if tau_a is not None else p.a, None if tau_b is not None else p.b
    )
    result = TransportResult(plan=plan, value=value, log_u=lu, log_v=lv, iterations=iterations,
                             transport_cost=transport_cost, marginal_error=error)  # fmt: skip
    return in_given_units(result, p)
