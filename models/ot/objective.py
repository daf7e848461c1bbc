"""The FGW objective at a plan, and its gradients: ``(1 - alpha) <C, T> + alpha sum_ijkl (D^A_ik - D^L_jl)^2
T_ij T_kl`` (square loss, POT's ``fgw_dist``), plus the entropic term where the solver has one. Under
``grad="envelope"`` the plan is fixed and the gradients in the cost and the structures are written out
(`FusedCost`) rather than taken by autograd through the expression.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import Problem, SquareProducts, row_products

__all__ = ["FusedCost", "objective"]


def _inner(x: Tensor, y: Tensor) -> Tensor:
    """Per-item inner products <x, y> of two (B, ...) tensors: (B,), with no temporary of their size when
    both are contiguous (one batched matrix-vector product)."""
    batch = x.shape[0]
    return torch.bmm(x.reshape(batch, 1, -1), y.reshape(batch, -1, 1)).view(batch)


def _fgw_cost(
    cost: Tensor, sa: Tensor, sb: Tensor, plan: Tensor, alpha: float, square_products: SquareProducts
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(1 - alpha) <C, T> + alpha sum_ijkl (D^A_ik - D^L_jl)^2 T_ij T_kl`` (B,) at plan T (B, N, M), from
    the structures and the products of the plan's marginals with their squares; also returns D^A T and
    T D^L (B, N, M) and the marginals r (B, N), c (B, M), which the gradients reuse."""
    r, c = plan.sum(2), plan.sum(1)
    at, tb = torch.bmm(sa, plan), torch.bmm(plan, sb)
    rs_a, cs_b = square_products(r, c)
    quad = (rs_a * r).sum(1) + (cs_b * c).sum(1)
    return (1 - alpha) * _inner(cost, plan) + alpha * (quad - 2 * _inner(at, tb)), at, tb, r, c


class FusedCost(torch.autograd.Function):
    """``(1 - alpha) <C, T> + alpha sum_ijkl (D^A_ik - D^L_jl)^2 T_ij T_kl`` (B,) at a fixed plan T, with its
    gradients in C, D^A and D^L written out: ``(1 - alpha) T``, ``2 alpha (D^A * r r^T - T D^L T^T)`` and
    ``2 alpha (D^L * c c^T - T^T D^A T)`` (r, c the plan's marginals). Autograd through the expression
    takes twice as many passes over the (B, N, N) tensors, each with an allocation of its own."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, cost: Tensor, sa: Tensor, sb: Tensor, plan: Tensor, alpha: float, square_products: SquareProducts
    ) -> Tensor:
        value, at, tb, r, c = _fgw_cost(cost, sa, sb, plan, alpha, square_products)
        ctx.save_for_backward(sa, sb, plan, at, tb, r, c)
        ctx.alpha = alpha
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        sa, sb, plan, at, tb, r, c = ctx.saved_tensors
        alpha = ctx.alpha
        g2 = (2 * alpha) * grad
        grad_cost = grad_sa = grad_sb = None
        if ctx.needs_input_grad[0]:
            grad_cost = plan * ((1 - alpha) * grad)[:, None, None]
        if ctx.needs_input_grad[1]:
            # one (B, N, N) allocation: 2 alpha g D^A * r r^T, then - 2 alpha g T D^L T^T added in place
            grad_sa = (sa * (g2[:, None] * r)[:, :, None]).mul_(r[:, None, :])
            grad_sa.baddbmm_(tb * (-g2)[:, None, None], plan.transpose(1, 2))
        if ctx.needs_input_grad[2]:
            grad_sb = (sb * (g2[:, None] * c)[:, :, None]).mul_(c[:, None, :])
            grad_sb.baddbmm_(plan.transpose(1, 2) * (-g2)[:, None, None], at)
        return grad_cost, grad_sa, grad_sb, None, None, None


def objective(
    p: Problem, plan: Tensor, log_plan: Tensor, *, alpha: float, epsilon: float, entropy: bool
) -> tuple[Tensor, Tensor]:
    """(value, transport_cost), both (B,), of problem ``p`` at ``plan`` (B, N, M) with the plan's own
    marginals; ``log_plan`` (B, N, M), its log at valid entries, serves the entropic term
    ``epsilon KL(plan || a b^T)``, added to the value where ``entropy``. Both are in the solved problem's
    units (see `models.ot.problem.in_given_units`)."""
    if alpha == 0:
        cost = (p.cost * plan).sum(dim=(1, 2))
    else:
        sa, sb = p.struct_a, p.struct_b
        assert sa is not None and sb is not None
        if plan.requires_grad:  # grad="unrolled": autograd also through the plan
            cost = _fgw_cost(p.cost, sa, sb, plan, alpha, row_products(sa * sa, sb * sb))[0]
        else:
            cost = FusedCost.apply(p.cost, sa, sb, plan, alpha, p.square_products)
    if not entropy:
        return cost, cost
    kl = (plan * (log_plan - p.log_a[:, :, None] - p.log_b[:, None, :])).sum(dim=(1, 2))
    return cost + epsilon * kl, cost
