"""The GM-OT knowledge-transfer loss (DESIGN 3.3): align adapted acoustic frames with PLM token features by
(fused Gromov-) Wasserstein optimal transport, and pull the acoustic features towards the PLM's.

For one utterance with adapted acoustic frames h_1..h_N and PLM token features z_1..z_M (standardised):
- node cost C_ij = 1 - cos(h_i, z_j) (+ tot_weight * |(i + 1/2)/N - (j + 1/2)/M|, the temporal-order prior);
- structures D^A (N x N) over h and D^L (M x M) over z: cosine, temporal or hybrid (models.graphs);
- plan T from the entropic FGW solver (mode fgw) or Sinkhorn (mode wd, alpha = 0) with uniform marginals;
- kt_ot: the transport objective at T (envelope gradients flow into C, D^A, D^L and so into h);
- kt_align: an alignment loss between z_j and the transported acoustic features h~_j = sum_i T_ij h_i / b_j.

The engine combines `loss = ctc + kt_weight * kt`; the model is trained, the PLM stays frozen.
Padded frames / tokens carry zero marginal weight: they get an exactly zero plan and zero gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import graphs, transport


@dataclass
class GMOTConfig:
    """Options of the knowledge-transfer loss (config section `gmot`; `gmot distill --mode/--alpha/...`)."""

    mode: Literal["none", "wd", "fgw"] = "fgw"
    """"none": no transfer (pretrain); "wd": Wasserstein only, entropic OT on the node cost (the earlier OT
    method, ASRU 2023) = fgw with alpha 0; "fgw": GM-OT, fused Gromov-Wasserstein over nodes and edges."""
    alpha: float = 0.5
    """FGW trade-off in [0, 1]: (1 - alpha) * node (Wasserstein) term + alpha * edge (Gromov) term.
    Ignored by mode "wd" (alpha = 0 there)."""
    epsilon: float = 0.1
    """Entropic regularisation of the solver, on costs of order 1 (smaller = sharper plans, slower)."""
    outer_iter: int = 10
    """FGW outer (mirror-descent / proximal) iterations. Mode "wd" runs Sinkhorn for outer_iter * inner_iter
    iterations, the same budget as fgw."""
    inner_iter: int = 20
    """Sinkhorn iterations per FGW outer iteration."""
    solver: Literal["pgd", "ppa"] = "pgd"
    """FGW outer loop: "pgd" (projected mirror descent: Sinkhorn on the linearised cost) or "ppa" (proximal
    point: the cost also includes -epsilon log T_k, converging to the unregularised FGW plan)."""
    tol: float | None = None
    """Optional per-item convergence tolerance checked every few iterations; None = fixed budget, no host
    synchronisation (fastest on a GPU)."""
    grad: Literal["envelope", "unrolled"] = "envelope"
    """Gradient of the transport value: "envelope" (solve without a graph, differentiate the objective at the
    detached plan) or "unrolled" (backpropagate through the iterations; for checking, slow)."""
    structure: Literal["cosine", "temporal", "hybrid"] = "cosine"
    """Edges of both graphs: "cosine" D_ik = 1 - cos(x_i, x_k); "temporal" D_ik = |t_i - t_k| with positions
    normalised to [0, 1] by the sequence length; "hybrid" a convex mix of the two (models.graphs)."""
    hybrid_mix: float = 0.5
    """Weight of the cosine part in the "hybrid" structure."""
    detach_structure: bool = False
    """Compute the structure matrices from detached features, so gradients reach the encoder only through
    the node cost and the alignment loss."""
    terms: Literal["ot", "align", "both"] = "both"
    """What kt is made of: "ot" the transport value, "align" the alignment loss, "both" their sum. Both
    parts are always returned for logging."""
    align_loss: Literal["cosine", "mse"] = "cosine"
    """Alignment loss per token between z_j and h~_j: "cosine" 1 - cos, "mse" mean squared error per
    dimension; averaged over each utterance's tokens, then over the batch."""
    standardise: bool = True
    """Standardise PLM features per dimension with the training-corpus mean / std of plm.json before use.
    Raw PLM features are anisotropic (a 1 - cos loss against them is met by a constant; DESIGN 3.3)."""
    tot_weight: float = 0.0
    """Temporal-order prior (after TOT, arXiv 2409.02239): adds tot_weight * |(i + 1/2)/N - (j + 1/2)/M| to
    the node cost, favouring plans near the diagonal. 0 disables it. (A linear-cost form of TOT's Gaussian
    order prior: it enters the same solvers unchanged.)"""

    def __post_init__(self) -> None:
        if self.mode not in ("none", "wd", "fgw"):
            raise ValueError(f"gmot.mode must be none, wd or fgw, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"gmot.alpha must lie in [0, 1], got {self.alpha}")
        if self.epsilon <= 0:
            raise ValueError(f"gmot.epsilon must be positive, got {self.epsilon}")
        if self.outer_iter < 1 or self.inner_iter < 1:
            raise ValueError("gmot.outer_iter and gmot.inner_iter must be at least 1")
        if not 0.0 <= self.hybrid_mix <= 1.0:
            raise ValueError(f"gmot.hybrid_mix must lie in [0, 1], got {self.hybrid_mix}")
        if self.tot_weight < 0:
            raise ValueError(f"gmot.tot_weight must be >= 0, got {self.tot_weight}")

    @property
    def effective_alpha(self) -> float:
        """alpha as used by the solver: 0 in mode "wd"."""
        return 0.0 if self.mode == "wd" else self.alpha

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GMOTConfig:
        """Build from a dict of fields; unknown keys raise ValueError naming them."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown gmot config keys {unknown}")
        return cls(**d)


def _mask(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) bool, True at valid positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]


def order_prior(a_mask: Tensor, b_mask: Tensor) -> Tensor:
    """|(i + 1/2)/N - (j + 1/2)/M| per item: (B, N), (B, M) bool -> (B, N, M), 0 at padding."""
    n = a_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    m = b_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    pa = (torch.arange(a_mask.shape[1], device=a_mask.device)[None, :] + 0.5) / n
    pb = (torch.arange(b_mask.shape[1], device=b_mask.device)[None, :] + 0.5) / m
    prior = (pa[:, :, None] - pb[:, None, :]).abs()
    return prior * (a_mask[:, :, None] & b_mask[:, None, :])


class GMOTLoss(nn.Module):
    """The knowledge-transfer loss between adapted acoustic features and PLM token features.

    `plm_mean` / `plm_std` (D,) are the training-corpus statistics of plm.json (required when
    cfg.standardise); they are registered buffers, so `.to(device)` moves them.
    """

    def __init__(
        self, cfg: GMOTConfig, plm_mean: Tensor | None = None, plm_std: Tensor | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("plm_mean", None if plm_mean is None else torch.as_tensor(plm_mean).float())
        self.register_buffer("plm_std", None if plm_std is None else torch.as_tensor(plm_std).float())

    @classmethod
    def from_plm_info(cls, cfg: GMOTConfig, plm_info: dict[str, Any] | None) -> GMOTLoss:
        """Build with the statistics of a plm.json dict ({"mean": [D], "std": [D], ...}) or None."""
        if plm_info is None or "mean" not in plm_info:
            return cls(cfg)
        return cls(cfg, torch.tensor(plm_info["mean"]), torch.tensor(plm_info["std"]))

    def standardise(self, plm: Tensor) -> Tensor:
        """(B, M, D) raw PLM features -> standardised with plm_mean / plm_std (std floored at 1e-5)."""
        if self.plm_mean is None or self.plm_std is None:
            raise ValueError(
                "gmot.standardise is on but no PLM feature statistics were given (the mean/std of plm.json); "
                "pass plm_mean/plm_std or set gmot.standardise=false"
            )
        if self.plm_mean.shape[-1] != plm.shape[-1]:
            raise ValueError(
                f"PLM statistics have width {self.plm_mean.shape[-1]} but PLM features have {plm.shape[-1]}"
            )
        return (plm - self.plm_mean) / self.plm_std.clamp(min=1e-5)

    def forward(
        self, acoustic: Tensor, acoustic_lengths: Tensor, plm: Tensor, plm_lengths: Tensor
    ) -> dict[str, Tensor]:
        """acoustic (B, N, D) adapted encoder output, acoustic_lengths (B,), plm (B, M, D) raw PLM token
        features, plm_lengths (B,) ->
        {"kt": scalar (per cfg.terms), "kt_ot": scalar transport value (batch mean), "kt_align": scalar
         alignment loss (batch mean), "plan": (B, N, M) detached transport plan, 0 at padding}.
        Computed in float32 (autocast off). Every item needs at least one frame and one token.
        """
        cfg = self.cfg
        b, n, d = acoustic.shape
        m = plm.shape[1]
        if plm.shape[0] != b or plm.shape[2] != d:
            raise ValueError(f"acoustic {tuple(acoustic.shape)} and plm {tuple(plm.shape)} do not match")
        if cfg.mode == "none":
            zero = acoustic.new_zeros((), dtype=torch.float32)
            return {"kt": zero, "kt_ot": zero, "kt_align": zero, "plan": acoustic.new_zeros(b, n, m).float()}
        if bool((acoustic_lengths < 1).any()) or bool((plm_lengths < 1).any()):
            raise ValueError("every utterance needs at least one acoustic frame and one PLM token for GM-OT")
        with torch.autocast(acoustic.device.type, enabled=False):
            a_mask, b_mask = _mask(acoustic_lengths, n), _mask(plm_lengths, m)
            h = acoustic.float().masked_fill(~a_mask[:, :, None], 0.0)
            z = plm.float().detach()
            if cfg.standardise:
                z = self.standardise(z)
            z = z.masked_fill(~b_mask[:, :, None], 0.0)

            cost = graphs.cosine_cost(h, z, a_mask, b_mask)
            if cfg.tot_weight > 0:
                cost = cost + cfg.tot_weight * order_prior(a_mask, b_mask)
            a = graphs.uniform_marginal(a_mask)
            bm = graphs.uniform_marginal(b_mask)
            if cfg.mode == "wd":
                # the same iterates as fgw with alpha 0 and pgd (see transport.fused_gromov_wasserstein)
                res = transport.sinkhorn(
                    cost, a, bm, cfg.epsilon, max_iter=cfg.outer_iter * cfg.inner_iter, tol=cfg.tol,
                    check_every=cfg.inner_iter, grad=cfg.grad,
                )  # fmt: skip
            else:
                h_struct = h.detach() if cfg.detach_structure else h
                d_a = graphs.structure_matrix(h_struct, a_mask, cfg.structure, cfg.hybrid_mix)
                d_l = graphs.structure_matrix(z, b_mask, cfg.structure, cfg.hybrid_mix)
                res = transport.fused_gromov_wasserstein(
                    cost, d_a, d_l, a, bm, alpha=cfg.alpha, epsilon=cfg.epsilon, outer_iter=cfg.outer_iter,
                    inner_iter=cfg.inner_iter, solver=cfg.solver, tol=cfg.tol, grad=cfg.grad, symmetric=True,
                )  # fmt: skip
            # the (F)GW distance without the entropic term; its envelope gradient equals that of res.value
            kt_ot = res.transport_cost.mean()
            plan = res.plan
            # transported acoustic features per token: h~_j = sum_i T_ij h_i / b_j
            h_tilde = plan.transpose(1, 2) @ h / bm.clamp(min=1e-12)[:, :, None]
            if cfg.align_loss == "cosine":
                per_token = 1.0 - F.cosine_similarity(h_tilde, z, dim=-1, eps=1e-8)
            else:
                per_token = (h_tilde - z).pow(2).mean(-1)
            per_token = per_token * b_mask
            kt_align = (per_token.sum(1) / b_mask.sum(1)).mean()
            if cfg.terms == "ot":
                kt = kt_ot
            elif cfg.terms == "align":
                kt = kt_align
            else:
                kt = kt_ot + kt_align
        return {
            "kt": kt,
            "kt_ot": kt_ot if cfg.terms != "align" else kt_ot.detach(),
            "kt_align": kt_align if cfg.terms != "ot" else kt_align.detach(),
            "plan": plan.detach(),
        }
