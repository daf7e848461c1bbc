"""Mandarin character errors by kind: where a language model can help and where only the acoustics can.

A character substitution whose two characters are pronounced alike can only be told apart by context, which is
what a language model carries; one that sounds different is an acoustic error. `homophone_breakdown` sorts the
errors of a scored corpus (data.scoring.ScoreResult, character units) into:

- `homophone`: a substitution whose hypothesis character has, among its readings, the reference character's
  reading in its sentence (pinyin with tone, from pypinyin's phrase-aware conversion of the reference);
- `tone`: same syllable, another tone (no reading with the reference's tone);
- `other_sub`: any other substitution (including characters that are not hanzi);
- `deletion`, `insertion`.

Readings come from pypinyin (MIT; its character and phrase dictionaries). Neutral tones are tone 5.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from data.scoring import ScoreResult

KINDS = ("homophone", "tone", "other_sub", "deletion", "insertion")


@dataclass
class ErrorBreakdown:
    """Counts of each kind of error (KINDS) over a corpus, the reference length, and the most frequent
    homophone pairs as (reference char, hypothesis char, count)."""

    counts: dict[str, int]
    ref_len: int
    top_homophones: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """All errors (the CER's numerator)."""
        return sum(self.counts.values())

    def rate(self, kind: str) -> float:
        """Errors of `kind` per reference character (its share of the CER), as a fraction."""
        return self.counts[kind] / self.ref_len if self.ref_len else 0.0

    def to_json(self) -> dict:
        """{"ref_len", "errors", "counts": {kind: n}, "rates": {kind: fraction}, "top_homophones": [...]}."""
        return {
            "ref_len": self.ref_len,
            "errors": self.errors,
            "counts": dict(self.counts),
            "rates": {k: self.rate(k) for k in KINDS},
            "top_homophones": [list(p) for p in self.top_homophones],
        }


def _strip_tone(reading: str) -> str:
    return reading.rstrip("012345")


@lru_cache(maxsize=65536)
def readings(char: str) -> frozenset[str]:
    """Every reading of one character, pinyin with tone number ("hang2"); empty for a non-hanzi."""
    from pypinyin import Style, pinyin

    got = pinyin(char, style=Style.TONE3, heteronym=True, neutral_tone_with_five=True, errors=lambda s: [])
    return frozenset(r for group in got for r in group if r)


def sentence_readings(chars: list[str]) -> list[str]:
    """The reading of each character in its sentence (pypinyin's phrase-aware choice); "" for non-hanzi.
    Input: the reference's characters; output: one reading per character."""
    from pypinyin import Style, pinyin

    text = "".join(chars)
    got = pinyin(text, style=Style.TONE3, neutral_tone_with_five=True, errors=lambda s: [[""]] * len(s))
    flat = [group[0] if group else "" for group in got]
    if len(flat) != len(chars):  # not one entry per character: fall back to each character on its own
        flat = [min(readings(c), default="") for c in chars]
    return flat


def substitution_kind(reference_reading: str, hyp_char: str) -> str:
    """ "homophone", "tone" or "other_sub" for a reference character read `reference_reading` in its
    sentence and substituted by `hyp_char`."""
    if not reference_reading:
        return "other_sub"
    theirs = readings(hyp_char)
    if reference_reading in theirs:
        return "homophone"
    if _strip_tone(reference_reading) in {_strip_tone(r) for r in theirs}:
        return "tone"
    return "other_sub"


def homophone_breakdown(result: ScoreResult, top: int = 10) -> ErrorBreakdown:
    """Sort a character-level ScoreResult's errors into KINDS. Raises ValueError for word units."""
    if result.unit != "char":
        raise ValueError("the homophone breakdown needs character units (--unit char)")
    counts = dict.fromkeys(KINDS, 0)
    pairs: Counter[tuple[str, str]] = Counter()
    for utt in result.utterances:
        ref_chars = [c for c in utt.ref_aligned if c is not None]
        ref_readings = iter(sentence_readings(ref_chars))
        for ref, hyp, op in zip(utt.ref_aligned, utt.hyp_aligned, utt.ops, strict=True):
            reading = next(ref_readings) if ref is not None else ""
            if op == "D":
                counts["deletion"] += 1
            elif op == "I":
                counts["insertion"] += 1
            elif op == "S":
                assert ref is not None and hyp is not None
                kind = substitution_kind(reading, hyp)
                counts[kind] += 1
                if kind == "homophone":
                    pairs[(ref, hyp)] += 1
    top_pairs = [(r, h, n) for (r, h), n in pairs.most_common(top)]
    return ErrorBreakdown(counts, result.ref_len, top_pairs)
