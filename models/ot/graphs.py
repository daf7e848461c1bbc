"""Node costs and structure (edge) matrices of padded sequence graphs, for the GM-OT transport problems.

Every function takes padded batches with a boolean validity mask and returns tensors that are exactly 0 at
padded entries, with zero gradient there, so they can be fed to `models.ot.transport` with marginals from
`uniform_marginal`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["STRUCTURE_KINDS", "cosine_cost", "structure_matrix", "temporal_positions", "uniform_marginal"]

STRUCTURE_KINDS = ("cosine", "temporal", "hybrid")
_NORM_EPS = 1e-8


def _check_mask(x: Tensor, mask: Tensor, name: str) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a (B, N, D) tensor, got shape {tuple(x.shape)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}_mask: expected shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def _unit(x: Tensor, mask: Tensor) -> Tensor:
    """Rows scaled to unit norm, zero at padding (zero rows stay zero)."""
    return F.normalize(x * mask.unsqueeze(-1).to(x.dtype), dim=-1, eps=_NORM_EPS)


def cosine_cost(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """Cosine node cost between two padded batches.

    Args:
        x: (B, N, D) source node features; y: (B, M, D) target node features.
        x_mask: (B, N) bool, True at valid nodes; y_mask: (B, M) bool.

    Returns:
        (B, N, M) ``1 - cos(x_i, y_j)`` in [0, 2] at valid pairs, exactly 0 where either node is padded.
        A zero feature vector has cosine 0 with everything (cost 1).
    """
    x_mask = _check_mask(x, x_mask, "x")
    y_mask = _check_mask(y, y_mask, "y")
    if y.dim() != 3 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
        raise ValueError(f"y: expected shape (B={x.shape[0]}, M, D={x.shape[2]}), got {tuple(y.shape)}")
    cos = torch.bmm(_unit(x, x_mask), _unit(y, y_mask).transpose(1, 2))
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    return torch.where(valid, 1 - cos, torch.zeros_like(cos))


def temporal_positions(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Positions ``i / (L - 1)`` in [0, 1] of each sequence's valid nodes (0 for a length-1 sequence).

    Args:
        mask: (B, N) bool; valid nodes are assumed to be a prefix (standard right padding).

    Returns:
        (B, N) positions, 0 at padding.
    """
    mask = mask.to(torch.bool)
    lengths = mask.sum(-1, keepdim=True).to(dtype)
    index = torch.arange(mask.shape[1], device=mask.device, dtype=dtype).expand(mask.shape)
    positions = index / (lengths - 1).clamp_min(1)
    return torch.where(mask, positions, torch.zeros_like(positions))


def structure_matrix(x: Tensor, mask: Tensor, kind: str = "cosine", mix: float = 0.5) -> Tensor:
    """Intra-sequence structure matrix D (the graph's edges) of a padded batch.

    Args:
        x: (B, N, D) node features (only the shape, dtype and device matter for ``temporal``).
        mask: (B, N) bool, True at valid nodes (a prefix of each row).
        kind: ``cosine``: ``D_ik = 1 - cos(x_i, x_k)``; ``temporal``: ``D_ik = |t_i - t_k|`` with positions
            normalised to [0, 1] by each sequence's own length (`temporal_positions`); ``hybrid``:
            ``mix * cosine + (1 - mix) * temporal``.
        mix: weight of the cosine part for ``hybrid``, in [0, 1].

    Returns:
        (B, N, N) symmetric, 0 on padded rows and columns; differentiable w.r.t. ``x`` for cosine/hybrid.
    """
    if kind not in STRUCTURE_KINDS:
        raise ValueError(f"kind: must be one of {STRUCTURE_KINDS}, got {kind!r}")
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix: must be in [0, 1], got {mix!r}")
    mask = _check_mask(x, mask, "x")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    parts: list[tuple[float, Tensor]] = []
    if kind in ("cosine", "hybrid"):
        cos = cosine_cost(x, x, mask, mask)
        cos = 0.5 * (cos + cos.transpose(1, 2))  # exactly symmetric (the solver checks for symmetry)
        parts.append((1.0 if kind == "cosine" else float(mix), cos))
    if kind in ("temporal", "hybrid"):
        t = temporal_positions(mask, dtype)
        valid = mask[:, :, None] & mask[:, None, :]
        dist = (t[:, :, None] - t[:, None, :]).abs()
        parts.append((1.0 if kind == "temporal" else 1.0 - float(mix), torch.where(valid, dist, 0.0)))
    out = parts[0][1] if parts[0][0] == 1.0 else parts[0][0] * parts[0][1]
    for weight, part in parts[1:]:
        out = out + weight * part
    return out


def uniform_marginal(mask: Tensor, dtype: torch.dtype = torch.float32, check: bool = True) -> Tensor:
    """Uniform weights over each row's valid entries.

    Args:
        mask: (B, N) bool (or 0/1), True at valid entries; every row needs at least one.
        dtype: floating dtype of the result.
        check: raise for a row without a valid entry (a host synchronisation on a GPU); without the check
            such a row comes out NaN.

    Returns:
        (B, N) weights ``1 / L_b`` at valid entries, 0 at padding; each row sums to 1.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask: expected a (B, N) tensor, got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    counts = mask.sum(-1, keepdim=True)
    if check and bool((counts == 0).any()):
        row = int((counts.squeeze(-1) == 0).nonzero()[0, 0])
        raise ValueError(f"mask: row {row} has no valid entry")
    return mask.to(dtype) / counts.to(dtype)
