"""Teacher-feature controls: targets that keep the transfer's shape and remove the teacher's knowledge.

A control answers "is it the language model?": the transfer runs unchanged (same loss, solver, adapter,
number of tokens per utterance) but each training utterance is given teacher features that carry no knowledge
of its own sentence.

- `shuffle`: the features of another sentence with the same number of teacher tokens. The sentences of each
  token count are put in a random cycle (seeded), so no sentence keeps its own features, and every utterance
  of a sentence (the demo speaks each with two voices) gets the same other sentence's. A sentence whose token
  count no other sentence shares borrows from the nearest count that has another sentence (its token count
  then differs; `ShufflePlan.off_count` says how many).
- `random`: i.i.d. Gaussian vectors of the utterance's shape (M, D), fixed per utterance (seeded by the seed
  and the utterance's index) and drawn with the teacher's per-dimension mean and std, so that after the
  loss's standardisation they are N(0, 1).

The third control, an untrained teacher (same architecture and tokenizer, random weights), changes what is
cached at prepare time: `gmot prepare ... --plm untrained:e5-small` (models.nn.plm.untrained_teacher).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONTROLS = ("real", "shuffle", "random")


@dataclass(frozen=True)
class ShufflePlan:
    """Which record's teacher features each record reads: `source[i]` for record i (never one of the same
    sentence), and how many records borrow from another token count (`off_count`)."""

    source: list[int]
    off_count: int


def shuffle_sources(texts: Sequence[str], token_counts: Sequence[int], seed: int) -> ShufflePlan:
    """Map every record to a record of another sentence with the same number of teacher tokens.

    texts, token_counts: per record (manifest order). Returns a ShufflePlan whose `source` has one index per
    record. Raises ValueError when the corpus has fewer than two distinct sentences.
    """
    if len(texts) != len(token_counts):
        raise ValueError("texts and token_counts differ in length")
    first_of: dict[str, int] = {}  # a representative record of each sentence
    count_of: dict[str, int] = {}
    for i, (text, m) in enumerate(zip(texts, token_counts, strict=True)):
        first_of.setdefault(text, i)
        count_of.setdefault(text, int(m))
    if len(first_of) < 2:
        raise ValueError("the shuffle control needs at least two distinct sentences")
    by_count: dict[int, list[str]] = defaultdict(list)
    for text, m in count_of.items():
        by_count[m].append(text)
    rng = random.Random(seed)
    partner: dict[str, str] = {}
    lonely: list[str] = []
    for m in sorted(by_count):
        group = sorted(by_count[m])
        if len(group) < 2:
            lonely.extend(group)
            continue
        rng.shuffle(group)
        for k, text in enumerate(group):  # one random cycle: nobody keeps their own
            partner[text] = group[(k + 1) % len(group)]
    shared = sorted(m for m, g in by_count.items() if len(g) >= 2)
    for text in lonely:
        m = count_of[text]
        if shared:
            nearest = min(shared, key=lambda c: (abs(c - m), c))
            partner[text] = rng.choice(sorted(by_count[nearest]))
        else:  # every count is unique: any other sentence
            partner[text] = rng.choice(sorted(t for t in count_of if t != text))
    off = sum(1 for t in texts if count_of[partner[t]] != count_of[t])
    return ShufflePlan([first_of[partner[t]] for t in texts], off)


def random_features(
    shape: tuple[int, int], index: int, seed: int, mean: np.ndarray | None, std: np.ndarray | None
) -> np.ndarray:
    """The `random` control's features of record `index`: (M, D) float32, i.i.d. Gaussian with per-dimension
    `mean`/`std` (D,) (N(0, 1) when None), the same for the same (seed, index) in every epoch and worker."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
    x = rng.standard_normal(shape, dtype=np.float32)
    if std is not None:
        x *= np.asarray(std, dtype=np.float32)
    if mean is not None:
        x += np.asarray(mean, dtype=np.float32)
    return x
