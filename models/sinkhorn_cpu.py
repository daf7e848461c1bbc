"""The kernel-domain Sinkhorn iterations of `models.transport`, compiled for the CPU with numba.

On the CPU a call of the FGW solver at the sizes of our batches (N ~ 128 frames, M ~ 24 tokens, B ~ 32) is
made of ~1,300 small torch operations, and the inner iterations (two batched matrix-vector products and two
divisions each, 200 per call) cost 2-3 us of dispatch per operation for a few microseconds of arithmetic.
Here one compiled call runs all the iterations of one projection, item by item, each item's (M, N) kernel
staying in the L1/L2 cache: the same arithmetic in the same order per element, float32 products accumulated
in float32 as torch's bmm does.

Numba compiles each dtype (float32, float64) on first use, a few seconds, and caches the machine code on disk
(``cache=True``: next to this file, or in the user's cache folder where that is not writable).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

# "reassoc" lets LLVM vectorise the sums; no assumption of finite values (a scaling that under- or overflows
# must stay non-finite, as in torch: `models.transport._run` looks for it), and division by zero gives inf
# (error_model="numpy") instead of raising
_FAST = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def _row_sums(kt: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    """out (N,) = K v for K = kt^T, kt (M, N), v (M,); four columns of K per pass over out."""
    m, n = kt.shape
    m4 = m - m % 4
    out[:] = 0
    for j in range(0, m4, 4):
        k0, k1, k2, k3 = kt[j], kt[j + 1], kt[j + 2], kt[j + 3]
        v0, v1, v2, v3 = v[j], v[j + 1], v[j + 2], v[j + 3]
        for i in range(n):
            out[i] += k0[i] * v0 + k1[i] * v1 + k2[i] * v2 + k3[i] * v3
    for j in range(m4, m):
        kj, vj = kt[j], v[j]
        for i in range(n):
            out[i] += kj[i] * vj


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def _column_update(kt: np.ndarray, u: np.ndarray, b: np.ndarray, pad_b: np.ndarray, out: np.ndarray) -> None:
    """out (M,) = b / (K^T u + pad_b) for K = kt^T, kt (M, N), u (N,); four dot products per pass over u."""
    m, n = kt.shape
    m4 = m - m % 4
    for j in range(0, m4, 4):
        k0, k1, k2, k3 = kt[j], kt[j + 1], kt[j + 2], kt[j + 3]
        s0 = s1 = s2 = s3 = u[0] * 0
        for i in range(n):
            x = u[i]
            s0 += k0[i] * x
            s1 += k1[i] * x
            s2 += k2[i] * x
            s3 += k3[i] * x
        out[j] = b[j] / (s0 + pad_b[j])
        out[j + 1] = b[j + 1] / (s1 + pad_b[j + 1])
        out[j + 2] = b[j + 2] / (s2 + pad_b[j + 2])
        out[j + 3] = b[j + 3] / (s3 + pad_b[j + 3])
    for j in range(m4, m):
        kj = kt[j]
        s = u[0] * 0
        for i in range(n):
            s += kj[i] * u[i]
        out[j] = b[j] / (s + pad_b[j])


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def _iterate(
    kernel_t: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    pad_a: np.ndarray,
    pad_b: np.ndarray,
    u_cold: np.ndarray,
    try_cold: np.ndarray,
    n: int,
    rows_last: bool,
    u: np.ndarray,
    v: np.ndarray,
) -> None:
    """In place: u (B, N), v (B, M). kernel_t (B, M, N) is the kernel K (B, N, M) transposed; see
    `scaling_iterations` for the rest."""
    batch, m, nn = kernel_t.shape
    ones = np.ones(nn, dtype=kernel_t.dtype)
    kv = np.empty(nn, dtype=kernel_t.dtype)
    kv_cold = np.empty(nn, dtype=kernel_t.dtype)
    v_cold = np.empty(m, dtype=kernel_t.dtype)
    for k in range(batch):
        kt, ak, pk, uk, vk = kernel_t[k], a[k], pad_a[k], u[k], v[k]
        uk[:] = ak
        _column_update(kt, ones, b[k], pad_b[k], vk)  # the warm start: from u = 1
        _row_sums(kt, vk, kv)
        if try_cold[k]:
            # the cold start on the same kernel, from u = u_cold; keep the start whose row sums u0 * K v are
            # nearer a (L1) after it
            _column_update(kt, u_cold[k], b[k], pad_b[k], v_cold)
            _row_sums(kt, v_cold, kv_cold)
            err_warm = err_cold = kv[0] * 0
            for i in range(nn):
                err_warm += abs(kv[i] - ak[i])
                err_cold += abs(u_cold[k, i] * kv_cold[i] - ak[i])
            if err_cold < err_warm:
                vk[:] = v_cold
                kv[:] = kv_cold
        for it in range(n):
            if it > 0:
                _row_sums(kt, vk, kv)
            for i in range(nn):
                uk[i] = ak[i] / (kv[i] + pk[i])
            if rows_last and it == n - 1:
                break
            _column_update(kt, uk, b[k], pad_b[k], vk)


def scaling_iterations(
    kernel_t: Tensor,
    a: Tensor,
    b: Tensor,
    pad_a: Tensor | None,
    pad_b: Tensor | None,
    u_cold: Tensor | None,
    try_cold: Tensor | None,
    n: int,
    rows_last: bool,
) -> tuple[Tensor, Tensor]:
    """Sinkhorn scalings of the kernel K = kernel_t^T on marginals a, b, as `models.transport._project_kernel`
    runs them: a column update from u = 1 (and, where ``try_cold`` is set, also from u = u_cold, keeping the
    start with the smaller L1 row error after it), then ``n`` times a row and a column update, the last column
    update left out with ``rows_last``.

    kernel_t (B, M, N), a (B, N), b (B, M), pad_a (B, N) and pad_b (B, M) (1 at padded entries, added to the
    divisors so that padded scalings stay finite; None: no padding), u_cold (B, N), try_cold (B,) bool (both
    None: warm start only); CPU tensors of one dtype, float32 or float64, not requiring grad. Returns u (B, N)
    and v (B, M), the scalings with plan = u[:, :, None] * K * v[:, None, :] (at padded entries u, v are
    a / pad = 0 and b / pad = 0).
    """
    batch, m, n_rows = kernel_t.shape
    dtype = kernel_t.dtype

    def arr(x: Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
        """x as a numpy view (a copy only if not contiguous); None: zeros of ``shape``."""
        return (torch.zeros(shape, dtype=dtype) if x is None else x.detach().contiguous()).numpy()

    u = torch.empty(batch, n_rows, dtype=dtype)
    v = torch.empty(batch, m, dtype=dtype)
    cold = np.zeros(batch, dtype=np.bool_) if try_cold is None else try_cold.contiguous().numpy()
    _iterate(
        arr(kernel_t, ()),
        arr(a, (batch, n_rows)),
        arr(b, (batch, m)),
        arr(pad_a, (batch, n_rows)),
        arr(pad_b, (batch, m)),
        arr(u_cold, (batch, n_rows)),
        cold,
        n,
        rows_last,
        u.numpy(),
        v.numpy(),
    )
    return u, v
