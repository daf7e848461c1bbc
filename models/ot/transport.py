"""Batched, ragged, entropic optimal transport in PyTorch: Sinkhorn and fused Gromov-Wasserstein (FGW).

A batch holds B independent problems of different sizes, padded to (N, M). Padding is zero marginal weight:
``a`` (B, N) and ``b`` (B, M) each sum to one over their valid entries and are 0 elsewhere; the returned plan
is exactly 0 at padded rows and columns, and so are the gradients there.

Conventions follow POT 0.9.7 (``ot.sinkhorn_log``, ``ot.gromov.entropic_fused_gromov_wasserstein``,
``ot.batch.solve_gromov_batch``) so that plans agree with it:

- FGW objective, square loss: ``(1 - alpha) <C, T> + alpha * sum_ijkl (D^A_ik - D^L_jl)^2 T_ij T_kl``;
- outer step: ``G_k = (1 - alpha) C + 2 alpha L(D^A, D^L) (x) T_k`` (Peyre et al. 2016, Prop. 1:
  ``L (x) T = (D^A)^2 a 1^T + 1 ((D^L)^2 b)^T - 2 D^A T (D^L)^T``, O(N^2 M + N M^2) per step), then
  ``T_{k+1}`` = entropic OT of cost ``G_k`` (``pgd``, mirror descent) or of ``G_k - epsilon log T_k``
  (``ppa``, proximal point, as POT's batch solver does); ``T_0 = a b^T``.

This module is that outer loop and the solvers' entry points. The room's other modules hold the rest: the
problem set-up, input checks and cost scaling (`models.ot.problem`), one Sinkhorn projection in the kernel
or the log domain (`models.ot.projection`), the objective and its gradients (`models.ot.objective`), the
unbalanced solver (`models.ot.unbalanced`). Projections run in the kernel domain; items whose scalings
under- or overflowed (non-finite potentials) are solved again in the log domain after the loop. With a
fixed budget (``tol=None``) nothing inside the loop synchronises with the host; with ``tol`` the per-item
check runs every ``check_every`` steps, items that met it stop changing, and the loop ends once all have.

Where a pgd projection starts (``start``, see `STARTS`): by default each item takes, at each outer step,
the previous step's potentials or zero ones, whichever leaves the smaller row error after the first column
update. Both starts run on the same kernel: the cold one is a row scaling of it, so the choice costs two
more matrix-vector products. Warm starts alone lose accuracy where the plan jumps between outer steps (POT's
entropic GW test problem at epsilon <= 1e-2), cold starts alone where it moves little (random cosine costs
at small budgets); the choice is as accurate as the better of the two on both.

Iteration counts. A projection of ``n`` iterations is a column update then ``n`` row-and-column updates
(pgd, sinkhorn: columns exact); ppa leaves the last column update out, so that it ends on the rows as POT
does and ``inner_iter=n`` is POT's ``numItermax=n`` (rows exact).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .objective import objective
from .problem import (
    Problem,
    TransportResult,
    build_problem,
    in_given_units,
    is_symmetric,
    marginal_error,
    row_products,
)
from .projection import LOG2E, masked, project_kernel, project_log

__all__ = [
    "CONVERGENCE_TOL",
    "STARTS",
    "TransportResult",
    "fused_gromov_wasserstein",
    "marginal_error",
    "sinkhorn",
    "warn_unconverged",
]

_SOLVERS = ("pgd", "ppa")
_DOMAINS = ("auto", "kernel", "log")

# Where each pgd projection starts. "warm": the previous projection's potentials; "cold": zero (POT's
# default); "auto": per item and outer step, whichever of the two leaves the smaller row error after the
# first half-iteration. Warm starts win on problems whose plan moves little between outer steps (random
# cosine costs at epsilon 0.01..0.1: 10-20x closer to the exact iterates at 20-100 iterations); cold
# starts win where it jumps (POT's test problem at epsilon 1e-2: 2.6e-7 against 1.2e-5 from them at
# 1000 iterations). ppa always starts cold: its kernel holds the previous plan.
STARTS = ("auto", "warm", "cold")


# ----------------------------------------------------------------------------------------------------------
# the outer loop shared by sinkhorn (constant kernel) and FGW (linearised kernel)


@dataclass(frozen=True)
class _Spec:
    """What to iterate: shared by `sinkhorn` (alpha=0, steps of check_every) and FGW."""

    alpha: float
    epsilon: float
    steps: tuple[int, ...]  # Sinkhorn iterations per outer step
    prox: bool  # add log T_k to the kernel (proximal point; its value then has no entropic term)
    symmetric: bool
    criterion: str  # "marginal" (sinkhorn) or "plan" (FGW)
    check_every: int  # in outer steps
    tol: float | None
    domain: str  # "auto", "kernel" or "log" as asked; `_run` gets "kernel" or "log"
    start: str = "warm"  # potentials each projection starts from: "warm", "cold" or "auto" (see STARTS)


def _log_plan(log_k: Tensor, f: Tensor, g: Tensor, p: Problem) -> Tensor:
    """log T = log_k + f + g at valid entries, 0 at padded ones (finite everywhere)."""
    return masked(log_k + f[:, :, None] + g[:, None, :], p.valid, 0.0)


def _transposed_storage(x: Tensor) -> Tensor:
    """x (B, N, M) with its storage laid out as (B, M, N) (a copy unless it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _linearised(base: Tensor, plan: Tensor, p: Problem, scale: float, symmetric: bool) -> Tensor:
    """log kernel of one FGW outer step, ``base + scale * D^A T (D^L)^T`` (+ ``scale * (D^A)^T T D^L`` for
    non-symmetric structures): (B, N, M) stored as (B, M, N).

    Computed as its transpose, ``base^T + scale * (D^L T^T) (D^A)^T``: the small product first, then one
    product with the (B, N, N) structure that adds into base as it writes (a third faster on the CPU than
    ``base + (T^T D^A) ...``, whose extra pass over a fresh (B, M, N) tensor misses the cache).
    """
    sa, sb = p.struct_a, p.struct_b
    assert sa is not None and sb is not None
    plan_t = plan.transpose(1, 2)
    # symmetric: D^A itself in place of (D^A)^T, the operand layout MKL multiplies fastest
    sa_t = sa if symmetric else sa.transpose(1, 2)
    log_k_t = torch.baddbmm(base.transpose(1, 2), torch.bmm(sb, plan_t), sa_t, alpha=scale)
    if not symmetric:
        log_k_t = torch.baddbmm(log_k_t, torch.bmm(sb.transpose(1, 2), plan_t), sa, alpha=scale)
    return log_k_t.transpose(1, 2)


def _linearised_at_product(base: Tensor, p: Problem, scale: float, symmetric: bool) -> Tensor:
    """`_linearised` at the first plan ``a b^T``, where ``D^A T (D^L)^T = (D^A a)(D^L b)^T`` has rank one:
    two matrix-vector products and an outer product instead of a (B, N, N) matrix product."""
    sa, sb = p.struct_a, p.struct_b
    assert sa is not None and sb is not None
    a_row, b_row = p.a.unsqueeze(1), p.b.unsqueeze(1)  # (B, 1, N), (B, 1, M)
    # (D a)^T = a^T D^T, as row-vector products (the fast orientation of the CPU bmm)
    log_k_t = torch.baddbmm(
        base.transpose(1, 2),
        torch.bmm(b_row, sb.transpose(1, 2)).transpose(1, 2),
        torch.bmm(a_row, sa.transpose(1, 2)),
        alpha=scale,
    )
    if not symmetric:
        log_k_t = torch.baddbmm(
            log_k_t, torch.bmm(b_row, sb).transpose(1, 2), torch.bmm(a_row, sa), alpha=scale
        )
    return log_k_t.transpose(1, 2)


def _quadratic_parts(p: Problem, spec: _Spec, unit: float) -> Tensor:
    """Constant part of -G/epsilon, times ``unit`` (log2 e for bits): (B, N, M)."""
    alpha, eps = spec.alpha, spec.epsilon
    if alpha == 0:
        return p.cost * (-unit / eps)
    sa, sb = p.struct_a, p.struct_b
    assert sa is not None and sb is not None
    unrolled = torch.is_grad_enabled() and (sa.requires_grad or sb.requires_grad)
    if spec.symmetric and not unrolled:
        const_a, const_b = p.square_products(p.a, p.b)
    else:
        sq_a, sq_b = (sa * sa, sb * sb) if unrolled else p.squares()
        if not spec.symmetric:
            sq_a = 0.5 * (sq_a + sq_a.transpose(1, 2))
            sq_b = 0.5 * (sq_b + sq_b.transpose(1, 2))
        const_a, const_b = row_products(sq_a, sq_b)(p.a, p.b)
    const = const_a[:, :, None] + const_b[:, None, :]
    return torch.add(p.cost * (-(1 - alpha) * unit / eps), const, alpha=-2 * alpha * unit / eps)


def _run(p: Problem, spec: _Spec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Iterate; returns plan, log plan, f, g (potentials of the last kernel), iterations (B,), ok (B,).

    The kernel domain works in bits (log_k, potentials and log plans scaled by log2 e, the padded entries of
    log_k at -inf); what is returned is in nats. Kernels and plans are (B, N, M) tensors stored as (B, M, N),
    so that the reductions over rows and the row-vector products of the projection are contiguous.
    """
    kernel = spec.domain == "kernel"
    project = project_kernel if kernel else project_log
    unit = LOG2E if kernel else 1.0
    batch = p.cost.shape[0]
    base = _transposed_storage(_quadratic_parts(p, spec, unit))
    if kernel:
        base = masked(base, p.valid, -math.inf)
    quadratic = spec.alpha != 0
    scale = unit * ((4 * spec.alpha / spec.epsilon) if spec.symmetric else (2 * spec.alpha / spec.epsilon))
    plan = (p.b[:, :, None] * p.a[:, None, :]).transpose(1, 2)
    log_plan = masked((p.log_b[:, :, None] + p.log_a[:, None, :]).transpose(1, 2) * unit, p.valid, 0.0)
    f: Tensor | None = None
    g = torch.zeros_like(p.b)
    iterations = torch.zeros(batch, dtype=torch.int64, device=p.cost.device)
    ok = torch.ones(batch, dtype=torch.bool, device=p.cost.device)
    active = torch.ones(batch, dtype=torch.bool, device=p.cost.device) if spec.tol is not None else None
    log_k = last_k = base
    for step, n in enumerate(spec.steps):
        if quadratic and step == 0:
            log_k = _linearised_at_product(base, p, scale, spec.symmetric)
        elif quadratic:
            log_k = _linearised(base, plan, p, scale, spec.symmetric)
        if spec.prox:
            log_k = log_k + log_plan
        f0 = None if spec.prox or spec.start == "cold" else f
        restart = spec.start == "auto" and quadratic and not spec.prox
        new_plan, new_f, new_g, step_ok = project(log_k, f0, p, n, restart=restart, rows_last=spec.prox)
        new_log_plan = _log_plan(log_k, new_f, new_g, p) if spec.prox else log_plan
        if active is None:
            iterations += n if spec.criterion == "marginal" else 1
            ok = ok if step_ok is None else ok & step_ok
            plan, log_plan, f, g, last_k = new_plan, new_log_plan, new_f, new_g, log_k
            continue
        # tolerance mode: frozen items keep their state; the check (one host sync) runs every check_every
        keep = active
        iterations += keep.long() * (n if spec.criterion == "marginal" else 1)
        ok = ok if step_ok is None else ok & (step_ok | ~keep)
        last_step = step == len(spec.steps) - 1
        if (step + 1) % spec.check_every == 0 or last_step:
            if spec.criterion == "marginal":
                err = (new_plan.sum(2) - p.a).abs().sum(1)
            else:
                err = (new_plan - plan).abs().amax(dim=(1, 2))
            active = active & ~(err <= spec.tol)
        plan = torch.where(keep[:, None, None], new_plan, plan)
        log_plan = torch.where(keep[:, None, None], new_log_plan, log_plan)
        last_k = torch.where(keep[:, None, None], log_k, last_k)
        f = new_f if f is None else torch.where(keep[:, None], new_f, f)
        g = torch.where(keep[:, None], new_g, g)
        if (step + 1) % spec.check_every == 0 and not last_step and not bool(active.any()):
            break
    assert f is not None
    ok = ok & torch.isfinite(f).all(dim=1) & torch.isfinite(g).all(dim=1)
    if not spec.prox:
        log_plan = _log_plan(last_k, f, g, p)
    if kernel:
        f, g, log_plan = f * (1.0 / unit), g * (1.0 / unit), log_plan * (1.0 / unit)
    return plan.contiguous(), log_plan, f, g, iterations, ok


def _solve(p: Problem, spec: _Spec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_run` in spec's domain; under "auto", items whose kernel-domain run failed rerun in the log domain.
    Returns plan, log plan, f, g, iterations as `_run` does."""
    out = _run(p, dataclasses.replace(spec, domain="log" if spec.domain == "log" else "kernel"))
    ok = out[5]
    if spec.domain == "auto" and not bool(ok.all()):
        idx = (~ok).nonzero().squeeze(1)
        sub = _run(p.subset(idx), dataclasses.replace(spec, domain="log"))
        out = tuple(full.index_put((idx,), part) for full, part in zip(out, sub, strict=True))
    return out[0], out[1], out[2], out[3], out[4]


def _finish(p: Problem, spec: _Spec, grad: str) -> TransportResult:
    """Solve ``p`` as ``spec`` says, without a graph (``grad="envelope"``) or through the iterations
    ("unrolled"), and evaluate the objective at the plan; value and transport cost in the given units."""
    if grad == "envelope":
        with torch.no_grad():
            detached = p.detached()
            plan, log_plan, f, g, iterations = _solve(detached, spec)
    else:
        plan, log_plan, f, g, iterations = _solve(p, spec)
    value, cost = objective(p, plan, log_plan, alpha=spec.alpha, epsilon=spec.epsilon, entropy=not spec.prox)
    error = marginal_error(plan.detach(), p.a, p.b)
    result = TransportResult(plan=plan, value=value, log_u=f, log_v=g, iterations=iterations,
                             transport_cost=cost, marginal_error=error)  # fmt: skip
    return in_given_units(result, p)


_WARNED: set[str] = set()
CONVERGENCE_TOL = 1e-3
"""Marginal error (L1, plans of mass 1) above which `warn_unconverged` warns."""


def _checked(result: TransportResult, check: bool | None, validate: bool, what: str) -> TransportResult:
    """Apply the `check_convergence` policy of the public solvers to a result and return it."""
    if check is None:
        check = validate and result.plan.device.type == "cpu"
    if check:
        warn_unconverged(result, CONVERGENCE_TOL, what, stacklevel=4)  # the solver's caller
    return result


def warn_unconverged(
    result: TransportResult, threshold: float = CONVERGENCE_TOL, what: str = "transport", stacklevel: int = 2
) -> list[int]:
    """Warn, once per `what`, when items' marginal error is above `threshold`, naming them (as POT warns
    when its iterations run out); returns those items. One host synchronisation: call it where that is
    free (a CPU) or wanted (a check on a GPU), not in a training step on a GPU."""
    if result.marginal_error is None:
        return []
    bad = torch.nonzero(result.marginal_error > threshold).flatten().tolist()
    if bad and what not in _WARNED:
        _WARNED.add(what)
        worst = float(result.marginal_error.max())
        warnings.warn(
            f"{what}: {len(bad)} item(s) did not converge within the iteration budget (marginal error up to "
            f"{worst:.2e} > {threshold:g}; items {bad[:10]}{' ...' if len(bad) > 10 else ''}); raise the "
            "iterations or epsilon",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return bad


# ----------------------------------------------------------------------------------------------------------
# public API


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    epsilon: float = 0.1,
    *,
    max_iter: int = 100,
    tol: float | None = None,
    check_every: int = 10,
    grad: str = "envelope",
    domain: str = "auto",
    validate: bool = True,
    check_convergence: bool | None = None,
    scale_cost: str | None = None,
) -> TransportResult:
    """Entropic optimal transport for a batch of ragged problems.

    Solves ``min_T <C, T> + epsilon KL(T || a b^T)`` subject to ``T 1 = a``, ``T^T 1 = b`` (the plan of
    ``ot.sinkhorn_log(a, b, C, epsilon)``).

    Args:
        cost: (B, N, M) cost matrices; entries at padded positions are ignored (must be finite).
        a: (B, N) source weights, each row summing to 1, 0 at padding; None = uniform over all N.
        b: (B, M) target weights, likewise; None = uniform over all M.
        epsilon: entropic regularisation (> 0).
        max_iter: Sinkhorn iterations (a fixed budget when ``tol`` is None: no host synchronisation).
        tol: optional per-item stop on the L1 error of the row marginals (columns are exact after each
            iteration), checked every ``check_every`` iterations.
        check_every: the interval of the tolerance check, and of re-absorbing the potentials into the
            kernel (the stabilisation of the kernel-domain iterations).
        grad: "envelope" (solve without a graph; ``value`` rebuilt from the detached plan so gradients
            reach ``cost``) or "unrolled" (autograd through the iterations).
        domain: "auto" (kernel domain, log-domain rerun for items that under/overflow), "kernel" (no
            fallback), or "log" (logsumexp iterations throughout).
        validate: check the inputs' values (finite costs and structures, non-negative marginals summing to 1:
            host synchronisations on a GPU) and look for padding; False trusts them (a caller that built
            them, such as models.nn.transfer_loss), so that with ``tol`` None and ``domain`` "kernel" or "log"
            nothing synchronises; "auto" still checks once, after the iterations, whether an item needs the
            rerun.
        check_convergence: warn (once per function, naming the items) when an item's marginal error is
            above CONVERGENCE_TOL; None checks on the CPU when ``validate`` (free there) and never on a GPU,
            where it would synchronise; True / False always / never. The error is in the result either way.
        scale_cost: None (the cost as given) or "std": each item's cost is divided by its spread s (the
            standard deviation over its valid entries, detached, floored at 1e-3; as ott-jax's geometries
            scale theirs), which solves the given problem at epsilon * s, so that the plan's sharpness does
            not depend on the cost's scale. ``value`` and ``transport_cost`` are in the given cost's units;
            ``log_u``, ``log_v`` are the potentials over epsilon * s.

    Returns:
        TransportResult; ``iterations`` counts Sinkhorn iterations per item. float16/bfloat16 inputs are
        computed and returned in float32.
    """
    if domain not in _DOMAINS:
        raise ValueError(f"domain: must be one of {_DOMAINS}, got {domain!r}")
    iters = {"max_iter": max_iter, "check_every": check_every}
    p = build_problem(cost, None, None, a, b, epsilon=epsilon, grad=grad, iters=iters, tol=tol,
                      validate=validate, scale_cost=scale_cost)  # fmt: skip
    steps = [check_every] * (max_iter // check_every)
    if max_iter % check_every:
        steps.append(max_iter % check_every)
    spec = _Spec(
        alpha=0.0,
        epsilon=float(epsilon),
        steps=tuple(steps),
        prox=False,
        symmetric=True,
        criterion="marginal",
        check_every=1,
        tol=tol,
        domain=domain,
    )
    return _checked(_finish(p, spec, grad), check_convergence, validate, "sinkhorn")


def fused_gromov_wasserstein(
    cost: Tensor,
    struct_a: Tensor,
    struct_b: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    alpha: float = 0.5,
    epsilon: float = 0.1,
    *,
    outer_iter: int = 10,
    inner_iter: int = 20,
    solver: str = "pgd",
    tol: float | None = None,
    check_every: int = 10,
    grad: str = "envelope",
    domain: str = "auto",
    symmetric: bool | None = None,
    validate: bool = True,
    check_convergence: bool | None = None,
    start: str = "auto",
    scale_cost: str | None = None,
) -> TransportResult:
    """Entropic fused Gromov-Wasserstein (square loss) for a batch of ragged problems.

    Objective ``(1 - alpha) <C, T> + alpha sum_ijkl (D^A_ik - D^L_jl)^2 T_ij T_kl`` as in POT, minimised by
    ``outer_iter`` linearisations, each followed by a Sinkhorn projection of ``inner_iter`` iterations:
    ``pgd`` projects ``G_k`` (fixed points: the entropic FGW of
    ``ot.gromov.entropic_fused_gromov_wasserstein(..., solver="PGD")``); ``ppa`` projects
    ``G_k - epsilon log T_k`` (POT's "PPA" and ``ot.batch.solve_gromov_batch``; epsilon is then a step size
    and fixed points are those of the unregularised problem). With ``alpha=0`` and ``pgd`` the iterates
    are exactly those of ``sinkhorn(cost, max_iter=outer_iter * inner_iter, check_every=inner_iter)``.

    Args:
        cost: (B, N, M) node cost C.
        struct_a: (B, N, N) structure D^A of the source graphs (finite; padded entries ignored).
        struct_b: (B, M, M) structure D^L of the target graphs.
        a: (B, N) source weights (rows sum to 1, 0 at padding); None = uniform over all N.
        b: (B, M) target weights; None = uniform over all M.
        alpha: weight of the Gromov-Wasserstein term, in [0, 1].
        epsilon: entropic regularisation (pgd) or proximal step (ppa), > 0.
        outer_iter: linearisation (outer) steps.
        inner_iter: Sinkhorn iterations per outer step.
        solver: "pgd" or "ppa".
        tol: optional per-item stop on the largest absolute change of the plan between outer steps,
            checked every ``check_every`` outer steps; converged items stop changing.
        check_every: interval of the tolerance check, in outer steps.
        grad: "envelope" (default) or "unrolled", as in `sinkhorn`; gradients reach cost, struct_a and
            struct_b (not a, b).
        domain: "auto", "kernel" or "log", as in `sinkhorn`.
        symmetric: whether the structures are symmetric; None checks once before the loop. Non-symmetric
            structures use the symmetrised gradient, as POT does.
        validate, check_convergence: as in `sinkhorn`.
        scale_cost: as in `sinkhorn`; with "std" the structures are divided by sqrt(s) (the Gromov term is
            quadratic in them), so that epsilon * s regularises the whole FGW objective.
        start: where each pgd projection starts: "auto" (per item and step, the warm or the cold start,
            whichever leaves the smaller row error after the first half-iteration: as accurate as the better
            of the two on every problem tried, for two more matrix-vector products per outer step), "warm"
            (the previous projection's potentials) or "cold" (zero potentials, as POT does). ppa starts
            cold. In the kernel domain "auto" can offer the cold start only while an item's potentials span
            at most 32 bits in float32 (480 in float64; the problems tried stay under 13 in float32); items
            beyond are solved again in the log domain under ``domain="auto"``, and keep the warm start under
            ``domain="kernel"``.

    Returns:
        TransportResult; ``iterations`` counts outer steps per item.
    """
    if domain not in _DOMAINS:
        raise ValueError(f"domain: must be one of {_DOMAINS}, got {domain!r}")
    if not isinstance(solver, str) or solver.lower() not in _SOLVERS:
        raise ValueError(f"solver: must be one of {_SOLVERS}, got {solver!r}")
    if start not in STARTS:
        raise ValueError(f"start: must be one of {STARTS}, got {start!r}")
    solver = solver.lower()
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
    if struct_a is None or struct_b is None:
        raise ValueError("struct_a, struct_b: both structure matrices are required")
    iters = {"outer_iter": outer_iter, "inner_iter": inner_iter, "check_every": check_every}
    p = build_problem(cost, struct_a, struct_b, a, b, epsilon=epsilon, grad=grad, iters=iters, tol=tol,
                      validate=validate, scale_cost=scale_cost)  # fmt: skip
    if symmetric is None:
        symmetric = is_symmetric(p.struct_a) and is_symmetric(p.struct_b)  # type: ignore[arg-type]
    spec = _Spec(
        alpha=float(alpha),
        epsilon=float(epsilon),
        steps=(inner_iter,) * outer_iter,
        prox=solver == "ppa",
        symmetric=bool(symmetric),
        criterion="plan",
        check_every=check_every,
        tol=tol,
        domain=domain,
        start=start,
    )
    result = _finish(p, spec, grad)
    return _checked(result, check_convergence, validate, "fused_gromov_wasserstein")
