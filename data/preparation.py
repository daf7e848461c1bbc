"""The `gmot prepare` pipeline: utterance records -> audio -> fbank -> float16 shards, CMVN, vocabulary,
PLM cache and reports (the folder format is in data/store.py and docs/design.md section 4.1).

Steps, per split:
1. normalise transcripts (empty -> skipped), probe durations from audio headers (missing / unreadable files
   and audio longer than `max_duration` are skipped before any decoding);
2. cut the records into shards of at most `shard_frames` frames; each shard is one task, run inline or in a
   pool of worker processes (`jobs`); a task reads, resamples and featurises its utterances, skips bad ones
   and writes `feats/shard-N.npy` then `parts/feats-N.json` (kept utterances, skips, CMVN sums), both atomic;
3. a shard whose part file exists with the same fingerprint (ids, audio, text, settings) is not redone, so an
   interrupted run resumes where it stopped (unless the shard file is missing, truncated or holds other than
   the part's rows: then it is redone);
4. the vocabulary and global CMVN come from the train split (or from an existing lang folder);
5. optionally the PLM teacher (any object with name, source, width, layer and `encode(texts)`) runs in this
   process over each shard's transcripts -> `plm/shard-N.npy` + `parts/plm-N.json`, resumable likewise;
   the per-dimension mean/std over train tokens goes to lang/plm.json;
6. manifest.jsonl and prepare_report.json per split.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile

from data import corpora
from data.corpora import Skip, UtteranceRecord
from data.features import (
    DEFAULT_FRONTEND,
    FRAME_SHIFT_S,
    LEGACY_FRONTEND,
    SAMPLE_RATE,
    AudioError,
    CMVNStats,
    compute_features,
    duration_to_frames,
    feature_dim,
    frontend,
    has_pitch,
    load_audio,
    speed_perturb,
    speed_prefix,
)
from data.ngram import LM_FILE_GLOB, lm_file_name, train_char_lm
from data.store import (
    FEATS_DIR,
    MANIFEST,
    PLM_DIR,
    REPORT,
    StoreError,
    read_cmvn,
    read_frontend,
    read_plm_info,
    shard_name,
    shard_rows,
    write_cmvn,
    write_json_atomic,
    write_manifest,
    write_plm_info,
    write_shard,
)
from data.vocab import Vocabulary, normalize_mandarin

PARTS_DIR = "parts"
_FEATURE_VERSION = 1  # bump when the feature computation changes, so old shards are redone
DEFAULT_SHARD_FRAMES = 200_000  # 2,000 s of audio, 32 MB of float16 per shard
DEFAULT_MAX_DURATION = 30.0
SUBSAMPLING = 4


class PrepareError(Exception):
    """A run that cannot go on (no train split and no --lang, inconsistent lang folder); names the cause."""


class Teacher(Protocol):
    """What the pipeline needs of a PLM teacher (models.nn.plm.PLMTeacher satisfies it)."""

    name: str
    source: str
    width: int
    layer: int

    def encode(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]: ...


@dataclass
class SplitInput:
    """One split to prepare: its name (folder name under OUT), records and skips from the corpus reader."""

    name: str
    records: list[UtteranceRecord]
    skips: list[Skip] = field(default_factory=list)
    source: str = ""


@dataclass
class PrepareOptions:
    """Pipeline settings. `max_duration` seconds (None = no limit); `jobs` worker processes (1 = inline);
    `shard_frames` frames per feature shard; `plm_batch_size` transcripts per teacher.encode call;
    `lm_order` order of the character n-gram LM of the train transcripts written to lang/ (0: none);
    `pitch` appends 3 pitch features to the 80 fbank bins (data.features.compute_pitch), meant for tonal
    languages; with `lang_dir` (no train split) the lang folder's CMVN width decides instead.
    `speed_perturb`: speed factors for the train split (e.g. (0.9, 1.0, 1.1), the standard AISHELL-1
    setting): a copy of every train utterance per factor other than 1.0, ids and speakers prefixed
    "sp<factor>-" (Kaldi's convention), the originals kept only when 1.0 is among them; () = none.
    `frontend`: the fbank front end (data.features.FRONTENDS), written to lang/cmvn.json; with `lang_dir`
    the lang folder's front end decides instead."""

    max_duration: float | None = DEFAULT_MAX_DURATION
    jobs: int = 1
    shard_frames: int = DEFAULT_SHARD_FRAMES
    plm_batch_size: int = 64
    lm_order: int = 3
    pitch: bool = False
    speed_perturb: tuple[float, ...] = ()
    frontend: str = DEFAULT_FRONTEND

    def __post_init__(self) -> None:
        frontend(self.frontend)  # ValueError naming the known front ends, before any work starts


@dataclass
class SplitSummary:
    """What one split ended with (also written as prepare_report.json)."""

    name: str
    utterances: int
    frames: int
    seconds: float
    skipped: list[Skip]
    plm_tokens: int | None = None
    source: str = ""

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    def skipped_by_reason(self) -> dict[str, list[dict]]:
        """{reason: [{"id", "detail"}, ...]} sorted by reason."""
        out: dict[str, list[dict]] = {}
        for s in self.skipped:
            out.setdefault(s.reason, []).append({"id": s.id, "detail": s.detail})
        return dict(sorted(out.items()))

    def to_report(self) -> dict:
        """The prepare_report.json content."""
        by_reason = self.skipped_by_reason()
        return {
            "split": self.name,
            "source": self.source,
            "utterances": self.utterances,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "hours": round(self.hours, 4),
            "plm_tokens": self.plm_tokens,
            "skipped_total": len(self.skipped),
            "skipped_counts": {k: len(v) for k, v in by_reason.items()},
            "skipped": by_reason,
        }


@dataclass
class PrepareResult:
    """Summaries per split (in input order) plus the lang folder used."""

    out_dir: Path
    splits: list[SplitSummary]
    vocab_size: int | None
    plm: dict | None
    error: str | None = None  # set when the train split ended empty (no lang written)

    @property
    def empty_splits(self) -> list[str]:
        return [s.name for s in self.splits if s.utterances == 0]


# ----------------------------------------------------------------------------------------------------------
# progress


class ProgressSink(Protocol):
    """Minimal progress interface (rich.progress.Progress fits: add_task / update(advance=))."""

    def add_task(self, description: str, total: float | None = ..., **kwargs: Any) -> Any: ...

    def update(self, task_id: Any, **kwargs: Any) -> None: ...


class _NullProgress:
    def add_task(self, description: str, total: float | None = None, **kwargs: Any) -> int:
        return 0

    def update(self, task_id: Any, **kwargs: Any) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------
# step 1: normalise and probe


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


def _screen(split: SplitInput, options: PrepareOptions) -> tuple[list[dict], list[Skip]]:
    """Normalise transcripts and probe durations -> (work items, skips). A work item is a plain dict."""
    from concurrent.futures import ThreadPoolExecutor

    skips = list(split.skips)
    pending: list[tuple[UtteranceRecord, str]] = []
    for rec in split.records:
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
        if options.max_duration is not None and duration > options.max_duration:
            skips.append(
                Skip(rec.id, corpora.TOO_LONG, f"{duration:.2f} s > --max-duration {options.max_duration}")
            )
            continue
        items.append(
            {
                "id": rec.id,
                "audio": rec.audio,
                "start": rec.start,
                "end": rec.end,
                "text": text,
                "speaker": rec.speaker,
                "est_frames": duration_to_frames(duration, options.frontend),
            }
        )
    return items, skips


def speed_perturbed(items: list[dict], factors: Sequence[float]) -> list[dict]:
    """The screened train items with one copy per speed factor (see PrepareOptions.speed_perturb), grouped
    by factor in the order given; a copy's estimated length is the original's over the factor."""
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


# ----------------------------------------------------------------------------------------------------------
# step 2/3: shards


def _plan_shards(items: list[dict], shard_frames: int) -> list[list[dict]]:
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


def _feature_key(options: PrepareOptions) -> str:
    """The feature settings a shard depends on, as a string for `_fingerprint` (the legacy front end adds
    nothing, so that shards prepared before front ends were named stay valid)."""
    key = "pitch" if options.pitch else ""
    if options.frontend != LEGACY_FRONTEND:
        key += f"|frontend={options.frontend}"
    return key


def _fingerprint(items: list[dict], max_duration: float | None, extra: str = "") -> str:
    """Hash of what a shard's content depends on (its utterances and the settings)."""
    h = hashlib.sha1()
    h.update(json.dumps([_FEATURE_VERSION, max_duration, extra], sort_keys=True).encode())
    for it in items:
        key = [it["id"], it["audio"], it["start"], it["end"], it["text"], it["speaker"]]
        if it.get("speed", 1.0) != 1.0:  # (so that shards prepared before speed perturbation stay valid)
            key.append(it["speed"])
        h.update(json.dumps(key, ensure_ascii=False).encode())
    return h.hexdigest()


def _read_part(path: Path, fingerprint: str) -> dict | None:
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


def _featurise_shard(task: dict) -> dict:
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


# ----------------------------------------------------------------------------------------------------------
# the pipeline


def prepare(
    out_dir: Path,
    splits: Sequence[SplitInput],
    *,
    teacher: Teacher | None = None,
    lang_dir: Path | None = None,
    options: PrepareOptions | None = None,
    progress: ProgressSink | None = None,
) -> PrepareResult:
    """Prepare `splits` into `out_dir` (format in data/store.py); resumable; returns per-split summaries.

    The split named "train" defines the vocabulary and CMVN (written to out_dir/lang); without one,
    `lang_dir` must be an existing prepared lang folder (copied to out_dir/lang unless it is that folder).
    `teacher` (optional): builds the PLM cache. Raises PrepareError for runs that cannot start. A train split
    that ends empty gives a result with `error` set (every split's report is still written).
    """
    options = options or PrepareOptions()
    progress = progress or _NullProgress()
    out_dir = Path(out_dir)
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise PrepareError(f"split names must be unique, got {names}")
    for name in names:
        if name in ("lang", "corpus") or not name or "/" in name or name.startswith("."):
            raise PrepareError(f"invalid split name {name!r}")
    has_train = "train" in names
    out_lang = out_dir / "lang"
    if not has_train:
        if lang_dir is None:
            raise PrepareError(
                "no split named 'train': the train split defines the vocabulary and CMVN; "
                "pass --lang DIR (an existing prepared lang folder) to prepare other splits alone"
            )
        lang_dir = Path(lang_dir)
        if not (lang_dir / "vocab.txt").is_file() or not (lang_dir / "cmvn.json").is_file():
            raise PrepareError(
                f"--lang {lang_dir} is not a prepared lang folder (needs vocab.txt and cmvn.json)"
            )
        try:
            options = dataclasses.replace(
                options, pitch=has_pitch(read_cmvn(lang_dir)[0].shape[0]), frontend=read_frontend(lang_dir)
            )
        except ValueError as err:
            raise PrepareError(f"{lang_dir}/cmvn.json: {err}") from None
        except StoreError as err:
            raise PrepareError(str(err)) from None
        if teacher is not None:
            info = read_plm_info(lang_dir)
            if info is None:
                raise PrepareError(
                    f"{lang_dir} has no plm.json (its train split was prepared without a PLM cache); "
                    "use --no-plm-cache or prepare train with the same --plm"
                )
            if (
                info["width"] != teacher.width
                or info["name"] != teacher.name
                or info["layer"] != teacher.layer
            ):
                raise PrepareError(
                    f"{lang_dir}/plm.json was made with {info['name']} layer {info['layer']} "
                    f"width {info['width']}, not {teacher.name} layer {teacher.layer} width {teacher.width}"
                )
    elif lang_dir is not None:
        raise PrepareError("--lang is only for runs without a train split (train defines the lang folder)")
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. screen every split, then 2. plan and run the feature tasks of all splits together
    screened: dict[str, tuple[list[list[dict]], list[Skip], list[str]]] = {}
    tasks: list[dict] = []
    parts: dict[tuple[str, int], dict] = {}
    for split in splits:
        items, skips = _screen(split, options)
        if split.name == "train" and options.speed_perturb:
            items = speed_perturbed(items, options.speed_perturb)
        shards = _plan_shards(items, options.shard_frames)
        split_dir = out_dir / split.name
        fps = []
        for index, group in enumerate(shards):
            fp = _fingerprint(group, options.max_duration, _feature_key(options))
            fps.append(fp)
            done = _read_part(split_dir / PARTS_DIR / f"feats-{index:05d}.json", fp)
            rows = sum(k["num_frames"] for k in done["kept"]) if done is not None else None
            if rows is not None and shard_rows(split_dir / FEATS_DIR / shard_name(index)) == rows:
                parts[(split.name, index)] = done
                continue
            tasks.append(
                {
                    "split": split.name,
                    "split_dir": str(split_dir),
                    "index": index,
                    "items": group,
                    "fingerprint": fp,
                    "max_duration": options.max_duration,
                    "pitch": options.pitch,
                    "frontend": options.frontend,
                }
            )
        _remove_stale_shards(split_dir, len(shards))
        screened[split.name] = (shards, skips, fps)

    total_frames = sum(it["est_frames"] for t in tasks for it in t["items"])
    task_id = progress.add_task("fbank", total=total_frames * FRAME_SHIFT_S)
    for part, task in _run_tasks(tasks, options.jobs):
        parts[(task["split"], task["index"])] = part
        progress.update(task_id, advance=sum(it["est_frames"] for it in task["items"]) * FRAME_SHIFT_S)

    # 3. gather per split
    gathered: dict[str, tuple[list[dict], list[Skip], CMVNStats]] = {}
    for split in splits:
        shards, skips, _ = screened[split.name]
        kept: list[dict] = []
        stats = CMVNStats(feature_dim(options.pitch))
        skips = list(skips)
        for index in range(len(shards)):
            part = parts[(split.name, index)]
            for k in part["kept"]:
                kept.append({**k, "shard": index})
            skips.extend(Skip(**s) for s in part["skips"])
            stats.merge(CMVNStats.from_dict(part["cmvn"]))
        gathered[split.name] = (kept, skips, stats)

    # 4. lang: vocabulary and CMVN
    vocab: Vocabulary | None = None
    if has_train:
        kept, _, stats = gathered["train"]
        if kept:
            vocab = Vocabulary.build(k["text"] for k in kept)
            out_lang.mkdir(parents=True, exist_ok=True)
            vocab.to_file(out_lang / "vocab.txt")
            mean, std = stats.mean_std()
            write_cmvn(out_lang, mean, std, stats.frames, options.frontend)
            _remove_lms(out_lang)
            if options.lm_order > 0:
                lm_path = out_lang / lm_file_name(options.lm_order)
                train_char_lm((k["text"] for k in kept), lm_path, options.lm_order)
    else:
        assert lang_dir is not None
        if lang_dir.resolve() != out_lang.resolve():
            out_lang.mkdir(parents=True, exist_ok=True)
            lms = [p.name for p in lang_dir.glob(LM_FILE_GLOB)]
            for name in ("vocab.txt", "cmvn.json", "plm.json", *lms):
                if (lang_dir / name).is_file():
                    shutil.copyfile(lang_dir / name, out_lang / f"{name}.tmp")
                    (out_lang / f"{name}.tmp").replace(out_lang / name)
        vocab = Vocabulary.from_file(out_lang / "vocab.txt")
        read_cmvn(out_lang)  # validates

    # 5. PLM cache
    plm_parts: dict[str, list[dict]] = {}
    plm_info = None
    if teacher is not None and vocab is not None:
        plm_parts = _build_plm_cache(out_dir, splits, screened, gathered, teacher, options, progress)
        if has_train:
            stats = CMVNStats(teacher.width)
            for part in plm_parts["train"]:
                stats.merge(CMVNStats.from_dict(part["stats"]))
            if stats.frames:
                mean, std = stats.mean_std()
                write_plm_info(
                    out_lang,
                    name=teacher.name,
                    source=teacher.source,
                    width=teacher.width,
                    layer=teacher.layer,
                    mean=mean,
                    std=std,
                )
        plm_info = read_plm_info(out_lang)
    elif has_train and vocab is not None and (out_lang / "plm.json").exists():
        (out_lang / "plm.json").unlink()  # a stale teacher description from an earlier run with a PLM

    # 6. manifests and reports
    summaries = []
    for split in splits:
        kept, skips, stats = gathered[split.name]
        split_dir = out_dir / split.name
        split_dir.mkdir(parents=True, exist_ok=True)
        records = []
        plm_by_id = {}
        for part in plm_parts.get(split.name, []):
            plm_by_id.update({e["id"]: (part["index"], e) for e in part["entries"]})
        plm_tokens = 0
        for k in kept:
            rec = {
                "id": k["id"],
                "duration": k["duration"],
                "num_frames": k["num_frames"],
                "text": k["text"],
                "token_ids": vocab.encode(k["text"]) if vocab is not None else [],
                "speaker": k["speaker"],
                "feats": {"shard": f"{FEATS_DIR}/{shard_name(k['shard'])}", "offset": k["offset"]},
            }
            if k["id"] in plm_by_id:
                index, e = plm_by_id[k["id"]]
                rec["plm"] = {
                    "shard": f"{PLM_DIR}/{shard_name(index)}",
                    "offset": e["offset"],
                    "num_tokens": e["num_tokens"],
                    "tokens": e["tokens"],
                }
                plm_tokens += e["num_tokens"]
            records.append(rec)
        if vocab is not None or not has_train:
            write_manifest(split_dir, records)
        elif (split_dir / MANIFEST).exists():
            (split_dir / MANIFEST).unlink()  # train ended empty: no lang, so no usable manifest
        summary = SplitSummary(
            name=split.name,
            utterances=len(records),
            frames=stats.frames,
            seconds=sum(k["duration"] for k in kept),
            skipped=sorted(skips, key=lambda s: (s.reason, s.id)),
            plm_tokens=plm_tokens if plm_parts else None,
            source=split.source,
        )
        write_json_atomic(split_dir / REPORT, summary.to_report())
        summaries.append(summary)
    error = None
    if has_train and vocab is None:
        for name in ("vocab.txt", "cmvn.json", "plm.json"):  # never leave a stale lang from an earlier run
            (out_lang / name).unlink(missing_ok=True)
        _remove_lms(out_lang)
        error = (
            f"the train split ended empty (every utterance was skipped; see {out_dir / 'train' / REPORT}); "
            "no vocabulary, CMVN or manifests written"
        )
    return PrepareResult(out_dir, summaries, len(vocab) if vocab is not None else None, plm_info, error)


def _remove_lms(lang_dir: Path) -> None:
    """Delete the character LMs of an earlier run from `lang_dir` (a new train split replaces them)."""
    for old in lang_dir.glob(LM_FILE_GLOB):
        old.unlink()


def _run_tasks(tasks: list[dict], jobs: int):
    """Yield (part, task) as feature tasks finish: inline for jobs <= 1, else a pool of `jobs` processes."""
    if not tasks:
        return
    if jobs <= 1 or len(tasks) == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                yield _featurise_shard(task), task
        finally:
            torch.set_num_threads(threads)
        return
    # forkserver: one clean server process imports torch once, then forks the workers (fast start, and no
    # fork of a parent whose torch thread pools may be in use); spawn where forkserver does not exist
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["data.preparation", "torch", "torchaudio.compliance.kaldi"])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_worker
    ) as pool:
        futures = {pool.submit(_featurise_shard, task): task for task in tasks}
        for fut in as_completed(futures):
            yield fut.result(), futures[fut]


def _remove_stale_shards(split_dir: Path, num_shards: int) -> None:
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


def _build_plm_cache(
    out_dir: Path,
    splits: Sequence[SplitInput],
    screened: dict,
    gathered: dict,
    teacher: Teacher,
    options: PrepareOptions,
    progress: ProgressSink,
) -> dict[str, list[dict]]:
    """Run the teacher over every shard's kept transcripts (in this process); write plm shards + parts.

    Part: {"fingerprint", "index", "entries": [{"id", "offset", "num_tokens", "tokens"}], "stats": sums}.
    """
    teacher_key = json.dumps([teacher.name, teacher.source, teacher.width, teacher.layer])
    todo = []
    out: dict[str, list[dict]] = {}
    for split in splits:
        shards, _, fps = screened[split.name]
        kept = gathered[split.name][0]
        by_shard: dict[int, list[dict]] = {}
        for k in kept:
            by_shard.setdefault(k["shard"], []).append(k)
        out[split.name] = []
        for index in range(len(shards)):
            entries = by_shard.get(index, [])
            fp = hashlib.sha1(
                (fps[index] + teacher_key + "".join(e["id"] for e in entries)).encode()
            ).hexdigest()
            split_dir = out_dir / split.name
            part = _read_part(split_dir / PARTS_DIR / f"plm-{index:05d}.json", fp)
            rows = sum(e["num_tokens"] for e in part["entries"]) if part is not None else None
            if rows is not None and shard_rows(split_dir / PLM_DIR / shard_name(index)) == rows:
                out[split.name].append(part)
            else:
                todo.append((split.name, index, entries, fp))
    task_id = progress.add_task("PLM cache", total=sum(len(e) for _, _, e, _ in todo))
    for split_name, index, entries, fp in todo:
        split_dir = out_dir / split_name
        arrays: list[np.ndarray] = []
        tokens: list[list[str]] = []
        texts = [e["text"] for e in entries]
        counts = collections.Counter(texts)
        unique = list(counts)  # speed-perturbed copies share their transcript: encode it once
        encoded: dict[str, tuple[list[str], np.ndarray]] = {}
        for start in range(0, len(unique), options.plm_batch_size):
            batch = unique[start : start + options.plm_batch_size]
            for text, (toks, feats) in zip(batch, teacher.encode(batch), strict=True):
                matrix = np.asarray(feats, dtype=np.float32).reshape(len(toks), teacher.width)
                encoded[text] = (list(toks), matrix)
            progress.update(task_id, advance=sum(counts[t] for t in batch))
        for text in texts:
            toks, feats = encoded[text]
            arrays.append(feats)
            tokens.append(toks)
        if len(arrays) != len(entries):
            raise PrepareError(f"the PLM teacher returned {len(arrays)} results for {len(entries)} texts")
        offsets = write_shard(split_dir / PLM_DIR / shard_name(index), arrays, teacher.width)
        stats = CMVNStats(teacher.width)
        for a in arrays:
            stats.update(a.astype(np.float16))  # statistics of what is stored
        part = {
            "fingerprint": fp,
            "index": index,
            "entries": [
                {"id": e["id"], "offset": off, "num_tokens": len(t), "tokens": t}
                for e, off, t in zip(entries, offsets, tokens, strict=True)
            ],
            "stats": stats.to_dict(),
        }
        write_json_atomic(split_dir / PARTS_DIR / f"plm-{index:05d}.json", part)
        out[split_name].append(part)
    for parts in out.values():
        parts.sort(key=lambda p: p["index"])
    return out
