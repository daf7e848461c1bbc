"""CTC: the blank id, per-utterance losses, best-path (greedy) decoding, and which transcripts CTC can align
at all."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.nn.encoder import subsampled_lengths

if TYPE_CHECKING:
    from data.store import ManifestEntry

BLANK_ID = 0  # the vocabulary's index 0 is the CTC blank


def ctc_losses(
    out: dict[str, Tensor], tokens: Tensor, token_lens: Tensor, zero_infinity: bool = False
) -> Tensor:
    """Per-utterance CTC losses (B,). With zero_infinity=False an impossible alignment stays inf (to find
    it); with True its loss and gradient are 0 (to train its batch-mates)."""
    log_probs = out["log_probs"].float().transpose(0, 1)  # (T', B, V)
    return nn.functional.ctc_loss(
        log_probs, tokens, out["lengths"], token_lens, blank=0, reduction="none", zero_infinity=zero_infinity
    )


def ctc_batch_loss(out: dict[str, Tensor], tokens: Tensor, token_lens: Tensor) -> tuple[Tensor, Tensor]:
    """The training CTC loss of a batch: out (the model's {"log_probs" (B, T', V), "lengths" (B,)}), tokens
    (B, L) padded labels, token_lens (B,) -> (scalar: per-utterance losses summed over the utterances CTC can
    align, divided by their number (0 when none can), per-utterance losses (B,), inf where CTC cannot align).
    An unalignable utterance adds neither loss nor gradient, so its batch-mates still train; nothing is read
    on the host."""
    impossible = ctc_impossible(out["lengths"], tokens, token_lens)
    per_utt = ctc_losses(out, tokens, token_lens, zero_infinity=True)  # 0, no gradient where impossible
    ctc = per_utt.sum() / (~impossible).sum().clamp(min=1)
    return ctc, per_utt.masked_fill(impossible, math.inf)


def ctc_required_frames(token_ids: list[int]) -> int:
    """Fewest encoder frames a CTC alignment of `token_ids` needs: one per label plus a blank between each
    pair of equal neighbours."""
    return len(token_ids) + sum(1 for a, b in itertools.pairwise(token_ids) if a == b)


def ctc_impossible(frames: Tensor, tokens: Tensor, token_lens: Tensor) -> Tensor:
    """Which utterances of a batch CTC cannot align, computed on the tensors' device (nothing is read on the
    host): frames (B,) encoder output lengths, tokens (B, L) labels (padded), token_lens (B,) -> (B,) bool,
    True where frames < labels plus repeated neighbours (`ctc_required_frames` of each), which is where
    `ctc_losses` is infinite."""
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < token_lens[:, None]
    repeats = ((tokens[:, 1:] == tokens[:, :-1]) & valid[:, 1:]).sum(1)
    return frames < token_lens + repeats


def ctc_infeasible(records: Sequence[ManifestEntry], subsampling: int) -> list[int]:
    """Indices of manifest entries whose transcript cannot be aligned by CTC after the model's subsampling
    (encoder frames < labels + repeated neighbours)."""
    lengths = subsampled_lengths(torch.tensor([r.num_frames for r in records] or [0]), subsampling)
    return [i for i, r in enumerate(records) if int(lengths[i]) < ctc_required_frames(r.token_ids)]


def greedy_ctc(log_probs: Tensor, lengths: Tensor, blank: int = BLANK_ID) -> list[list[int]]:
    """Best-path CTC decoding of a batch.

    log_probs (B, T, V) (log-)probabilities, lengths (B,) valid frames per item -> for each item the label ids
    of its best path with repeats collapsed and blanks removed. Frames past an item's length are ignored.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T, V), got {tuple(log_probs.shape)}")
    best = log_probs.argmax(dim=-1)  # (B, T)
    t = best.shape[1]
    valid = torch.arange(t, device=best.device)[None, :] < lengths.to(best.device)[:, None]
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=-1)
    keep = valid & (best != blank) & (best != prev)
    best, keep = best.cpu(), keep.cpu()
    return [best[b][keep[b]].tolist() for b in range(best.shape[0])]
