"""The GM-OT knowledge-transfer loss (docs/design.md section 1, docs/transfer.md): align adapted acoustic
frames with PLM token features by (fused Gromov-) Wasserstein optimal transport, and pull the acoustic
features towards the PLM's.

For one utterance with adapted acoustic frames h_1..h_N and PLM token features z_1..z_M (standardised):
- node cost C_ij = 1 - cos(h_i, z_j) (+ tot_weight * |(i + 1/2)/N - (j + 1/2)/M|, the temporal-order prior);
- structures D^A (N x N) over h and D^L (M x M) over z: cosine, temporal or hybrid (models.ot.graphs);
- plan T from the entropic FGW solver (mode fgw) or Sinkhorn (mode wd, alpha = 0) with uniform marginals;
- kt_ot: the transport objective at T (envelope gradients flow into C, D^A, D^L and so into h);
- kt_align: an alignment loss between z_j and the transported acoustic features h~_j = sum_i T_ij h_i / b_j.

The engine combines `loss = ctc + kt_weight * kt`; the model is trained, the PLM stays frozen.
Padded frames / tokens carry zero marginal weight: they get an exactly zero plan and zero gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ot import graphs, transport, unbalanced

if TYPE_CHECKING:
    from data.store import PLMInfo


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
    start: Literal["auto", "warm", "cold"] = "auto"
    """Where each pgd projection starts (transport.fused_gromov_wasserstein): "auto" (per item, the previous
    outer step's potentials or zero ones, whichever leaves the smaller row error), "warm" (always the
    previous ones: gmot before 0.2, the transfer study and its demo numbers) or "cold" (POT's)."""
    tol: float | None = None
    """Optional per-item convergence tolerance checked every few iterations; None = fixed budget, no host
    synchronisation (fastest on a GPU)."""
    grad: Literal["envelope", "unrolled"] = "envelope"
    """Gradient of the transport value: "envelope" (solve without a graph, differentiate the objective at the
    detached plan) or "unrolled" (backpropagate through the iterations; for checking, slow)."""
    structure: Literal["cosine", "temporal", "hybrid"] = "cosine"
    """Edges of both graphs: "cosine" D_ik = 1 - cos(x_i, x_k); "temporal" D_ik = |t_i - t_k| with positions
    normalised to [0, 1] by the sequence length; "hybrid" a convex mix of the two (models.ot.graphs)."""
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
    Raw PLM features are anisotropic (a 1 - cos loss against them is met by a constant; docs/transfer.md)."""
    tot_weight: float = 0.5
    """Temporal-order prior (after TOT, arXiv 2409.02239): adds tot_weight * |(i + 1/2)/N - (j + 1/2)/M| to
    the node cost, favouring plans near the diagonal. 0 disables it. (A linear-cost form of TOT's Gaussian
    order prior: it enters the same solvers unchanged.) Default 0.5 since the transfer study
    (recipes/transfer_study/results/transfer_study.md): with centred tokens it makes the plans follow the
    sentence."""
    centre: bool = True
    """Subtract each utterance's mean teacher token (after `standardise`). The last layer of a sentence
    encoder such as e5 carries the sentence more than the token: centring removes that shared part so the
    tokens of one sentence differ and the node cost has contrast (docs/transfer.md). On by default since the
    transfer study; checkpoints made before the option existed load with it off."""
    epsilon_scale: Literal["absolute", "cost_std"] = "absolute"
    """"absolute": epsilon as given; "cost_std": epsilon times each utterance's standard deviation of the
    node cost (detached), so the plan's sharpness does not depend on how far apart the features are (the
    solvers' ``scale_cost="std"``, models.ot.problem.cost_spread)."""
    reduction: Literal["mean", "sum"] = "mean"
    """Per-utterance reduction of kt: "mean" over its tokens (a plan of mass 1), or "sum" over its tokens
    (transport value and alignment loss times the number of tokens), as CTC is a sum over the utterance, so
    that kt_weight 1 is about as strong as CTC. Either is then averaged over the batch."""
    acoustic_marginal: Literal["uniform", "nonblank"] = "uniform"
    """Source weights a_i: "uniform" over the frames, or proportional to the model's own non-blank
    probability 1 - p(blank | frame i) (detached, floored at `marginal_floor`), so that blank and silence
    frames, most CTC frames, carry little transport mass."""
    marginal_floor: float = 0.05
    """Floor of the per-frame non-blank probability of the "nonblank" marginal, before normalising."""
    teacher: Literal["real", "shuffle", "random", "random_units"] = "real"
    """Which teacher features the training utterances get (dev keeps the real ones): "real" their own;
    "shuffle" another sentence's with the same token count (a seeded cycle, never their own sentence);
    "random" fixed i.i.d. Gaussian vectors of the same shape with the teacher's per-dimension mean and std;
    "random_units" one fixed N(0, 1) vector per transcript unit (character) of width `random_width`, which
    needs no PLM at all (no cache; standardise is off and dev has no plans to score). The first two controls
    keep the transfer's shape and remove the teacher's knowledge of the sentence (data.teacher_controls,
    docs/transfer.md); an untrained teacher is `gmot prepare --plm untrained:NAME`."""
    random_width: int = 384
    """Width of the "random_units" targets (the adapter's output width)."""
    unbalanced_tau: float = 0.0
    """KL relaxation of the acoustic marginal (unbalanced OT, after arXiv 2509.05609): the plan's row sums
    may leave `a` at a cost tau * KL(T 1 || a), so frames that match no token need not be transported.
    0 keeps the marginal exact (balanced OT). Token marginals stay exact."""

    def __post_init__(self) -> None:
        if self.mode not in ("none", "wd", "fgw"):
            raise ValueError(f"gmot.mode must be none, wd or fgw, got {self.mode!r}")
        if self.start not in transport.STARTS:
            raise ValueError(f"gmot.start must be one of {', '.join(transport.STARTS)}, got {self.start!r}")
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
        choices = {
            "epsilon_scale": ("absolute", "cost_std"),
            "reduction": ("mean", "sum"),
            "acoustic_marginal": ("uniform", "nonblank"),
            "teacher": ("real", "shuffle", "random", "random_units"),
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"gmot.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 < self.marginal_floor <= 1.0:
            raise ValueError(f"gmot.marginal_floor must lie in (0, 1], got {self.marginal_floor}")
        if self.random_width < 1:
            raise ValueError(f"gmot.random_width must be at least 1, got {self.random_width}")
        if self.unbalanced_tau < 0:
            raise ValueError(f"gmot.unbalanced_tau must be >= 0 (0 = balanced), got {self.unbalanced_tau}")

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
        if d and "centre" not in d:  # saved before centring existed (and was the default): it was off
            d = {**d, "centre": False}
        if d and "start" not in d:  # saved before the start was a choice: projections always started warm
            d = {**d, "start": "warm"}
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
    cfg.standardise); they are registered buffers, so `.to(device)` moves them. `check_lengths` (default
    True) refuses empty items given CPU lengths; the training engine turns it off (its batches have none,
    and on the CPU it trains as it would on a GPU, where the check is a device synchronisation).
    """

    check_lengths: bool = True

    def __init__(
        self, cfg: GMOTConfig, plm_mean: Tensor | None = None, plm_std: Tensor | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("plm_mean", None if plm_mean is None else torch.as_tensor(plm_mean).float())
        self.register_buffer("plm_std", None if plm_std is None else torch.as_tensor(plm_std).float())

    @classmethod
    def from_plm_info(cls, cfg: GMOTConfig, plm_info: PLMInfo | None) -> GMOTLoss:
        """Build with the statistics of plm.json (its mean and std, (D,) each), or without any (None)."""
        if plm_info is None:
            return cls(cfg)
        return cls(cfg, torch.tensor(plm_info.mean), torch.tensor(plm_info.std))

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

    def teacher_features(self, plm: Tensor, b_mask: Tensor) -> Tensor:
        """(B, M, D) raw PLM features, (B, M) bool -> the features the transfer uses: standardised
        (cfg.standardise), centred per utterance over its valid tokens (cfg.centre), 0 at padding."""
        z = plm.float().detach()
        if self.cfg.standardise:
            z = self.standardise(z)
        z = z.masked_fill(~b_mask[:, :, None], 0.0)
        if self.cfg.centre:
            mean = z.sum(1, keepdim=True) / b_mask.sum(1).clamp(min=1)[:, None, None]
            z = (z - mean).masked_fill(~b_mask[:, :, None], 0.0)
        return z

    def acoustic_weights(self, a_mask: Tensor, blank_prob: Tensor | None) -> Tensor:
        """(B, N) bool valid frames and optional (B, N) blank probabilities -> (B, N) source marginal."""
        if self.cfg.acoustic_marginal == "uniform":
            return graphs.uniform_marginal(a_mask, check=False)
        if blank_prob is None:
            raise ValueError('gmot.acoustic_marginal "nonblank" needs the model\'s blank probabilities')
        w = (1.0 - blank_prob.detach().float()).clamp(min=self.cfg.marginal_floor) * a_mask
        return w / w.sum(1, keepdim=True)

    def forward(
        self,
        acoustic: Tensor,
        acoustic_lengths: Tensor,
        plm: Tensor,
        plm_lengths: Tensor,
        blank_prob: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """acoustic (B, N, D) adapted encoder output, acoustic_lengths (B,), plm (B, M, D) raw PLM token
        features, plm_lengths (B,), blank_prob (B, N) the model's p(blank) per frame (needed by the
        "nonblank" acoustic marginal) ->
        {"kt": scalar (per cfg.terms and cfg.reduction), "kt_ot": scalar transport value, "kt_align":
         scalar alignment loss (both batch means, per cfg.reduction), "plan_entropy": scalar mean entropy
         of the plans over that of the uniform plan (1 = uniform; detached), "plan_marginal_error": scalar
         mean L1 error of the plans' exact marginals (how far the fixed budget is from convergence; detached),
         "plan": (B, N, M) detached transport plan, 0 at padding}.
        Computed in float32 (autocast off). Every item needs at least one frame. An item whose teacher has no
        token or a non-finite feature (e.g. a float16 overflow in the cache) gets weight 0 in every mean and
        an all-zero plan, so that its batch-mates still train; the means are over the other items (0 when
        none is left).
        """
        cfg = self.cfg
        b, n, d = acoustic.shape
        m = plm.shape[1]
        if plm.shape[0] != b or plm.shape[2] != d:
            raise ValueError(f"acoustic {tuple(acoustic.shape)} and plm {tuple(plm.shape)} do not match")
        if cfg.mode == "none" or m == 0:  # m == 0: no item has a teacher token
            zero = acoustic.new_zeros((), dtype=torch.float32)
            return {
                "kt": zero, "kt_ot": zero, "kt_align": zero, "plan_entropy": zero,
                "plan_marginal_error": zero, "plan": acoustic.new_zeros(b, n, m).float(),
            }  # fmt: skip
        # checked where it costs no device synchronisation (CPU lengths); on a GPU an empty item gives NaN
        on_host = self.check_lengths and acoustic_lengths.device.type == plm_lengths.device.type == "cpu"
        if on_host and bool((acoustic_lengths < 1).any()):
            raise ValueError("every utterance needs at least one acoustic frame for GM-OT")
        with torch.autocast(acoustic.device.type, enabled=False):
            # an item without a usable teacher is solved against one zero token (finite, so that its weight
            # of 0 gives it an exactly zero gradient) instead of turning the whole batch NaN
            a_mask, b_mask = _mask(acoustic_lengths, n), _mask(plm_lengths.clamp(min=1), m)
            # a NaN / Inf in the features (a diverging encoder) is not checked for: it flows into a NaN kt,
            # which the engine skips and counts, and nothing here synchronises with the device
            h = acoustic.float().masked_fill(~a_mask[:, :, None], 0.0)
            z = self.teacher_features(plm, b_mask)
            usable = (plm_lengths >= 1) & torch.isfinite(z).all(dim=2).all(dim=1)  # (B,)
            z = z.masked_fill(~usable[:, None, None], 0.0)

            cost = graphs.cosine_cost(h, z, a_mask, b_mask)
            if cfg.tot_weight > 0:
                cost = cost + cfg.tot_weight * order_prior(a_mask, b_mask)
            a = self.acoustic_weights(a_mask, blank_prob)
            bm = graphs.uniform_marginal(b_mask, check=False)
            valid = a_mask[:, :, None] & b_mask[:, None, :]
            res = self._solve(cost, h, z, a_mask, b_mask, a, bm)
            kt_ot_per, plan = res.transport_cost, res.plan
            # transported acoustic features per token: h~_j = sum_i T_ij h_i / b_j
            h_tilde = plan.transpose(1, 2) @ h / bm.clamp(min=1e-12)[:, :, None]
            if cfg.align_loss == "cosine":
                per_token = 1.0 - F.cosine_similarity(h_tilde, z, dim=-1, eps=1e-8)
            else:
                per_token = (h_tilde - z).pow(2).mean(-1)
            tokens = b_mask.sum(1).to(torch.float32)
            kt_align_per = (per_token * b_mask).sum(1) / tokens
            if cfg.reduction == "sum":
                kt_ot_per, kt_align_per = kt_ot_per * tokens, kt_align_per * tokens
            kt_ot, kt_align = _usable_mean(kt_ot_per, usable), _usable_mean(kt_align_per, usable)
            if cfg.terms == "ot":
                kt = kt_ot
            elif cfg.terms == "align":
                kt = kt_align
            else:
                kt = kt_ot + kt_align
            entropy = plan_entropy_ratio(plan.detach(), valid)
        return {
            "kt": kt,
            "kt_ot": kt_ot if cfg.terms != "align" else kt_ot.detach(),
            "kt_align": kt_align if cfg.terms != "ot" else kt_align.detach(),
            "plan_entropy": _usable_mean(entropy, usable),
            "plan_marginal_error": _usable_mean(res.marginal_error, usable),
            "plan": plan.detach().masked_fill(~usable[:, None, None], 0.0),
        }

    def _solve(
        self, cost: Tensor, h: Tensor, z: Tensor, a_mask: Tensor, b_mask: Tensor, a: Tensor, bm: Tensor
    ) -> transport.TransportResult:
        """The transport of the configured mode: node cost (B, N, M), features h (B, N, D) and z (B, M, D)
        with their masks, marginals a (B, N) and bm (B, M) -> the solver's result (values in the cost's
        units; epsilon_scale "cost_std" is the solvers' scale_cost "std")."""
        cfg = self.cfg
        settings: dict[str, Any] = {
            "epsilon": cfg.epsilon,
            "grad": cfg.grad,
            "validate": False,  # built here: nothing to check, and nothing synchronises
            "scale_cost": "std" if cfg.epsilon_scale == "cost_std" else None,
        }
        d_a = d_l = None
        if cfg.mode == "fgw":
            h_struct = h.detach() if cfg.detach_structure else h
            d_a = graphs.structure_matrix(h_struct, a_mask, cfg.structure, cfg.hybrid_mix)
            d_l = graphs.structure_matrix(z, b_mask, cfg.structure, cfg.hybrid_mix)
        if cfg.unbalanced_tau > 0:
            return unbalanced.unbalanced_fused_gromov_wasserstein(
                cost, d_a, d_l, a, bm, alpha=cfg.effective_alpha, tau_a=cfg.unbalanced_tau, tau_b=None,
                outer_iter=cfg.outer_iter, inner_iter=cfg.inner_iter, **settings,
            )  # fmt: skip
        if cfg.mode == "wd":
            # the same iterates as fgw with alpha 0 and pgd (see transport.fused_gromov_wasserstein)
            return transport.sinkhorn(
                cost, a, bm, max_iter=cfg.outer_iter * cfg.inner_iter, check_every=cfg.inner_iter,
                tol=cfg.tol, **settings,
            )  # fmt: skip
        assert d_a is not None and d_l is not None
        return transport.fused_gromov_wasserstein(
            cost, d_a, d_l, a, bm, alpha=cfg.alpha, outer_iter=cfg.outer_iter, inner_iter=cfg.inner_iter,
            solver=cfg.solver, tol=cfg.tol, symmetric=True, start=cfg.start, **settings,
        )  # fmt: skip


def _usable_mean(values: Tensor, usable: Tensor) -> Tensor:
    """Mean of (B,) `values` over the items where (B,) bool `usable` holds, the others weighing 0 (gradient
    included); 0 when none does. With every item usable it is exactly `values.mean()`."""
    return torch.where(usable, values, 0.0).mean() * (usable.numel() / usable.sum().clamp(min=1))


def plan_entropy_ratio(plan: Tensor, valid: Tensor) -> Tensor:
    """Entropy of each plan (normalised to mass 1) over log(N_b M_b), the uniform plan's: (B, N, M) -> (B,).
    1 for the uniform plan, 0 for a plan on one entry; 1 when the item has a single entry."""
    mass = plan.sum(dim=(1, 2), keepdim=True).clamp(min=1e-30)
    q = plan / mass
    ent = -(torch.where(q > 0, q * q.clamp(min=1e-30).log(), 0.0) * valid).sum(dim=(1, 2))
    size = valid.sum(dim=(1, 2)).to(plan.dtype)
    return torch.where(size > 1, ent / size.clamp(min=2).log(), torch.ones_like(ent))
