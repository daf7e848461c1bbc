"""CTC decoding: batched greedy search, beam search with flashlight-text (optional KenLM), and the loop that
turns a loaded model plus raw fbank features into transcripts with timings.

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
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.features import FRAME_SHIFT_S, apply_cmvn, feature_width_mismatch
from data.vocab import Vocabulary
from models.diagnostics import ctc_token_spans

BLANK_ID = 0
METHODS = ("greedy", "beam")


class DecodingError(Exception):
    """A decoding set-up that cannot work (unreadable LM file, bad option); the message names the cause."""


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


def load_kenlm(path: Path, vocab: Sequence[str]):
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
):
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


@dataclass
class Utterance:
    """One utterance to decode: raw (T, F) features (no CMVN; F = 80 fbank, or 83 with pitch) and its duration
    in seconds."""

    id: str
    feats: np.ndarray
    duration: float


@dataclass
class Hypothesis:
    """A decoded utterance: label ids, text, audio duration and the decode time charged to it (seconds);
    `times`: per character (char, start s, end s) from the CTC forced alignment of the hypothesis on the
    model's output; `confidence`: the mean over characters of the posterior the model gives each character
    on its frames (None for an empty hypothesis); `nbest`: (text, score) alternatives of beam search."""

    id: str
    ids: list[int]
    text: str
    duration: float
    decode_time: float
    times: list[tuple[str, float, float]] | None = None
    confidence: float | None = None
    nbest: list[tuple[str, float]] | None = None


def batches_by_frames(lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Group indices into batches whose padded size (longest * count) stays within `max_frames`.

    Indices are sorted by length (longest first) so padding is small; an utterance longer than `max_frames`
    forms a batch of its own. Returns lists of indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and max(longest, n) * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def padded_batch(feats: Sequence[np.ndarray], mean: Tensor, std: Tensor, device: str | torch.device):
    """Raw feature arrays (T_i, F) -> CMVN-normalised zero-padded (B, T_max, F) tensor and (B,) lengths.

    Raises DecodingError when F is not the width of the CMVN statistics (data prepared with or without
    pitch unlike the model's training data)."""
    mismatch = feature_width_mismatch(feats[0].shape[1], mean.shape[0])
    if mismatch:
        raise DecodingError(mismatch)
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1], dtype=torch.float32)
    for b, f in enumerate(feats):
        out[b, : f.shape[0]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
    out = out.to(device)
    valid = (torch.arange(out.shape[1], device=out.device)[None, :] < lengths.to(out.device)[:, None])[
        ..., None
    ]
    out = apply_cmvn(out, mean.to(out.device), std.to(out.device)) * valid
    return out, lengths.to(device)


def transcribe(
    model: torch.nn.Module,
    vocab: Sequence[str],
    cmvn_mean: Tensor,
    cmvn_std: Tensor,
    utterances: Sequence[Utterance],
    decoder,
    batch_frames: int = 20000,
    device: str | torch.device = "cpu",
    progress=None,
    nbest: int = 1,
    timestamps: bool = True,
) -> list[Hypothesis]:
    """Decode utterances with `model` (eval mode) and `decoder` (see `make_decoder`).

    `nbest` > 1 (beam search only) keeps that many distinct hypotheses per utterance; `timestamps` adds each
    character's times and the utterance's confidence (a CTC forced alignment of the hypothesis, charged to
    the decode time).

    Batches by padded frames (`batches_by_frames`); each batch's wall time (CMVN, forward, search) is shared
    among its utterances in proportion to their frames. Utterances shorter than the model's minimum input
    (`model.cfg.min_input_frames`: 7 frames at x4) decode to an empty hypothesis. `progress(n)` is called
    after each batch with its size.
    Returns hypotheses in the input order.
    """
    shortest = model.cfg.min_input_frames
    units = Vocabulary(list(vocab))
    searcher = getattr(decoder, "__self__", None)
    if nbest > 1 and not isinstance(searcher, BeamSearchDecoder):
        raise DecodingError(f"--nbest {nbest} needs beam search (--method beam)")
    frame_s = frames_to_seconds(1) * model.cfg.subsampling
    results: list[Hypothesis | None] = [None] * len(utterances)
    usable = [i for i, u in enumerate(utterances) if u.feats.shape[0] >= shortest]
    for i, u in enumerate(utterances):
        if u.feats.shape[0] < shortest:
            results[i] = Hypothesis(u.id, [], "", u.duration, 0.0)
    lengths = [utterances[i].feats.shape[0] for i in usable]
    for batch in batches_by_frames(lengths, batch_frames):
        idx = [usable[j] for j in batch]
        start = time.perf_counter()
        with torch.inference_mode():
            feats, lens = padded_batch([utterances[i].feats for i in idx], cmvn_mean, cmvn_std, device)
            out = model(feats, lens)
            if nbest > 1:
                assert isinstance(searcher, BeamSearchDecoder)
                lists = searcher.nbest(out["log_probs"], out["lengths"], nbest)
                ids = [alts[0][0] for alts in lists]
            else:
                lists = None
                ids = decoder(out["log_probs"], out["lengths"])
            aligned = (
                [
                    ctc_token_spans(out["log_probs"][k, : int(out["lengths"][k])], ids[k])
                    for k in range(len(ids))
                ]
                if timestamps
                else [None] * len(ids)
            )
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        total = float(lens.sum())
        for k, i in enumerate(idx):
            u = utterances[i]
            share = elapsed * float(lens[k]) / total
            hyp = Hypothesis(u.id, ids[k], units.decode(ids[k]), u.duration, share)
            spans = aligned[k]
            if spans is not None:
                hyp.times = [
                    (vocab[tok], round(s0 * frame_s, 3), round(s1 * frame_s, 3))
                    for tok, (s0, s1, _) in zip(ids[k], spans, strict=True)
                ]
                hyp.confidence = sum(p for _, _, p in spans) / len(spans) if spans else None
            if lists is not None:
                hyp.nbest = [(units.decode(alt), round(score, 4)) for alt, score in lists[k]]
            results[i] = hyp
        if progress is not None:
            progress(len(idx))
    return [r for r in results if r is not None]


def real_time_factor(hyps: Sequence[Hypothesis]) -> float:
    """Total decode time / total audio duration (nan when there is no audio)."""
    audio = sum(h.duration for h in hyps)
    return sum(h.decode_time for h in hyps) / audio if audio > 0 else math.nan


def frames_to_seconds(num_frames: int) -> float:
    """Duration in seconds of `num_frames` 10 ms fbank frames."""
    return num_frames * FRAME_SHIFT_S


def split_utterances(split_dir: Path) -> tuple[list[Utterance], dict[str, str]]:
    """Utterances of a prepared split (raw fbank from its shards) and its references {id: text}.

    Raises data.store.StoreError when the split is not prepared (no manifest) or a shard is missing.
    """
    from data.store import SplitReader

    reader = SplitReader(Path(split_dir))
    utts = [
        Utterance(
            str(r["id"]),
            reader.features(r),
            float(r.get("duration") or frames_to_seconds(int(r["num_frames"]))),
        )
        for r in reader.records
    ]
    refs = {str(r["id"]): str(r.get("text") or "") for r in reader.records if "text" in r}
    return utts, refs


def wav_utterances(paths: Sequence[Path], width: int = 80, frontend: str | None = None) -> list[Utterance]:
    """Utterances from audio files: any sample rate (resampled to 16 kHz), multi-channel averaged to mono;
    the features a model taking `width` columns was trained on: (T, 80) fbank, or (T, 83) with pitch, from
    front end `frontend` (data.features.FRONTENDS; None: the default).

    The id is the file name without its extension (the full path when two files share a name). Raises
    data.features.AudioError naming the file when one cannot be read, DecodingError for another width.
    """
    from data.features import DEFAULT_FRONTEND, SAMPLE_RATE, compute_features, has_pitch, load_audio

    try:
        pitch = has_pitch(width)
    except ValueError as err:
        raise DecodingError(f"the model takes {width}-dim input: {err}") from None

    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    out = []
    for p, stem in zip(paths, stems, strict=True):
        wave = load_audio(p)
        utt_id = stem if stems.count(stem) == 1 else str(p)
        feats = compute_features(wave, pitch, frontend or DEFAULT_FRONTEND)
        out.append(Utterance(utt_id, feats, wave.shape[0] / SAMPLE_RATE))
    return out


def write_hypotheses(out_dir: Path, hyps: Sequence[Hypothesis], summary: dict) -> None:
    """Write OUT/text (Kaldi style: id, space, hypothesis), OUT/details.jsonl (id, hyp, duration,
    decode_time, and where known confidence, times [[char, start s, end s], ...] and nbest [{hyp, score}])
    and OUT/rtf.json (`summary`), each atomically (temp file + os.replace)."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "text": "".join(f"{h.id} {h.text}\n" if h.text else f"{h.id}\n" for h in hyps),
        "details.jsonl": "".join(
            json.dumps(
                {
                    "id": h.id,
                    "hyp": h.text,
                    "duration": round(h.duration, 4),
                    "decode_time": round(h.decode_time, 6),
                    **({"confidence": round(h.confidence, 4)} if h.confidence is not None else {}),
                    **({"times": [list(t) for t in h.times]} if h.times is not None else {}),
                    **({"nbest": [{"hyp": t, "score": sc} for t, sc in h.nbest]} if h.nbest else {}),
                },
                ensure_ascii=False,
            )
            + "\n"
            for h in hyps
        ),
        "rtf.json": json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
    }
    for name, content in files.items():
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, out_dir / name)
