"""One Sinkhorn projection of a batch: absorb the previous row potentials, then ``n`` iterations, in the
kernel domain (`project_kernel`) or the log domain (`project_log`). `models.ot.transport` runs one per
outer step.

Kernels and plans are (B, N, M) tensors stored as (B, M, N), so that the reductions over rows and the
row-vector products run over contiguous memory. A kernel-domain projection starts by absorbing the previous
row potentials into the log kernel and scaling each column's largest entry to 1, with one base-2 exponential
per step (on the CPU exp2 is several times faster than exp, so the kernel domain keeps its logs in bits); it
then iterates on scaling vectors (two batched matrix-vector products per iteration, no exponentials; on the
CPU the whole projection is two numba-compiled calls and one exponential, `models.ot._sinkhorn_cpu`, where
torch would spend more time dispatching its small operations than computing). Scalings that under- or
overflow leave non-finite potentials, which stay so; the log domain (logsumexp iterations) stays finite at
epsilon 1e-3.

Iteration counts: a projection of ``n`` iterations is a column update then ``n`` row-and-column updates;
with ``rows_last`` the last column update is left out, so that it ends on the rows as POT does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import compiled_kernels, compiled_loop_for
from .problem import Problem

__all__ = ["LOG2E", "masked", "project_kernel", "project_log"]

LOG2E = 1.0 / math.log(2.0)


# The kernel-domain projection offers an item the cold start as a row scaling u0 = 2^-(f - max f) of the
# warm kernel (see project_kernel). That is exact while products of the kernel with u0 and the scalings it
# leads to stay clear of underflow, i.e. while f spans at most (-log2(tiny) - 62) / 2 bits: 32 in float32,
# 480 in float64. Potentials of the problems tried span under 13 bits (float32 at epsilon >= 0.01) and up
# to 231 (float64, epsilon 1e-3).
def _cold_range_bits(dtype: torch.dtype) -> float:
    min_exponent = math.log2(torch.finfo(dtype).tiny)  # -126 (float32), -1022 (float64)
    return float((-min_exponent - 62) // 2)


def masked(x: Tensor, keep: Tensor | None, fill: float) -> Tensor:
    """x with `fill` where the bool mask `keep` (broadcast to x) is False; x itself for keep None."""
    return x if keep is None else x.masked_fill(~keep, fill)


def _padded(x: Tensor, pad: Tensor | None) -> Tensor:
    """x + pad (1 at padded entries, so that divisions by sums there stay finite); None: no padding."""
    return x if pad is None else x + pad


def _row_error(row_sums: Tensor, p: Problem) -> Tensor:
    """L1 error of row sums (B, N) against a, over valid rows: (B,)."""
    return masked((row_sums - p.a).abs(), p.row_valid if p.valid is not None else None, 0.0).sum(1)


def project_kernel(
    log_k: Tensor, f: Tensor | None, p: Problem, n: int, restart: bool = False, rows_last: bool = False
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
    every later step (a non-finite plan makes the next kernel NaN), and `models.ot.transport` checks the
    final ones.
    """
    # without autograd the kernel and then the plan are made in one buffer (allocations of fresh pages cost
    # as much as the passes themselves on the CPU)
    in_place = not (torch.is_grad_enabled() and (log_k.requires_grad or (f is not None and f.requires_grad)))
    if in_place and compiled_loop_for(log_k):
        limit = _cold_range_bits(log_k.dtype) if restart else None
        return compiled_kernels().project(
            log_k_t=log_k.transpose(1, 2), f=f, a=p.a, b=p.b, pad_a=p.pad_a, pad_b=p.pad_b, cold_limit=limit,
            n=n, rows_last=rows_last,
        )  # fmt: skip
    shift = None
    if f is not None:
        shift = f - masked(f, p.row_valid if p.valid is not None else None, -math.inf).amax(1, keepdim=True)
        shift = masked(shift, p.row_valid if p.valid is not None else None, 0.0)  # <= 0
        log_k = log_k + shift[:, :, None]
    col_max = log_k.amax(dim=1)  # a contiguous reduction: log_k is stored as (B, M, N)
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


def project_log(
    log_k: Tensor, f: Tensor | None, p: Problem, n: int, restart: bool = False, rows_last: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Same projection as `project_kernel` with logsumexp iterations in nats (finite for any epsilon)."""
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
    plan = masked(torch.exp(log_k + f[:, :, None] + g[:, None, :]), p.valid, 0.0)
    return plan, f, g, None
