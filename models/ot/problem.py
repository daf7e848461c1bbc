"""The transport problem (the geometry, in ott-jax's terms): a batch's validated tensors in the compute dtype
with its padding masks (`Problem`), the optional scaling of the cost by its spread (``scale_cost``), the
squared structures' products, and the result record the solvers return (`TransportResult`).

A batch holds B independent problems of different sizes, padded to (N, M). Padding is zero marginal weight:
``a`` (B, N) and ``b`` (B, M) each sum to one over their valid entries and are 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import compiled_kernels, compiled_loop_for

__all__ = [
    "SCALE_COSTS",
    "Problem",
    "SquareProducts",
    "TransportResult",
    "build_problem",
    "cost_spread",
    "in_given_units",
    "is_symmetric",
    "make_problem",
    "marginal_error",
    "row_products",
]

GRADS = ("envelope", "unrolled")
SCALE_COSTS = (None, "std")
"""What ``scale_cost`` may be: None (the cost as given) or "std" (divided by each item's `cost_spread`)."""
SPREAD_FLOOR = 1e-3
"""The least spread `cost_spread` returns (a constant cost has no spread to scale by)."""

SquareProducts = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(r (B, N), c (B, M)) -> (r^T (D^A * D^A) (B, N), c^T (D^L * D^L) (B, M))."""


@dataclass
class TransportResult:
    """Result of a batched transport solve.

    plan: (B, N, M) transport plans, exactly 0 at padded rows/columns. Detached under ``grad="envelope"``;
        part of the autograd graph under ``grad="unrolled"``.
    value: (B,) the objective the solver minimises, differentiable per ``grad``: for ``sinkhorn`` and
        FGW ``pgd`` it is ``transport_cost + epsilon * KL(plan || a b^T)``; for FGW ``ppa`` (whose fixed
        points are those of the unregularised problem) it equals ``transport_cost``.
    log_u: (B, N) dual potential divided by epsilon (f / epsilon), 0 at padded rows.
    log_v: (B, M) dual potential divided by epsilon (g / epsilon), 0 at padded columns. At valid entries
        ``plan = exp(log_u[:, :, None] - G / epsilon + log_v[:, None, :])`` where ``G`` is the cost of the
        last Sinkhorn projection: ``cost`` for ``sinkhorn``, the linearised FGW cost ``G_k`` for ``pgd``, and
        ``G_k - epsilon log T_k`` for ``ppa``.
    iterations: (B,) int64, iterations used per item: Sinkhorn iterations for ``sinkhorn``, outer steps for
        ``fused_gromov_wasserstein``.
    transport_cost: (B,) ``(1 - alpha) <C, T> + alpha GW(T)`` without the entropic term (POT's
        ``fgw_dist``; ``<C, T>`` for ``sinkhorn``), differentiable like ``value``.
    marginal_error: (B,) detached L1 distance of the plan's marginals from ``a`` and ``b``,
        ``|T 1 - a|_1 + |T^T 1 - b|_1``: how far the fixed budget left each item from convergence (for
        unbalanced transport only the exact sides count).
    """

    plan: Tensor
    value: Tensor
    log_u: Tensor
    log_v: Tensor
    iterations: Tensor
    transport_cost: Tensor
    marginal_error: Tensor | None = None


@dataclass
class Problem:
    """Validated tensors of one batch in the compute dtype, with padding masks."""

    cost: Tensor  # (B, N, M)
    struct_a: Tensor | None  # (B, N, N)
    struct_b: Tensor | None  # (B, M, M)
    a: Tensor  # (B, N), detached
    b: Tensor  # (B, M), detached
    log_a: Tensor  # (B, N), 0 at padded rows
    log_b: Tensor  # (B, M), 0 at padded columns
    row_valid: Tensor  # (B, N) bool
    col_valid: Tensor  # (B, M) bool
    valid: Tensor | None  # (B, N, M) bool, None when nothing is padded
    pad_a: Tensor | None  # (B, N) 1.0 at padded rows (added to denominators), None when none
    pad_b: Tensor | None  # (B, M)
    scale: Tensor | None = None  # (B,) what the given cost was divided by (`scale_cost`), None: not scaled
    cache: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # shared with detached()

    def squares(self) -> tuple[Tensor, Tensor]:
        """Elementwise squares of struct_a (B, N, N) and struct_b (B, M, M), detached; computed once for
        the solve and the objective (each is a pass over a (B, N, N) tensor)."""
        assert self.struct_a is not None and self.struct_b is not None
        if "sq_a" not in self.cache:
            with torch.no_grad():
                self.cache["sq_a"], self.cache["sq_b"] = self.struct_a.square(), self.struct_b.square()
        return self.cache["sq_a"], self.cache["sq_b"]

    def square_products(self, w_a: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
        """Row-vector products with the squared structures, ``w_a^T (D^A * D^A)`` (B, N) and
        ``w_b^T (D^L * D^L)`` (B, M), detached: on the CPU one compiled pass over each structure (no squares
        are stored), elsewhere from `squares`."""
        assert self.struct_a is not None and self.struct_b is not None
        if compiled_loop_for(self.struct_a):
            squares_of = compiled_kernels().weighted_squares
            return squares_of(self.struct_a, w_a), squares_of(self.struct_b, w_b)
        return row_products(*self.squares())(w_a, w_b)

    def detached(self) -> Problem:
        """The same problem with cost and structures detached from the autograd graph."""
        return dataclasses.replace(
            self,
            cost=self.cost.detach(),
            struct_a=None if self.struct_a is None else self.struct_a.detach(),
            struct_b=None if self.struct_b is None else self.struct_b.detach(),
        )

    def subset(self, idx: Tensor) -> Problem:
        """The problems at batch indices ``idx`` (padding masks recomputed)."""
        return make_problem(
            self.cost[idx],
            None if self.struct_a is None else self.struct_a[idx],
            None if self.struct_b is None else self.struct_b[idx],
            self.a[idx],
            self.b[idx],
            scale=None if self.scale is None else self.scale[idx],
        )


# ----------------------------------------------------------------------------------------------------------
# validation


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise ValueError(f"cost: expected a floating point tensor, got dtype {dtype}")


def _check_finite(x: Tensor, name: str) -> None:
    # a NaN or an infinity makes the sum non-finite; the sum alone is a single pass, where isfinite(x).all()
    # costs 2 ns an element on the CPU; a finite sum that overflows is told apart by the exact check
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def _check_marginal(w: Tensor | None, shape: tuple[int, int], name: str, like: Tensor) -> Tensor:
    """Validate a marginal (B, n) or build the uniform one; returns it detached in ``like``'s dtype."""
    batch, n = shape
    if w is None:
        return torch.full((batch, n), 1.0 / n, dtype=like.dtype, device=like.device)
    if not torch.is_tensor(w) or tuple(w.shape) != (batch, n):
        got = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
        raise ValueError(f"{name}: expected shape {(batch, n)}, got {got}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {w.dtype}")
    _check_finite(w, name)
    if bool((w < 0).any()):
        raise ValueError(f"{name}: weights must be non-negative")
    tolerance = max(1e-5, 20 * torch.finfo(w.dtype).eps)
    sums = w.detach().to(torch.float64).sum(-1)
    bad = (sums - 1).abs() > tolerance
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        total = float(sums[row])
        raise ValueError(f"{name}: row {row} sums to {total:.8g}, expected 1 (tolerance {tolerance:g})")
    return w.detach().to(device=like.device, dtype=like.dtype)


def make_problem(
    cost: Tensor,
    struct_a: Tensor | None,
    struct_b: Tensor | None,
    a: Tensor,
    b: Tensor,
    padded: bool | None = None,
    scale: Tensor | None = None,
) -> Problem:
    """The problem of cost (B, N, M), structures (B, N, N) / (B, M, M) or None and marginals a (B, N),
    b (B, M) (taken as they are), with its padding masks. `padded`: whether any weight is 0 (None: look, one
    host synchronisation); True always works. `scale` (B,): what the cost was already divided by."""
    row_valid, col_valid = a > 0, b > 0
    has_pad = not (bool(row_valid.all()) and bool(col_valid.all())) if padded is None else padded
    valid = row_valid[:, :, None] & col_valid[:, None, :] if has_pad else None
    pad_a = (~row_valid).to(cost.dtype) if has_pad else None
    pad_b = (~col_valid).to(cost.dtype) if has_pad else None
    log_a = torch.where(row_valid, a, torch.ones_like(a)).log()
    log_b = torch.where(col_valid, b, torch.ones_like(b)).log()
    return Problem(
        cost=cost,
        struct_a=struct_a,
        struct_b=struct_b,
        a=a,
        b=b,
        log_a=log_a,
        log_b=log_b,
        row_valid=row_valid,
        col_valid=col_valid,
        valid=valid,
        pad_a=pad_a,
        pad_b=pad_b,
        scale=scale,
    )


def build_problem(
    cost: Tensor,
    struct_a: Tensor | None,
    struct_b: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    *,
    epsilon: float,
    grad: str,
    iters: dict[str, int],
    tol: float | None,
    validate: bool = True,
    scale_cost: str | None = None,
) -> Problem:
    """Check a solver's inputs and settings and build its problem in the compute dtype (float64 stays,
    other floating types become float32); ValueError names what is wrong.

    cost (B, N, M), struct_a (B, N, N) / struct_b (B, M, M) or None, a (B, N) / b (B, M) or None (uniform);
    `iters` the named iteration counts (each an integer >= 1). `validate` False checks shapes only and
    trusts the values (nothing synchronises with the device). `scale_cost` (see `SCALE_COSTS`) "std"
    divides each item's cost by its `cost_spread` s and the structures by sqrt(s) (the Gromov term is
    quadratic in them), so that solving at epsilon solves the given problem at epsilon * s; the solvers
    report values in the given units (`in_given_units`).
    """
    if not torch.is_tensor(cost) or cost.dim() != 3:
        got = tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__
        raise ValueError(f"cost: expected a (B, N, M) tensor, got {got}")
    dtype = _compute_dtype(cost.dtype)
    batch, n, m = cost.shape
    if batch == 0 or n == 0 or m == 0:
        raise ValueError(f"cost: empty shape {tuple(cost.shape)}")
    if validate:
        _check_finite(cost, "cost")
    for name, s, size in (("struct_a", struct_a, n), ("struct_b", struct_b, m)):
        if s is None:
            continue
        if not torch.is_tensor(s) or tuple(s.shape) != (batch, size, size):
            got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise ValueError(f"{name}: expected shape {(batch, size, size)}, got {got}")
        if not s.is_floating_point():
            raise ValueError(f"{name}: expected a floating point tensor, got dtype {s.dtype}")
        if validate:
            _check_finite(s, name)
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon: must be a finite number > 0, got {epsilon!r}")
    if grad not in GRADS:
        raise ValueError(f"grad: must be one of {GRADS}, got {grad!r}")
    for name, value in iters.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol: must be None or a number > 0, got {tol!r}")
    if scale_cost not in SCALE_COSTS:
        raise ValueError(f"scale_cost: must be one of {SCALE_COSTS}, got {scale_cost!r}")
    cost_c = cost.to(dtype)
    if validate:
        a_c = _check_marginal(a, (batch, n), "a", cost_c)
        b_c = _check_marginal(b, (batch, m), "b", cost_c)
    else:  # trusted weights: only shapes are checked, nothing synchronises with the device
        a_c = _trusted_marginal(a, (batch, n), "a", cost_c)
        b_c = _trusted_marginal(b, (batch, m), "b", cost_c)
    sa = None if struct_a is None else struct_a.to(dtype)
    sb = None if struct_b is None else struct_b.to(dtype)
    p = make_problem(cost_c, sa, sb, a_c, b_c, padded=None if validate else True)
    return p if scale_cost is None else _scaled_by_spread(p)


def _trusted_marginal(w: Tensor | None, shape: tuple[int, int], name: str, like: Tensor) -> Tensor:
    """A marginal taken as valid (shape checked, no value check), or the uniform one; detached."""
    if w is None:
        return torch.full(shape, 1.0 / shape[1], dtype=like.dtype, device=like.device)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(w.shape)}")
    return w.detach().to(device=like.device, dtype=like.dtype)


def is_symmetric(s: Tensor) -> bool:
    """Exactly symmetric, or up to 1e-10 (float64; POT's test) / 1e-6 relative (float32)."""
    st = s.transpose(1, 2)
    if bool(torch.equal(s, st)):
        return True
    if s.dtype == torch.float64:
        return bool(torch.allclose(s, st, rtol=0, atol=1e-10))
    return bool(torch.allclose(s, st, rtol=0, atol=1e-6 * max(1.0, float(s.abs().max()))))


# ----------------------------------------------------------------------------------------------------------
# scaling by the cost's spread


def cost_spread(cost: Tensor, valid: Tensor) -> Tensor:
    """Standard deviation of each item's cost over its valid entries: (B, N, M), (B, N, M) bool -> (B,),
    floored at `SPREAD_FLOOR`."""
    count = valid.sum(dim=(1, 2)).clamp(min=1)
    mean = (cost * valid).sum(dim=(1, 2)) / count
    var = (((cost - mean[:, None, None]) * valid) ** 2).sum(dim=(1, 2)) / count
    return var.sqrt().clamp(min=SPREAD_FLOOR)


def _scaled_by_spread(p: Problem) -> Problem:
    """``p`` with its cost divided by each item's (detached) spread s and its structures by sqrt(s)."""
    scale = cost_spread(p.cost.detach(), p.row_valid[:, :, None] & p.col_valid[:, None, :])
    root = scale.sqrt()[:, None, None]
    return dataclasses.replace(
        p,
        cost=p.cost / scale[:, None, None],
        struct_a=None if p.struct_a is None else p.struct_a / root,
        struct_b=None if p.struct_b is None else p.struct_b / root,
        scale=scale,
    )


def in_given_units(result: TransportResult, p: Problem) -> TransportResult:
    """The result of solving ``p`` with its value and transport cost (B,) in the units of the given cost
    (times p.scale, where `scale_cost` divided it)."""
    if p.scale is None:
        return result
    return dataclasses.replace(
        result, value=result.value * p.scale, transport_cost=result.transport_cost * p.scale
    )


# ----------------------------------------------------------------------------------------------------------
# products with the squared structures, the result's marginal error


def row_products(sq_a: Tensor, sq_b: Tensor) -> SquareProducts:
    """`SquareProducts` from given squares sq_a (B, N, N) and sq_b (B, M, M), as row-vector products (the
    fast orientation of the CPU bmm); differentiable where the squares and the weights are."""
    return lambda w_a, w_b: (
        torch.bmm(w_a.unsqueeze(1), sq_a).squeeze(1),
        torch.bmm(w_b.unsqueeze(1), sq_b).squeeze(1),
    )


def marginal_error(plan: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """|T 1 - a|_1 + |T^T 1 - b|_1 per item (a side given as None is not counted): (B, N, M) -> (B,)."""
    error = plan.new_zeros(plan.shape[0])
    if a is not None:
        error = error + (plan.sum(2) - a).abs().sum(1)
    if b is not None:
        error = error + (plan.sum(1) - b).abs().sum(1)
    return error
