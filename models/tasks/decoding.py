"""Decoding utterances: reading them (a prepared split, wav files), batching them by frames, the loop that
turns a loaded model plus raw fbank features into transcripts with timings and confidences (`transcribe`, with
any search of `models.tasks.search`), and writing the hypotheses.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.features import FRAME_SHIFT_S, apply_cmvn, feature_width_mismatch
from data.vocab import Vocabulary
from models.engine.diagnostics import ctc_token_spans
from models.tasks.search import BeamSearchDecoder, CTCDecoder, DecodingError


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


def padded_batch(
    feats: Sequence[np.ndarray], mean: Tensor, std: Tensor, device: str | torch.device
) -> tuple[Tensor, Tensor]:
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
    decoder: CTCDecoder,
    batch_frames: int = 20000,
    device: str | torch.device = "cpu",
    progress: Callable[[int], object] | None = None,
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
            r.id,
            reader.features(r),
            float(r.duration or frames_to_seconds(r.num_frames)),
        )
        for r in reader.records
    ]
    refs = {r.id: r.text for r in reader.records}
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
