"""Is the transfer doing anything? Scores of a transport plan against the CTC forced alignment, and the
strength of the transfer's gradient against CTC's (docs/transfer.md).

Plan alignment, per utterance with plan T (N frames x M PLM tokens):
- each PLM token spells some reference characters; CTC forced alignment of the reference gives each
  character its frames, so each token gets a frame span [s_j, e_j) (from its first character's start to its
  last character's end);
- `mass_in_span`: the share of token j's transport mass inside its span, sum_{i in span} T_ij / sum_i T_ij,
  averaged over the tokens that have a span;
- `uniform_share`: the same for the uniform plan, |span_j| / N (what a plan that aligns nothing scores);
- `lift`: mass_in_span / uniform_share, 1 for a plan that aligns nothing, N / |span| for a perfect one;
- `entropy`: the plan's entropy over the uniform plan's (models.nn.transfer_loss.plan_entropy_ratio), 1 =
uniform;
- `order`: Spearman correlation of a token's index with its plan-weighted mean frame: near +1 for plans that
  follow the sentence, near -1 for plans that run backwards (the Gromov term alone cannot tell a sequence
  from its reverse), near 0 for plans that ignore order.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def token_char_ranges(tokens: list[str], reference: str) -> list[tuple[int, int] | None]:
    """For each PLM token (SentencePiece strings), the range [i, k) of `reference` characters it spells,
    matching tokens left to right; None for a token that spells nothing in order (e.g. a lone word marker)."""
    ranges: list[tuple[int, int] | None] = []
    pos = 0
    for tok in tokens:
        piece = "".join(ch for ch in tok.replace("\u2581", "") if not ch.isspace())
        at = reference.find(piece, pos) if piece else -1
        if piece and at == pos:
            ranges.append((at, at + len(piece)))
            pos = at + len(piece)
        else:
            ranges.append(None)
    return ranges


def ctc_token_spans(log_probs: Tensor, target: list[int]) -> list[tuple[int, int, float]] | None:
    """CTC forced alignment of `target` ids on (T, V) log-probs -> (start, end, mean posterior) per target
    unit, in order: its encoder frames (end exclusive) and the mean probability the model gives the unit on
    them; None when the target cannot fit in T frames."""
    import torchaudio.functional as AF

    if not target:
        return []
    t = log_probs.shape[0]
    repeats = sum(1 for a, b in itertools.pairwise(target) if a == b)
    if len(target) + repeats > t:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames, scores = AF.forced_align(
            log_probs[None].float().cpu(),
            torch.tensor([target], dtype=torch.int32),
            torch.tensor([t], dtype=torch.int32),
            torch.tensor([len(target)], dtype=torch.int32),
            blank=0,
        )
        spans = AF.merge_tokens(frames[0], scores[0].exp())
    return [(int(s.start), int(s.end), float(s.score)) for s in spans]


def ctc_char_spans(log_probs: Tensor, target: list[int]) -> list[tuple[int, int]] | None:
    """`ctc_token_spans` without the posteriors: (start, end) encoder frames per target unit, or None."""
    spans = ctc_token_spans(log_probs, target)
    return None if spans is None else [(s, e) for s, e, _ in spans]


def token_frame_spans(
    ranges: list[tuple[int, int] | None], char_spans: list[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """Frame span of each token: from its first character's start to its last character's end."""
    out: list[tuple[int, int] | None] = []
    for r in ranges:
        if r is None or r[1] > len(char_spans) or r[1] <= r[0]:
            out.append(None)
        else:
            out.append((char_spans[r[0]][0], char_spans[r[1] - 1][1]))
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties); nan when either is constant
    or shorter than 3."""
    if len(x) < 3:
        return math.nan

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(np.asarray(x, np.float64)), ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def score_plan(plan: np.ndarray, spans: list[tuple[int, int] | None] | None) -> dict[str, float]:
    """Scores of one plan (N, M) without padding, given each token's frame span (or None):
    {"mass_in_span", "uniform_share", "lift", "order", "entropy"}; span scores are nan without spans."""
    plan = np.asarray(plan, np.float64)
    n, m = plan.shape
    col = plan.sum(0)
    frames = np.arange(n, dtype=np.float64)
    mean_frame = (frames[:, None] * plan).sum(0) / np.maximum(col, 1e-30)
    q = plan / max(plan.sum(), 1e-30)
    nz = q[q > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(n * m)) if n * m > 1 else 1.0
    inside, share = [], []
    for j, span in enumerate(spans or []):
        if span is None or col[j] <= 0:
            continue
        s, e = span
        inside.append(plan[s:e, j].sum() / col[j])
        share.append((e - s) / n)
    mass = float(np.mean(inside)) if inside else math.nan
    uniform = float(np.mean(share)) if share else math.nan
    return {
        "mass_in_span": mass,
        "uniform_share": uniform,
        "lift": mass / uniform if inside and uniform > 0 else math.nan,
        "order": spearman(np.arange(m, dtype=np.float64), mean_frame),
        "entropy": entropy,
    }


@dataclass
class AlignmentMeter:
    """Running means of `score_plan` over utterances (nan scores are left out of their mean)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    utterances: int = 0

    def add(self, scores: dict[str, float]) -> None:
        """Add one utterance's scores."""
        self.utterances += 1
        for k, v in scores.items():
            if not math.isnan(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def summary(self) -> dict[str, float]:
        """{"align_lift", "align_mass", "align_uniform", "align_order", "align_entropy"}: the means (nan when
        nothing was scored)."""
        names = {
            "lift": "align_lift", "mass_in_span": "align_mass", "uniform_share": "align_uniform",
            "order": "align_order", "entropy": "align_entropy",
        }  # fmt: skip
        return {
            out: self.sums[k] / self.counts[k] if self.counts.get(k) else math.nan for k, out in names.items()
        }


def score_batch_plans(
    plans: Tensor,
    log_probs: Tensor,
    lengths: Tensor,
    plm_lengths: Tensor,
    targets: list[list[int]],
    texts: list[str],
    tokens: list[list[str]],
    meter: AlignmentMeter,
) -> None:
    """Score each plan of a batch against the CTC forced alignment of its reference and add it to `meter`.

    plans (B, N, M) detached transport plans, log_probs (B, N, V) CTC log-probabilities, lengths (B,) valid
    frames, plm_lengths (B,) valid tokens; targets: reference unit ids, texts: the references, tokens: each
    utterance's PLM token strings.
    """
    plans_np = plans.float().cpu().numpy()
    for k in range(plans.shape[0]):
        n, m = int(lengths[k]), int(plm_lengths[k])
        chars = ctc_char_spans(log_probs[k, :n], targets[k])
        spans = None
        if chars is not None and len(chars) == len(texts[k]):
            spans = token_frame_spans(token_char_ranges(tokens[k][:m], texts[k]), chars)
        meter.add(score_plan(plans_np[k, :n, :m], spans))


def gradient_ratio(kt: Tensor, ctc: Tensor, at: Tensor) -> float:
    """||d kt / d at|| / ||d ctc / d at|| at the tensor `at` (the block feeding the adapter), both losses as
    they enter the total (weights applied by the caller). Costs two partial backward passes (from each loss
    down to `at` only), and keeps the graph for the real backward. nan when either loss is not finite or
    has no gradient."""
    ratio = gradient_ratio_tensor(kt, ctc, at)
    return math.nan if ratio is None else float(ratio)


def gradient_ratio_tensor(kt: Tensor, ctc: Tensor, at: Tensor) -> Tensor | None:
    """`gradient_ratio` as a 0-dim float32 tensor on the device, read by nobody here (the training engine
    reads it with the rest of its step); None when either loss has no gradient at `at`, nan when either is
    not finite or the CTC gradient is 0."""
    if not (kt.requires_grad and ctc.requires_grad):
        return None
    g_kt = torch.autograd.grad(kt, at, retain_graph=True, allow_unused=True)[0]
    g_ctc = torch.autograd.grad(ctc, at, retain_graph=True, allow_unused=True)[0]
    if g_kt is None or g_ctc is None:
        return None
    num, den = g_kt.float().norm(), g_ctc.float().norm()
    usable = torch.isfinite(kt.detach()) & torch.isfinite(ctc.detach()) & (den > 0)
    return torch.where(usable, num / den, torch.full_like(num, math.nan))


def format_scores(scores: dict[str, float]) -> str:
    """One line of `score_plan` scores, e.g. "alignment lift 2.41 (mass in CTC span 0.52 vs 0.22 uniform),
    order +0.93, entropy 0.81 of uniform"."""

    def f(x: float, spec: str) -> str:
        return "n/a" if math.isnan(x) else format(x, spec)

    return (
        f"alignment lift {f(scores['lift'], '.2f')} (mass in CTC span {f(scores['mass_in_span'], '.2f')} vs "
        f"{f(scores['uniform_share'], '.2f')} uniform), order {f(scores['order'], '+.2f')}, "
        f"entropy {f(scores['entropy'], '.2f')} of uniform"
    )


BACKWARDS_ORDER = -0.2
"""An `align_order` below this, with plans sharper than uniform, means the plans run backwards."""
UNIFORM_LIFT = 1.1
"""An `align_lift` below this means the plans put no more mass on the right frames than a uniform plan."""


def alignment_warning(summary: dict[str, float], tot_weight: float) -> str | None:
    """A one-line warning for dev plan scores (`AlignmentMeter.summary` keys) that show a transfer aligning
    nothing or aligning backwards, with what to try; None when the plans look aligned or were not scored."""
    lift, order = summary.get("align_lift"), summary.get("align_order")
    if lift is None or order is None:
        return None
    if order < BACKWARDS_ORDER:
        hint = "raise gmot.tot_weight" if tot_weight > 0 else "set gmot.tot_weight (e.g. 0.5)"
        return (
            f"the dev transport plans run backwards (order {order:+.2f}): the Gromov term cannot tell a "
            f"sequence from its reverse; {hint} to favour plans that follow the sentence"
        )
    if lift < UNIFORM_LIFT:
        return (
            f"the dev transport plans align nothing (lift {lift:.2f}, 1 = uniform): try gmot.centre=true, a "
            "smaller gmot.epsilon or gmot.epsilon_scale=cost_std (docs/transfer.md)"
        )
    return None
