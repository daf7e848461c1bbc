"""CTC search: beam search with flashlight-text (optional KenLM) and the choice between it and greedy search
(`make_decoder`), as callables from (log_probs, lengths) to label ids.

Beam search uses flashlight-text's `LexiconFreeDecoder` with the CTC criterion over the character vocabulary
(no lexicon, no word boundary). flashlight needs a "silence" token index; a character vocabulary has no word
separator, so the blank doubles as the silence token with a silence score of 0: this adds nothing to any
path score and makes flashlight's CTC rules (collapse repeats, blank separates repeats) the usual ones.
Hypotheses that reach the same label prefix are merged with log-add (`log_add=True`), i.e. the search ranks
label sequences by (an approximation of) their summed path probability, not single best paths. With a KenLM
model (ARPA or KenLM binary whose words are the vocabulary's characters), each emitted character adds
`lm_weight` times its LM log10-probability (flashlight passes KenLM's log10 scores on unconverted, so a
weight w on the LM is w / ln 10 in natural-log units against the acoustic log-probabilities; checked in
tests/test_ngram.py) and the end of sentence is scored when the utterance ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from models.nn.ctc import BLANK_ID, greedy_ctc

if TYPE_CHECKING:  # flashlight is imported where a beam search is built
    from flashlight.lib.text.decoder.kenlm import KenLM

CTCDecoder = Callable[[Tensor, Tensor], list[list[int]]]
"""log_probs (B, T, V), lengths (B,) -> the label ids of each item's best hypothesis."""

METHODS = ("greedy", "beam")


class DecodingError(Exception):
    """A decoding set-up that cannot work (unreadable LM file, bad option); the message names the cause."""


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C/C++ writes to file descriptor 2 (KenLM prints a progress bar while loading an ARPA file,
    sherpa-onnx a note for every file it resamples)."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_kenlm(path: Path, vocab: Sequence[str]) -> KenLM:
    """Load a KenLM model (ARPA text or KenLM binary) over `vocab`'s units for flashlight.

    Raises DecodingError naming the file when it is missing, unreadable or not an n-gram model (KenLM also
    refuses unigram-only ARPA files: it needs at least a bigram model).
    """
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    path = Path(path)
    if not path.is_file():
        raise DecodingError(f"language model {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise DecodingError(f"language model {path} is not readable (permissions)")
    try:
        with quiet_stderr():
            return KenLM(str(path), Dictionary(list(vocab)))
    except RuntimeError as err:
        lines = [s.strip() for s in str(err).splitlines() if s.strip()]
        reason = lines[-1] if lines else "unknown error"
        raise DecodingError(f"cannot read language model {path}: {reason}") from None


class BeamSearchDecoder:
    """Lexicon-free CTC beam search over a character vocabulary (flashlight-text), optional KenLM n-gram.

    beam_size: hypotheses kept per frame; beam_size_token: tokens tried per frame (default: all, at most 32
    best); beam_threshold: drop hypotheses this far (natural log) below the best; lm_weight: weight of the LM
    log-probability (natural log) added per emitted character and at the end of the utterance.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        beam_size: int = 10,
        lm_path: Path | None = None,
        lm_weight: float = 0.0,
        beam_size_token: int | None = None,
        beam_threshold: float = 25.0,
        blank: int = BLANK_ID,
    ) -> None:
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconFreeDecoder,
            LexiconFreeDecoderOptions,
            ZeroLM,
        )

        if beam_size < 1:
            raise DecodingError(f"beam size must be at least 1, got {beam_size}")
        if lm_path is None and lm_weight != 0.0:
            lm_weight = 0.0  # no LM: a weight would only scale zeros
        self.vocab = list(vocab)
        self.blank = blank
        self.lm = load_kenlm(lm_path, self.vocab) if lm_path is not None else ZeroLM()
        token_beam = min(len(self.vocab), beam_size_token or max(32, beam_size))
        self.options = LexiconFreeDecoderOptions(
            beam_size=beam_size,
            beam_size_token=token_beam,
            beam_threshold=beam_threshold,
            lm_weight=lm_weight,
            sil_score=0.0,  # added at frames emitting the silence token, here the blank: must stay 0
            log_add=True,
            criterion_type=CriterionType.CTC,
        )
        self._decoder = LexiconFreeDecoder(self.options, self.lm, blank, blank, [])

    def _collapse(self, tokens: Sequence[int]) -> list[int]:
        out: list[int] = []
        prev = -1
        for tok in tokens:
            if tok != prev and tok != self.blank and tok >= 0:
                out.append(int(tok))
            prev = tok
        return out

    def nbest_one(self, log_probs: np.ndarray, k: int) -> list[tuple[list[int], float]]:
        """(T, V) float32 log-probabilities of one utterance -> up to `k` distinct hypotheses (label ids and
        the search's score, natural log, best first)."""
        emissions = np.ascontiguousarray(log_probs, dtype=np.float32)
        t, v = emissions.shape
        if t == 0:
            return [([], 0.0)]
        if v != len(self.vocab):
            raise DecodingError(f"emissions have {v} units but the vocabulary has {len(self.vocab)}")
        out: list[tuple[list[int], float]] = []
        seen: set[tuple[int, ...]] = set()
        for result in self._decoder.decode(emissions.ctypes.data, t, v):
            ids = self._collapse(list(result.tokens))
            if tuple(ids) not in seen:  # different paths that spell the same text count once
                seen.add(tuple(ids))
                out.append((ids, float(result.score)))
            if len(out) == k:
                break
        return out or [([], 0.0)]

    def decode_one(self, log_probs: np.ndarray) -> list[int]:
        """(T, V) float32 log-probabilities of one utterance -> label ids of the best hypothesis."""
        return self.nbest_one(log_probs, 1)[0][0]

    def decode(self, log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
        """Batch version: log_probs (B, T, V), lengths (B,) -> one list of label ids per item."""
        lp = log_probs.detach().float().cpu().numpy()
        return [self.decode_one(lp[b, : int(n)]) for b, n in enumerate(lengths.tolist())]

    def nbest(self, log_probs: Tensor, lengths: Tensor, k: int) -> list[list[tuple[list[int], float]]]:
        """Batch version of `nbest_one`: (B, T, V), (B,) -> per item up to k (label ids, score)."""
        lp = log_probs.detach().float().cpu().numpy()
        return [self.nbest_one(lp[b, : int(n)], k) for b, n in enumerate(lengths.tolist())]


def make_decoder(
    method: str,
    vocab: Sequence[str],
    beam_size: int = 10,
    lm_path: Path | None = None,
    lm_weight: float = 0.0,
) -> CTCDecoder:
    """A callable (log_probs (B,T,V), lengths (B,)) -> list[list[int]] for `method` ("greedy" or "beam").

    An LM is only used by beam search; asking greedy for one raises DecodingError.
    """
    if method == "greedy":
        if lm_path is not None:
            raise DecodingError("an LM needs beam search: pass --method beam with --lm")
        return greedy_ctc
    if method == "beam":
        return BeamSearchDecoder(vocab, beam_size, lm_path, lm_weight).decode
    raise DecodingError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
