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

How it is computed. Kernels and plans are (B, N, M) tensors stored as (B, M, N), so that the reductions over
rows and the row-vector products run over contiguous memory. Each Sinkhorn projection starts by absorbing
the previous row potentials into the log kernel and scaling each column's largest entry to 1, with one base-2
exponential per step (on the CPU exp2 is several times faster than exp, so the kernel domain keeps its logs in
bits); it then iterates in the kernel domain on scaling vectors (two batched matrix-vector products per
iteration, no exponentials; on the CPU the whole projection is two numba-compiled calls and one exponential,
`models.ot._sinkhorn_cpu`, where torch would spend more time dispatching its small operations than computing).
Scalings that under- or overflow leave non-finite potentials, which stay so: after the loop, items that
failed are solved again in the log domain (logsumexp iterations), which stays finite at epsilon 1e-3. With a
fixed budget (``tol=None``) nothing inside the loop synchronises with the host; with ``tol`` the per-item
check runs every ``check_every`` steps, items that met it stop changing, and the loop ends once all have.
The FGW value's gradients in the cost and the structures are written out (`_FusedCost`) rather than taken by
autograd through the expression.

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
import functools
import math
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TransportResult", "fused_gromov_wasserstein", "sinkhorn"]

_SOLVERS = ("pgd", "ppa")
_GRADS = ("envelope", "unrolled")
_DOMAINS = ("auto", "kernel", "log")
# Where each pgd projection starts. "warm": the previous projection's potentials; "cold": zero (POT's
# default); "auto": per item and outer step, whichever of the two leaves the smaller row error after the
# first half-iteration. Warm starts win on problems whose plan moves little between outer steps (random
# cosine costs at epsilon 0.01..0.1: 10-20x closer to the exact iterates at 20-100 iterations); cold
# starts win where it jumps (POT's test problem at epsilon 1e-2: 2.6e-7 against 1.2e-5 from them at
# 1000 iterations). ppa always starts cold: its kernel holds the previous plan.
STARTS = ("auto", "warm", "cold")
# How the CPU computes, when no autograd graph is kept, the kernel-domain projections and the products with
# the squared structures: "compiled" (numba, `models.ot._sinkhorn_cpu`; falls back to "torch" with a warning
# when numba cannot be imported) or "torch" (batched torch operations, as on a GPU and under
# grad="unrolled"). The environment variable GMOT_CPU_LOOP sets it at import.
_CPU_LOOPS = ("compiled", "torch")
CPU_LOOP = os.environ.get("GMOT_CPU_LOOP", "compiled")


# The kernel-domain projection offers an item the cold start as a row scaling u0 = 2^-(f - max f) of the
# warm kernel (see _project_kernel). That is exact while products of the kernel with u0 and the scalings it
# leads to stay clear of underflow, i.e. while f spans at most (-log2(tiny) - 62) / 2 bits: 32 in float32,
# 480 in float64. Potentials of the problems tried span under 13 bits (float32 at epsilon >= 0.01) and up
# to 231 (float64, epsilon 1e-3).
def _cold_range_bits(dtype: torch.dtype) -> float:
    min_exponent = math.log2(torch.finfo(dtype).tiny)  # -126 (float32), -1022 (float64)
    return float((-min_exponent - 62) // 2)


_LOG2E = 1.0 / math.log(2.0)


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
class _Problem:
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
        if _compiled_loop_for(self.struct_a):
            squares_of = _sinkhorn_cpu().weighted_squares
            return squares_of(self.struct_a, w_a), squares_of(self.struct_b, w_b)
        return _row_products(*self.squares())(w_a, w_b)

    def detached(self) -> _Problem:
        """The same problem with cost and structures detached from the autograd graph."""
        return dataclasses.replace(
            self,
            cost=self.cost.detach(),
            struct_a=None if self.struct_a is None else self.struct_a.detach(),
            struct_b=None if self.struct_b is None else self.struct_b.detach(),
        )

    def subset(self, idx: Tensor) -> _Problem:
        """The problems at batch indices ``idx`` (padding masks recomputed)."""
        return _make_problem(
            self.cost[idx],
            None if self.struct_a is None else self.struct_a[idx],
            None if self.struct_b is None else self.struct_b[idx],
            self.a[idx],
            self.b[idx],
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


def _make_problem(
    cost: Tensor,
    struct_a: Tensor | None,
    struct_b: Tensor | None,
    a: Tensor,
    b: Tensor,
    padded: bool | None = None,
) -> _Problem:
    """`padded`: whether any weight is 0 (None: look, one host synchronisation); True always works."""
    row_valid, col_valid = a > 0, b > 0
    has_pad = not (bool(row_valid.all()) and bool(col_valid.all())) if padded is None else padded
    valid = row_valid[:, :, None] & col_valid[:, None, :] if has_pad else None
    pad_a = (~row_valid).to(cost.dtype) if has_pad else None
    pad_b = (~col_valid).to(cost.dtype) if has_pad else None
    log_a = torch.where(row_valid, a, torch.ones_like(a)).log()
    log_b = torch.where(col_valid, b, torch.ones_like(b)).log()
    return _Problem(cost, struct_a, struct_b, a, b, log_a, log_b, row_valid, col_valid, valid, pad_a, pad_b)


def _validate(
    cost: Tensor,
    struct_a: Tensor | None,
    struct_b: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    epsilon: float,
    grad: str,
    iters: dict[str, int],
    tol: float | None,
    validate: bool = True,
) -> _Problem:
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
    if grad not in _GRADS:
        raise ValueError(f"grad: must be one of {_GRADS}, got {grad!r}")
    for name, value in iters.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol: must be None or a number > 0, got {tol!r}")
    cost_c = cost.to(dtype)
    if validate:
        a_c = _check_marginal(a, (batch, n), "a", cost_c)
        b_c = _check_marginal(b, (batch, m), "b", cost_c)
    else:  # trusted weights: only shapes are checked, nothing synchronises with the device
        a_c = _trusted_marginal(a, (batch, n), "a", cost_c)
        b_c = _trusted_marginal(b, (batch, m), "b", cost_c)
    sa = None if struct_a is None else struct_a.to(dtype)
    sb = None if struct_b is None else struct_b.to(dtype)
    return _make_problem(cost_c, sa, sb, a_c, b_c, padded=None if validate else True)


def _trusted_marginal(w: Tensor | None, shape: tuple[int, int], name: str, like: Tensor) -> Tensor:
    """A marginal taken as valid (shape checked, no value check), or the uniform one; detached."""
    if w is None:
        return torch.full(shape, 1.0 / shape[1], dtype=like.dtype, device=like.device)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(w.shape)}")
    return w.detach().to(device=like.device, dtype=like.dtype)


def _is_symmetric(s: Tensor) -> bool:
    """Exactly symmetric, or up to 1e-10 (float64; POT's test) / 1e-6 relative (float32)."""
    st = s.transpose(1, 2)
    if bool(torch.equal(s, st)):
        return True
    if s.dtype == torch.float64:
        return bool(torch.allclose(s, st, rtol=0, atol=1e-10))
    return bool(torch.allclose(s, st, rtol=0, atol=1e-6 * max(1.0, float(s.abs().max()))))


# ----------------------------------------------------------------------------------------------------------
# one Sinkhorn projection (absorb + `n` iterations), kernel domain and log domain


def _masked(x: Tensor, keep: Tensor | None, fill: float) -> Tensor:
    return x if keep is None else x.masked_fill(~keep, fill)


def _padded(x: Tensor, pad: Tensor | None) -> Tensor:
    """x + pad (1 at padded entries, so that divisions by sums there stay finite); None: no padding."""
    return x if pad is None else x + pad


def _row_error(row_sums: Tensor, p: _Problem) -> Tensor:
    """L1 error of row sums (B, N) against a, over valid rows: (B,)."""
    return _masked((row_sums - p.a).abs(), p.row_valid if p.valid is not None else None, 0.0).sum(1)


def _project_kernel(
    log_k: Tensor, f: Tensor | None, p: _Problem, n: int, restart: bool = False, rows_last: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Sinkhorn projection of 2^log_k on (a, b), kernel domain, from row potentials f (None: cold start).

    Everything in bits (base-2 logs; exp2 is several times faster than exp on the CPU). log_k (B, N, M), -inf
    at padded entries; f (B, N). The previous row potentials are absorbed into the kernel, which is scaled
    so that each column's largest entry is 1 (one exponential); the iterations then run on scaling vectors
    u (rows) and v (columns): a column update, then ``n`` times a row and a column update; with
    ``rows_last`` the last column update is left out, so that ``n`` iterations are POT's ``n`` (which end on
    the rows). The column potentials carry nothing forward: the first column update fixes them from f.

    With ``restart`` each item also tries the cold start: on the same kernel it is the row scaling
    u0 = 2^-(f - max f), and the item keeps whichever start leaves the smaller row error after the first
    column update. Where f spans more than `_cold_range_bits` that scaling would underflow; such items keep
    the warm start and are reported not ok, so that under domain "auto" the log domain solves them again
    with both starts exact. On the CPU without autograd the whole projection is
    `models.ot._sinkhorn_cpu.project` (two compiled calls and one exponential); the same arithmetic otherwise
    runs as torch operations. Returns plan (B, N, M), new f (B, N), new g (B, M) (bits, 0 at padding, ``plan =
    2^(log_k + f + g)`` at valid entries) and ok: None, or (B,) False for items so reported. Scalings that
    under/overflow are not looked for here: they leave non-finite potentials, which stay non-finite through
    every later step (a non-finite plan makes the next kernel NaN), and `_run` checks the final ones.
    """
    # without autograd the kernel and then the plan are made in one buffer (allocations of fresh pages cost
    # as much as the passes themselves on the CPU)
    in_place = not (torch.is_grad_enabled() and (log_k.requires_grad or (f is not None and f.requires_grad)))
    if in_place and _compiled_loop_for(log_k):
        limit = _cold_range_bits(log_k.dtype) if restart else None
        return _sinkhorn_cpu().project(
            log_k.transpose(1, 2), f, p.a, p.b, p.pad_a, p.pad_b, limit, n, rows_last
        )
    shift = None
    if f is not None:
        shift = f - _masked(f, p.row_valid if p.valid is not None else None, -math.inf).amax(1, keepdim=True)
        shift = _masked(shift, p.row_valid if p.valid is not None else None, 0.0)  # <= 0
        log_k = log_k + shift[:, :, None]
    col_max = log_k.amax(dim=1)  # a contiguous reduction: _run stores log_k as (B, M, N)
    if p.valid is not None:
        col_max = col_max.masked_fill(~p.col_valid, 0.0)
    if in_place and shift is not None:  # log_k is then this function's own tensor
        kernel = log_k.sub_(col_max[:, None, :]).exp2_()
    else:
        kernel = torch.exp2(log_k - col_max[:, None, :])
    # batched matrix-vector products as (1 x K) @ (K x L) row-vector products: with torch's CPU bmm this
    # orientation is an order of magnitude faster than (L x K) @ (K x 1). kernel_t is kernel's own storage
    # (no copy) when log_k is stored as (B, M, N).
    kernel_t = kernel.transpose(1, 2).contiguous()
    a, b = p.a.unsqueeze(1), p.b.unsqueeze(1)  # (B, 1, N), (B, 1, M)
    pad_a = None if p.pad_a is None else p.pad_a.unsqueeze(1)
    pad_b = None if p.pad_b is None else p.pad_b.unsqueeze(1)

    v = b / _padded(kernel.sum(1, keepdim=True), pad_b)  # the warm start's first column update
    kv = torch.bmm(v, kernel_t)
    ok = None
    if restart and shift is not None:
        spread, limit = -shift.unsqueeze(1), _cold_range_bits(log_k.dtype)  # (B, 1, N), >= 0
        ok = spread.amax(2).squeeze(1) <= limit
        u_cold = torch.exp2(spread.clamp(max=limit))
        v_cold = b / _padded(torch.bmm(u_cold, kernel), pad_b)
        kv_cold = torch.bmm(v_cold, kernel_t)
        # L1 row errors after the first column update (row sums u0 * K v; padded rows are 0 on both sides)
        err_warm = torch.linalg.vector_norm(kv - a, 1, dim=2, keepdim=True)
        err_cold = torch.linalg.vector_norm(u_cold * kv_cold - a, 1, dim=2, keepdim=True)
        pick = (err_cold < err_warm) & ok[:, None, None]
        v = torch.where(pick, v_cold, v)
        kv = torch.where(pick, kv_cold, kv)
    u = a
    for i in range(n):
        if i > 0:
            kv = torch.bmm(v, kernel_t)
        u = a / _padded(kv, pad_a)
        if rows_last and i == n - 1:
            break
        v = b / _padded(torch.bmm(u, kernel), pad_b)
    log_u = torch.log2(_padded(u, pad_a)).squeeze(1)
    log_v = torch.log2(_padded(v, pad_b)).squeeze(1)
    plan = kernel.mul_(u.transpose(1, 2)).mul_(v) if in_place else kernel * u.transpose(1, 2) * v
    return plan, log_u if shift is None else shift + log_u, log_v - col_max, ok


def _compiled_loop_for(kernel: Tensor) -> bool:
    """Whether the projections and square products of ``kernel``'s problem run in `models.ot._sinkhorn_cpu`
    (CPU, float32/64, numba importable, `CPU_LOOP` "compiled") rather than as torch operations."""
    if CPU_LOOP not in _CPU_LOOPS:
        raise ValueError(
            f"GMOT_CPU_LOOP / models.ot.transport.CPU_LOOP: must be one of {_CPU_LOOPS}, got {CPU_LOOP!r}"
        )
    if CPU_LOOP != "compiled" or kernel.device.type != "cpu":
        return False
    return kernel.dtype in (torch.float32, torch.float64) and _sinkhorn_cpu() is not None


@functools.cache
def _sinkhorn_cpu() -> types.ModuleType | None:
    """models.ot._sinkhorn_cpu, or None (with a warning, once) where numba cannot be imported."""
    try:
        from models.ot import _sinkhorn_cpu as sinkhorn_cpu
    except ImportError as err:
        warnings.warn(
            f"numba is not importable ({err}); the CPU Sinkhorn projections run as torch operations, "
            "and an FGW call takes up to 1.7x as long",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return sinkhorn_cpu


def _project_log(
    log_k: Tensor, f: Tensor | None, p: _Problem, n: int, restart: bool = False, rows_last: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Same projection as `_project_kernel` with logsumexp iterations in nats (finite for any epsilon)."""
    if p.valid is None:
        k_rows = k_cols = log_k
    else:
        # padded rows/columns are excluded from the other side's logsumexp with -inf; their own
        # logsumexp runs over finite zeros and its result is discarded, so no -inf - -inf appears.
        zero = torch.zeros_like(log_k)
        k_rows = torch.where(p.valid, log_k, torch.where(p.row_valid[:, :, None], -math.inf, zero))
        k_cols = torch.where(p.valid, log_k, torch.where(p.col_valid[:, None, :], -math.inf, zero))

    def col_update(f_: Tensor) -> Tensor:
        g_ = p.log_b - torch.logsumexp(k_cols + f_[:, :, None], dim=1)
        return g_ if p.valid is None else g_.masked_fill(~p.col_valid, 0.0)

    def row_update(g_: Tensor) -> Tensor:
        f_ = p.log_a - torch.logsumexp(k_rows + g_[:, None, :], dim=2)
        return f_ if p.valid is None else f_.masked_fill(~p.row_valid, 0.0)

    warm = f is not None
    f = torch.zeros_like(p.a) if f is None else f
    g = col_update(f)
    if restart and warm:

        def row_error(f_: Tensor, g_: Tensor) -> Tensor:
            return _row_error(torch.exp(torch.logsumexp(k_rows + g_[:, None, :], dim=2) + f_), p)

        f_cold = torch.zeros_like(f)
        g_cold = col_update(f_cold)
        pick = row_error(f_cold, g_cold) < row_error(f, g)
        f = f.masked_fill(pick[:, None], 0.0)
        g = torch.where(pick[:, None], g_cold, g)
    for i in range(n):
        f = row_update(g)
        if rows_last and i == n - 1:
            break
        g = col_update(f)
    plan = _masked(torch.exp(log_k + f[:, :, None] + g[:, None, :]), p.valid, 0.0)
    return plan, f, g, None


# ----------------------------------------------------------------------------------------------------------
# the outer loop shared by sinkhorn (constant kernel) and FGW (linearised kernel)


@dataclass
class _Spec:
    """What to iterate: shared by `sinkhorn` (alpha=0, steps of check_every) and FGW."""

    alpha: float
    epsilon: float
    steps: list[int]  # Sinkhorn iterations per outer step
    prox: bool  # add log T_k to the kernel (proximal point)
    symmetric: bool
    criterion: str  # "marginal" (sinkhorn) or "plan" (FGW)
    check_every: int  # in outer steps
    tol: float | None
    domain: str  # "kernel" or "log"
    start: str = "warm"  # potentials each projection starts from: "warm", "cold" or "auto" (see STARTS)


def _log_plan(log_k: Tensor, f: Tensor, g: Tensor, p: _Problem) -> Tensor:
    """log T = log_k + f + g at valid entries, 0 at padded ones (finite everywhere)."""
    return _masked(log_k + f[:, :, None] + g[:, None, :], p.valid, 0.0)


def _transposed_storage(x: Tensor) -> Tensor:
    """x (B, N, M) with its storage laid out as (B, M, N) (a copy unless it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _linearised(base: Tensor, plan: Tensor, p: _Problem, scale: float, symmetric: bool) -> Tensor:
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


def _linearised_at_product(base: Tensor, p: _Problem, scale: float, symmetric: bool) -> Tensor:
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


def _quadratic_parts(p: _Problem, spec: _Spec, unit: float) -> Tensor:
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
        const_a, const_b = _row_products(sq_a, sq_b)(p.a, p.b)
    const = const_a[:, :, None] + const_b[:, None, :]
    return torch.add(p.cost * (-(1 - alpha) * unit / eps), const, alpha=-2 * alpha * unit / eps)


def _run(p: _Problem, spec: _Spec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Iterate; returns plan, log plan, f, g (potentials of the last kernel), iterations (B,), ok (B,).

    The kernel domain works in bits (log_k, potentials and log plans scaled by log2 e, the padded entries of
    log_k at -inf); what is returned is in nats. Kernels and plans are (B, N, M) tensors stored as (B, M, N),
    so that the reductions over rows and the row-vector products of the projection are contiguous.
    """
    kernel = spec.domain == "kernel"
    project = _project_kernel if kernel else _project_log
    unit = _LOG2E if kernel else 1.0
    batch = p.cost.shape[0]
    base = _transposed_storage(_quadratic_parts(p, spec, unit))
    if kernel:
        base = _masked(base, p.valid, -math.inf)
    quadratic = spec.alpha != 0
    scale = unit * ((4 * spec.alpha / spec.epsilon) if spec.symmetric else (2 * spec.alpha / spec.epsilon))
    plan = (p.b[:, :, None] * p.a[:, None, :]).transpose(1, 2)
    log_plan = _masked((p.log_b[:, :, None] + p.log_a[:, None, :]).transpose(1, 2) * unit, p.valid, 0.0)
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
        new_plan, new_f, new_g, step_ok = project(log_k, f0, p, n, restart, rows_last=spec.prox)
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


def _solve(p: _Problem, spec: _Spec, domain: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run in the requested domain; under "auto", items whose kernel-domain run failed rerun in log domain."""
    out = _run(p, _replace(spec, domain="log" if domain == "log" else "kernel"))
    ok = out[5]
    if domain == "auto" and not bool(ok.all()):
        idx = (~ok).nonzero().squeeze(1)
        sub = _run(p.subset(idx), _replace(spec, domain="log"))
        out = tuple(full.index_put((idx,), part) for full, part in zip(out, sub, strict=True))
    return out[0], out[1], out[2], out[3], out[4]


def _replace(spec: _Spec, **changes: object) -> _Spec:
    values = dict(spec.__dict__)
    values.update(changes)
    return _Spec(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# objective


SquareProducts = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(r (B, N), c (B, M)) -> (r^T (D^A * D^A) (B, N), c^T (D^L * D^L) (B, M))."""


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


def _row_products(sq_a: Tensor, sq_b: Tensor) -> SquareProducts:
    """`SquareProducts` from given squares sq_a (B, N, N) and sq_b (B, M, M), as row-vector products (the
    fast orientation of the CPU bmm); differentiable where the squares and the weights are."""
    return lambda w_a, w_b: (
        torch.bmm(w_a.unsqueeze(1), sq_a).squeeze(1),
        torch.bmm(w_b.unsqueeze(1), sq_b).squeeze(1),
    )


class _FusedCost(torch.autograd.Function):
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


def _objective(
    p: _Problem, plan: Tensor, log_plan: Tensor, alpha: float, epsilon: float, entropy: bool
) -> tuple[Tensor, Tensor]:
    """(value, transport_cost), both (B,), evaluated at ``plan`` with the plan's own marginals."""
    if alpha == 0:
        cost = (p.cost * plan).sum(dim=(1, 2))
    else:
        sa, sb = p.struct_a, p.struct_b
        assert sa is not None and sb is not None
        if plan.requires_grad:  # grad="unrolled": autograd also through the plan
            cost = _fgw_cost(p.cost, sa, sb, plan, alpha, _row_products(sa * sa, sb * sb))[0]
        else:
            cost = _FusedCost.apply(p.cost, sa, sb, plan, alpha, p.square_products)
    if not entropy:
        return cost, cost
    kl = (plan * (log_plan - p.log_a[:, :, None] - p.log_b[:, None, :])).sum(dim=(1, 2))
    return cost + epsilon * kl, cost


def _finish(p: _Problem, spec: _Spec, domain: str, grad: str, entropy: bool) -> TransportResult:
    if grad == "envelope":
        with torch.no_grad():
            detached = p.detached()
            plan, log_plan, f, g, iterations = _solve(detached, spec, domain)
    else:
        plan, log_plan, f, g, iterations = _solve(p, spec, domain)
    value, cost = _objective(p, plan, log_plan, spec.alpha, spec.epsilon, entropy)
    error = marginal_error(plan.detach(), p.a, p.b)
    return TransportResult(plan, value, f, g, iterations, cost, error)


def marginal_error(plan: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """|T 1 - a|_1 + |T^T 1 - b|_1 per item (a side given as None is not counted): (B, N, M) -> (B,)."""
    error = plan.new_zeros(plan.shape[0])
    if a is not None:
        error = error + (plan.sum(2) - a).abs().sum(1)
    if b is not None:
        error = error + (plan.sum(1) - b).abs().sum(1)
    return error


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

    Returns:
        TransportResult; ``iterations`` counts Sinkhorn iterations per item. float16/bfloat16 inputs are
        computed and returned in float32.
    """
    if domain not in _DOMAINS:
        raise ValueError(f"domain: must be one of {_DOMAINS}, got {domain!r}")
    iters = {"max_iter": max_iter, "check_every": check_every}
    p = _validate(cost, None, None, a, b, epsilon, grad, iters, tol, validate)
    steps = [check_every] * (max_iter // check_every)
    if max_iter % check_every:
        steps.append(max_iter % check_every)
    spec = _Spec(0.0, float(epsilon), steps, False, True, "marginal", 1, tol, domain)
    return _checked(_finish(p, spec, domain, grad, entropy=True), check_convergence, validate, "sinkhorn")


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
    p = _validate(cost, struct_a, struct_b, a, b, epsilon, grad, iters, tol, validate)
    if symmetric is None:
        symmetric = _is_symmetric(p.struct_a) and _is_symmetric(p.struct_b)  # type: ignore[arg-type]
    spec = _Spec(
        float(alpha),
        float(epsilon),
        [inner_iter] * outer_iter,
        solver == "ppa",
        bool(symmetric),
        "plan",
        check_every,
        tol,
        domain,
        start,
    )
    result = _finish(p, spec, domain, grad, entropy=solver == "pgd")
    return _checked(result, check_convergence, validate, "fused_gromov_wasserstein")


# ----------------------------------------------------------------------------------------------------------
# unbalanced (KL-relaxed marginals), log domain


def _relaxed_fraction(tau: float | None, epsilon: float) -> float:
    """Exponent of the KL-relaxed Sinkhorn update: tau / (tau + epsilon); 1 (exact marginal) for None."""
    return 1.0 if tau is None else tau / (tau + epsilon)


def _unbalanced_projection(
    neg_k: Tensor, p: _Problem, lu: Tensor, lv: Tensor, phi_a: float, phi_b: float, n: int
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
) -> TransportResult:
    """Entropic transport with KL-relaxed marginals, batched and ragged, in the log domain.

    With alpha = 0 (structures may be None) it solves the entropic unbalanced OT problem
    ``min_T <C, T> + epsilon KL(T || a b^T) + tau_a KL(T 1 || a) + tau_b KL(T^T 1 || b)`` (the plan of
    ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, epsilon, reg_m=(tau_a, tau_b))``) by
    ``outer_iter * inner_iter`` generalised Sinkhorn iterations. ``tau_b=None`` (or ``tau_a=None``) keeps that
    marginal exact. With alpha > 0 the node cost is fused with the square-loss Gromov term as in
    `fused_gromov_wasserstein` (pgd): each outer step linearises the Gromov term at the current plan, using
    the plan's own marginals, and projects with ``inner_iter`` relaxed iterations (a linearised
    semi-relaxed FGW; docs/transfer.md).

    Args:
        cost: (B, N, M) node cost; struct_a (B, N, N), struct_b (B, M, M) structures (needed when alpha > 0).
        a, b: (B, N), (B, M) reference weights (rows sum to 1, 0 at padding); None = uniform.
        tau_a, tau_b: KL relaxation strengths (> 0) or None for an exact marginal.
        outer_iter, inner_iter: the iteration budget (fixed; no host synchronisation).
        grad: "envelope" or "unrolled", as in `sinkhorn`.
        validate: as in `sinkhorn` (this routine has no other synchronisation).

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
    p = _validate(cost, struct_a if alpha > 0 else None, struct_b if alpha > 0 else None, a, b, epsilon,
                  grad, iters, None, validate)  # fmt: skip
    phi_a, phi_b = _relaxed_fraction(tau_a, epsilon), _relaxed_fraction(tau_b, epsilon)
    valid = p.row_valid[:, :, None] & p.col_valid[:, None, :]

    def solve(q: _Problem) -> tuple[Tensor, Tensor, Tensor]:
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
    transport_cost = _objective(p, plan, plan, alpha, epsilon, entropy=False)[1]  # the plan's own marginals
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
    return TransportResult(plan, value, lu, lv, iterations, transport_cost, error)
