"""Steps 1-3 of `gmot prepare` (the pipeline is data/preparation.py): utterances -> fbank shards.

1. `screen`: normalise transcripts (empty -> skipped), probe durations from audio headers (missing /
   unreadable files and audio longer than `max_duration` are skipped before any decoding);
2. `plan_shards` cuts the records into shards of at most `shard_frames` frames; each shard is one task, run
   inline or in a pool of worker processes (`run_tasks`); a task (`featurise_shard`) reads, resamples and
   featurises its utterances, skips bad ones and writes `feats/shard-N.npy` then `parts/feats-N.json` (kept
   utterances, skips, CMVN sums), both atomic;
3. a shard whose part file exists with the same `fingerprint` (ids, audio, text, settings) is not redone, so
   an interrupted run resumes where it stopped (unless the shard file is missing, truncated or holds other
   than the part's rows: then it is redone).

The part files (`PARTS_DIR`, `read_part`) are also how the PLM stage (data/plm_cache.py) resumes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import soundfile

from data import corpora
from data.corpora import Skip, UtteranceRecord
from data.features import (
    LEGACY_FRONTEND,
    SAMPLE_RATE,
    AudioError,
    CMVNStats,
    compute_features,
    duration_to_frames,
    feature_dim,
    load_audio,
    speed_perturb,
    speed_prefix,
)
from data.store import FEATS_DIR, PLM_DIR, shard_name, write_json_atomic, write_shard
from data.vocab import normalize_mandarin

PARTS_DIR = "parts"
_FEATURE_VERSION = 1  # bump when the feature computation changes, so old shards are redone
SUBSAMPLING = 4


def _probe(rec: UtteranceRecord) -> tuple[float | None, Skip | None]:
    """Duration of a record in seconds from its audio header (or the record), or a Skip."""
    path = Path(rec.audio)
    if not path.is_file():
        return None, Skip(rec.id, corpora.MISSING_AUDIO, f"audio file not found: {path}")
    if rec.duration is not None:
        return rec.duration, None
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        return None, Skip(rec.id, corpora.UNREADABLE_AUDIO, f"cannot read audio header of {path}: {exc}")
    total = info.frames / info.samplerate if info.samplerate else 0.0
    start = rec.start or 0.0
    end = rec.end if rec.end is not None and rec.end > 0 else total
    return max(min(end, total) - start, 0.0), None


def screen(
    records: Sequence[UtteranceRecord], reader_skips: Sequence[Skip], max_duration: float | None, front: str
) -> tuple[list[dict], list[Skip]]:
    """Normalise transcripts and probe durations of a split's records -> (work items, skips).

    `reader_skips` are the corpus reader's, kept first in the returned skips; `max_duration` seconds (None =
    no limit); `front` the fbank front end that estimates each item's frames. A work item is a plain dict
    {"id", "audio", "start", "end", "text", "speaker", "est_frames"}.
    """
    from concurrent.futures import ThreadPoolExecutor

    skips = list(reader_skips)
    pending: list[tuple[UtteranceRecord, str]] = []
    for rec in records:
        text = normalize_mandarin(rec.text)
        if not text:
            what = "empty" if not rec.text.strip() else f"only punctuation/spaces ({rec.text.strip()[:40]!r})"
            skips.append(Skip(rec.id, corpora.EMPTY_TRANSCRIPT, f"transcript is {what}"))
            continue
        pending.append((rec, text))
    with ThreadPoolExecutor(max_workers=8) as pool:
        probed = list(pool.map(lambda item: _probe(item[0]), pending))
    items = []
    for (rec, text), (duration, skip) in zip(pending, probed, strict=True):
        if skip is not None:
            skips.append(skip)
            continue
        assert duration is not None
        if max_duration is not None and duration > max_duration:
            skips.append(Skip(rec.id, corpora.TOO_LONG, f"{duration:.2f} s > --max-duration {max_duration}"))
            continue
        items.append(
            {
                "id": rec.id,
                "audio": rec.audio,
                "start": rec.start,
                "end": rec.end,
                "text": text,
                "speaker": rec.speaker,
                "est_frames": duration_to_frames(duration, front),
            }
        )
    return items, skips


def speed_perturbed(items: list[dict], factors: Sequence[float]) -> list[dict]:
    """The screened train items with one copy per speed factor (see data.preparation.PrepareOptions's
    speed_perturb), grouped by factor in the order given; a copy's estimated length is the original's over the
    factor."""
    out: list[dict] = []
    for factor in factors:
        if factor == 1.0:
            out.extend(items)
            continue
        prefix = speed_prefix(factor)
        for it in items:
            copy = {**it, "id": prefix + it["id"], "speed": float(factor)}
            copy["speaker"] = None if it["speaker"] is None else prefix + it["speaker"]
            copy["est_frames"] = max(1, round(it["est_frames"] / factor))
            out.append(copy)
    return out


def plan_shards(items: list[dict], shard_frames: int) -> list[list[dict]]:
    """Cut items (in order) into consecutive groups of at most `shard_frames` estimated frames (>= 1 item)."""
    shards: list[list[dict]] = []
    frames = 0
    for item in items:
        if not shards or (shards[-1] and frames + item["est_frames"] > shard_frames):
            shards.append([])
            frames = 0
        shards[-1].append(item)
        frames += item["est_frames"]
    return shards


def feature_key(pitch: bool, front: str) -> str:
    """The feature settings a shard depends on (pitch features, front end), as a string for `fingerprint` (the
    legacy front end adds nothing, so that shards prepared before front ends were named stay valid)."""
    key = "pitch" if pitch else ""
    if front != LEGACY_FRONTEND:
        key += f"|frontend={front}"
    return key


def is_speed_copy(item: dict) -> bool:
    """Whether an item (or a kept utterance) is a speed-perturbed copy made by `speed_perturbed`."""
    return item.get("speed", 1.0) != 1.0


def fingerprint(items: list[dict], max_duration: float | None, extra: str = "") -> str:
    """Hash (40 hex digits) of what a shard's content depends on: its items, `max_duration` and `extra`
    (the `feature_key`)."""
    h = hashlib.sha1()
    h.update(json.dumps([_FEATURE_VERSION, max_duration, extra], sort_keys=True).encode())
    for it in items:
        key = [it["id"], it["audio"], it["start"], it["end"], it["text"], it["speaker"]]
        if is_speed_copy(it):  # (so that shards prepared before speed perturbation stay valid)
            key.append(it["speed"])
        h.update(json.dumps(key, ensure_ascii=False).encode())
    return h.hexdigest()


def read_part(path: Path, fingerprint: str) -> dict | None:
    """A part file if it exists, parses and matches `fingerprint`; else None."""
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return part if part.get("fingerprint") == fingerprint else None


def min_frames_for_text(num_chars: int) -> int:
    """Fewest fbank frames whose x4-subsampled length ((T - 1) // 2 - 1) // 2 is >= num_chars."""
    return 4 * num_chars + 3


def featurise_shard(task: dict) -> dict:
    """Worker: featurise one shard's items, write the shard .npy and its part file; return the part.

    task: {"split_dir", "index", "items", "fingerprint", "max_duration", "pitch", "frontend"}. Part:
    {"fingerprint", "index", "kept": [{"id", "text", "speaker", "duration", "num_frames", "offset"}],
    "skips": [...], "cmvn": {...}}.
    """
    split_dir = Path(task["split_dir"])
    index = task["index"]
    max_duration = task["max_duration"]
    arrays: list[np.ndarray] = []
    kept: list[dict] = []
    skips: list[dict] = []
    pitch = bool(task["pitch"])
    stats = CMVNStats(feature_dim(pitch))
    for it in task["items"]:
        uid = it["id"]
        try:
            wave = speed_perturb(load_audio(it["audio"], it["start"], it["end"]), it.get("speed", 1.0))
        except AudioError as exc:
            reason = corpora.MISSING_AUDIO if "not found" in str(exc) else corpora.UNREADABLE_AUDIO
            skips.append(Skip(uid, reason, str(exc)).to_dict())
            continue
        duration = wave.shape[0] / SAMPLE_RATE
        if wave.shape[0] == 0:
            skips.append(Skip(uid, corpora.EMPTY_AUDIO, f"{it['audio']} has no samples").to_dict())
            continue
        if max_duration is not None and duration > max_duration:
            detail = f"{duration:.2f} s > --max-duration {max_duration}"
            skips.append(Skip(uid, corpora.TOO_LONG, detail).to_dict())
            continue
        if not np.isfinite(wave).all():
            skips.append(Skip(uid, corpora.UNREADABLE_AUDIO, f"{it['audio']} has NaN/inf samples").to_dict())
            continue
        feats = compute_features(wave, pitch, task["frontend"])
        if feats.shape[0] == 0:
            detail = f"{it['audio']}: {duration * 1000:.1f} ms is shorter than one 25 ms frame"
            skips.append(Skip(uid, corpora.EMPTY_AUDIO, detail).to_dict())
            continue
        need = min_frames_for_text(len(it["text"]))
        if feats.shape[0] < need:
            detail = (
                f"{feats.shape[0]} frames ({duration:.2f} s) give {((feats.shape[0] - 1) // 2 - 1) // 2} "
                f"frames after x{SUBSAMPLING} subsampling, fewer than the {len(it['text'])} characters"
            )
            skips.append(Skip(uid, corpora.TOO_SHORT_FOR_TEXT, detail).to_dict())
            continue
        stats.update(feats)
        arrays.append(feats)
        kept.append(
            {
                "id": uid,
                "text": it["text"],
                "speaker": it["speaker"],
                "duration": round(duration, 4),
                "num_frames": int(feats.shape[0]),
            }
        )
        if is_speed_copy(it):  # the PLM cache copies a speed copy's rows from its original's
            kept[-1]["speed"] = float(it["speed"])
    offsets = write_shard(split_dir / FEATS_DIR / shard_name(index), arrays, feature_dim(pitch))
    for k, off in zip(kept, offsets, strict=True):
        k["offset"] = off
    part = {
        "fingerprint": task["fingerprint"],
        "index": index,
        "kept": kept,
        "skips": skips,
        "cmvn": stats.to_dict(),
    }
    write_json_atomic(split_dir / PARTS_DIR / f"feats-{index:05d}.json", part)
    return part


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_tasks(tasks: list[dict], jobs: int) -> Iterator[tuple[dict, dict]]:
    """Yield (part, task) as feature tasks finish: inline for jobs <= 1, else a pool of `jobs` processes."""
    if not tasks:
        return
    if jobs <= 1 or len(tasks) == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                yield featurise_shard(task), task
        finally:
            torch.set_num_threads(threads)
        return
    # forkserver: one clean server process imports torch once, then forks the workers (fast start, and no
    # fork of a parent whose torch thread pools may be in use); spawn where forkserver does not exist
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["data.feature_shards", "torch", "torchaudio.compliance.kaldi"])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_worker
    ) as pool:
        futures = {pool.submit(featurise_shard, task): task for task in tasks}
        for fut in as_completed(futures):
            yield fut.result(), futures[fut]


def remove_stale_shards(split_dir: Path, num_shards: int) -> None:
    """Delete shard / part files with an index >= num_shards left by an earlier, larger run."""
    for sub, pattern in ((FEATS_DIR, "shard-*.npy"), (PLM_DIR, "shard-*.npy"), (PARTS_DIR, "*.json")):
        folder = split_dir / sub
        if not folder.is_dir():
            continue
        for path in folder.glob(pattern):
            try:
                index = int(path.stem.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if index >= num_shards:
                path.unlink()
