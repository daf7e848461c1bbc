"""The kernel-domain Sinkhorn projection of `models.ot.projection`, compiled for the CPU with numba.

On the CPU a call of the FGW solver at the sizes of our batches (N ~ 128 frames, M ~ 24 tokens, B ~ 32) was
made of ~1,300 small torch operations (572 now), and the inner iterations (two batched matrix-vector
products and two divisions each, 200 per call) cost 2-3 us of dispatch per operation for a few microseconds
of arithmetic. Here a projection is two compiled calls and one torch exponential (`project`): the first
absorbs the previous potentials into the exponent and finds each column's maximum, the second runs all the
iterations and turns the scalings into the plan and the potentials, item by item, each item's (M, N) kernel
staying in the L1/L2 cache. The arithmetic is torch's, summed in another order: float32 products accumulated
in float32, as torch's bmm does. `weighted_squares` serves the constant term and the objective.

Numba compiles each dtype on first use (about 8 s for float32, 5 s for float64) and caches the machine code
on disk (``cache=True``: next to this file, or in the user's cache folder where that is not writable).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit
from torch import Tensor

# "reassoc" lets LLVM vectorise the sums; no assumption of finite values (a scaling that under- or overflows
# must stay non-finite, as in torch: `models.ot.transport._run` looks for it), and division by zero gives inf
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
        # a zero of u's dtype: with an int 0, numba makes float32 sums float64 (a third of the speed)
        s0 = s1 = s2 = s3 = u[0] * np.float32(0)
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
        s = u[0] * np.float32(0)
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
    shift: np.ndarray,
    col_max: np.ndarray,
    f: np.ndarray,
    g: np.ndarray,
) -> None:
    """Sinkhorn scalings of the kernel K = kernel_t^T on marginals a, b, in place in u (B, N) and v (B, M):
    a column update from u = 1 (and, where ``try_cold`` is set, also from u = u_cold, keeping the start with
    the smaller L1 row error after it), then ``n`` times a row and a column update, the last column update
    left out with ``rows_last``; then, while the item's kernel is in cache, kernel_t becomes the plan
    v[j] * K[j, i] * u[i] (in place), and f (B, N) = shift + log2 u and g (B, M) = log2 v - col_max are the
    potentials in bits.

    kernel_t (B, M, N); a (B, N), b (B, M); pad_a (B, N) and pad_b (B, M), 1 at padded entries, added to the
    divisors so that padded scalings stay finite (u, v are then a / pad = 0 and b / pad = 0 there, and the
    logs are taken of u + pad, v + pad: 0); u_cold (B, N); try_cold (B,) bool; shift (B, N) and col_max
    (B, M) from `_absorb`.
    """
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
            err_warm = err_cold = kv[0] * np.float32(0)
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
        for j in range(m):
            row, vj = kt[j], vk[j]
            for i in range(nn):
                row[i] = row[i] * uk[i] * vj
            g[k, j] = np.log2(vj + pad_b[k, j]) - col_max[k, j]
        for i in range(nn):
            f[k, i] = shift[k, i] + np.log2(uk[i] + pk[i])


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def _absorb(
    log_k_t: np.ndarray,
    f: np.ndarray,
    warm: bool,
    pad_a: np.ndarray,
    pad_b: np.ndarray,
    cold_limit: float,
    out: np.ndarray,
    out_bits: np.ndarray,
    bit_consts: np.ndarray,
    shift: np.ndarray,
    col_max: np.ndarray,
    cold_exponent: np.ndarray,
    try_cold: np.ndarray,
) -> None:
    """In place: out (B, M, N) = log_k_t + shift (over rows) - col_max (over columns), the exponent of the
    kernel; shift (B, N), col_max (B, M), cold_exponent (B, N) = min(-shift, cold_limit), try_cold (B,).

    out_bits is out viewed as signed integers of its width; bit_consts holds, in that integer type, the sign
    shift (31 or 63), the magnitude mask, and the keys of +inf and -inf. A float's key ``x ^ ((x >> 31) &
    mask)`` orders as the float does, and integer maxima vectorise where LLVM leaves float maxima scalar;
    keys above +inf's are NaNs with the sign bit clear, keys below -inf's NaNs with it set (the default NaN
    of x86), so one pass finds the column maximum and whether the column holds a NaN or +inf.
    """
    batch, m, nn = log_k_t.shape
    consts = np.empty(4, dtype=out.dtype)  # constants in the arrays' dtype, so that loops stay in it
    consts[0], consts[1], consts[2], consts[3] = -np.inf, 0.0, cold_limit, np.nan
    ninf, zero, limit, nan = consts[0], consts[1], consts[2], consts[3]
    sign, mask, key_inf, key_ninf = bit_consts[0], bit_consts[1], bit_consts[2], bit_consts[3]
    scratch = np.empty(1, dtype=out.dtype)
    scratch_bits = scratch.view(out_bits.dtype)
    for k in range(batch):
        sk, pa = shift[k], pad_a[k]
        if warm:
            top = ninf
            for i in range(nn):
                if pa[i] == 0 and f[k, i] > top:
                    top = f[k, i]
            spread = zero
            for i in range(nn):
                sk[i] = f[k, i] - top if pa[i] == 0 else zero  # <= 0
                spread = max(spread, -sk[i])
            if limit > 0:
                try_cold[k] = spread <= limit
                for i in range(nn):
                    cold_exponent[k, i] = min(-sk[i], limit)
        else:
            sk[:] = zero
        for j in range(m):
            row, dst, bits = log_k_t[k, j], out[k, j], out_bits[k, j]
            for i in range(nn):
                dst[i] = row[i] + sk[i]
            high, low = key_ninf, key_inf
            for i in range(nn):
                x = bits[i]
                key = x ^ ((x >> sign) & mask)
                high = key if key > high else high
                low = key if key < low else low
            if high >= key_inf or low < key_ninf:  # NaN or +inf: NaN, as torch's amax
                top = nan
            elif pad_b[k, j] != 0:  # a padded column: all -inf, shifted by 0
                top = zero
            else:
                scratch_bits[0] = high ^ ((high >> sign) & mask)
                top = scratch[0]
            col_max[k, j] = top
            for i in range(nn):
                dst[i] -= top


_BITS = {
    torch.float32: np.array([31, 0x7FFFFFFF, 0x7F800000, -0x7F800001], dtype=np.int32),
    torch.float64: np.array(
        [63, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, -0x7FF0000000000001], dtype=np.int64
    ),
}
"""Per dtype, for `_absorb`: sign shift, magnitude mask, keys of +inf and -inf (signed integers)."""


def _array(x: Tensor) -> np.ndarray:
    """x as a numpy view (a copy only if not contiguous)."""
    return x.detach().contiguous().numpy()


def project(
    log_k_t: Tensor,
    f: Tensor | None,
    a: Tensor,
    b: Tensor,
    pad_a: Tensor | None,
    pad_b: Tensor | None,
    cold_limit: float | None,
    n: int,
    rows_last: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One kernel-domain Sinkhorn projection of 2^log_k as `models.ot.projection.project_kernel` makes it, in
    three steps over the batch: the previous row potentials f are absorbed into the exponent, shifted so that
    each column's largest entry is 0 (compiled); one exponential (torch, vectorised); then the iterations
    and the plan and potentials from their scalings (compiled, `_iterate`).

    log_k_t (B, M, N): the exponent in bits, transposed (-inf at padded entries), not modified; f (B, N) row
    potentials in bits (None: cold start); a (B, N), b (B, M) marginals; pad_a (B, N), pad_b (B, M) 1 at
    padded entries (None: no padding); cold_limit: where given (and f is), each item also tries the cold
    start u0 = 2^-(f - max f) while f spans at most cold_limit bits. CPU tensors of one dtype, float32 or
    float64, not requiring grad.

    Returns plan (B, N, M) (a transposed view of a fresh (B, M, N) tensor), f (B, N) and g (B, M), the new
    potentials in bits (0 at padding, ``plan = 2^(log_k + f + g)`` at valid entries), and ok: (B,) bool,
    False where f spanned more than cold_limit bits (those items kept the warm start), or None without a
    cold start to try.
    """
    batch, m, nn = log_k_t.shape
    dtype = log_k_t.dtype
    np_dtype = _NP_DTYPES[dtype]
    warm = f is not None
    limit = cold_limit if warm and cold_limit is not None else 0.0
    pa = _zeros(batch, nn, np_dtype) if pad_a is None else _array(pad_a)
    pb = _zeros(batch, m, np_dtype) if pad_b is None else _array(pad_b)
    kernel = np.empty((batch, m, nn), dtype=np_dtype)
    # one allocation for the (B, N) vectors and one for the (B, M) ones
    shift, u_cold, u, f_new = np.empty((4, batch, nn), dtype=np_dtype)
    col_max, v, g_new = np.empty((3, batch, m), dtype=np_dtype)
    try_cold = np.zeros(batch, dtype=np.bool_)
    bits = _BITS[dtype]
    f_np = _array(f) if f is not None else shift  # (not read without f)
    _absorb(_array(log_k_t), f_np, warm, pa, pb, limit, kernel, kernel.view(bits.dtype), bits, shift, col_max,
            u_cold, try_cold)  # fmt: skip
    kernel_t = torch.from_numpy(kernel).exp2_()
    if limit > 0:
        torch.from_numpy(u_cold).exp2_()
    a_np, b_np = _array(a), _array(b)
    _iterate(kernel, a_np, b_np, pa, pb, u_cold, try_cold, n, rows_last, u, v, shift, col_max, f_new, g_new)
    ok = torch.from_numpy(try_cold) if limit > 0 else None
    return kernel_t.transpose(1, 2), torch.from_numpy(f_new), torch.from_numpy(g_new), ok


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@functools.lru_cache(maxsize=16)
def _zeros(rows: int, cols: int, dtype: type) -> np.ndarray:
    """A (rows, cols) array of zeros, the padding of a batch without any, made once per shape (never written:
    the compiled functions only read their pads)."""
    return np.zeros((rows, cols), dtype=dtype)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def _weighted_squares(s: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """In place: out (B, N) = w^T (s * s) per item, s (B, N, N), w (B, N); four rows of s per pass."""
    batch, n, _ = s.shape
    n4 = n - n % 4
    for k in range(batch):
        o, wk = out[k], w[k]
        o[:] = 0
        for r in range(0, n4, 4):
            s0, s1, s2, s3 = s[k, r], s[k, r + 1], s[k, r + 2], s[k, r + 3]
            w0, w1, w2, w3 = wk[r], wk[r + 1], wk[r + 2], wk[r + 3]
            for i in range(n):
                o[i] += w0 * s0[i] * s0[i] + w1 * s1[i] * s1[i] + w2 * s2[i] * s2[i] + w3 * s3[i] * s3[i]
        for r in range(n4, n):
            sr, wr = s[k, r], wk[r]
            for i in range(n):
                o[i] += wr * sr[i] * sr[i]


def weighted_squares(s: Tensor, w: Tensor) -> Tensor:
    """w^T (s * s) per item, the row-vector product with the elementwise square of s, in one pass over s with
    no (B, N, N) temporary: s (B, N, N), w (B, N) -> (B, N); CPU tensors of one dtype, float32 or float64
    (s not modified; no gradient flows)."""
    out = np.empty(w.shape, dtype=_NP_DTYPES[s.dtype])
    _weighted_squares(_array(s), _array(w), out)
    return torch.from_numpy(out)
