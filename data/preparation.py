"""The `gmot prepare` pipeline: utterance records -> audio -> fbank -> float16 shards, CMVN, vocabulary,
PLM cache and reports (the folder format is in data/store.py and docs/design.md section 4.1).

Steps, per split:
1-3. screen the records, cut them into shards and featurise each shard, inline or in worker processes,
   resumable shard by shard (data/feature_shards.py);
4. the vocabulary, global CMVN and character LM come from the train split (or from an existing lang folder);
5. optionally the PLM cache: the teacher's token features of each shard's transcripts and their train
   statistics in lang/plm.json (data/plm_cache.py);
6. manifest.jsonl and prepare_report.json per split.

This module holds the pipeline's interface (options, inputs, results, errors), checks a run before it starts,
runs the stages in order and does steps 4 and 6 itself.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.corpora import Skip, UtteranceRecord
from data.feature_shards import (
    PARTS_DIR,
    feature_key,
    fingerprint,
    plan_shards,
    read_part,
    remove_stale_shards,
    run_tasks,
    screen,
    speed_perturbed,
)
from data.features import (
    DEFAULT_FRONTEND,
    FRAME_SHIFT_S,
    CMVNStats,
    feature_dim,
    frontend,
    has_pitch,
)
from data.ngram import LM_FILE_GLOB, lm_file_name, train_char_lm
from data.plm_cache import Teacher, build_plm_cache, write_teacher_stats
from data.progress import NullProgress, ProgressSink
from data.store import (
    FEATS_DIR,
    MANIFEST,
    PLM_DIR,
    REPORT,
    FeatureRef,
    ManifestEntry,
    PLMInfo,
    PLMRef,
    StoreError,
    read_cmvn,
    read_frontend,
    read_plm_info,
    shard_name,
    shard_rows,
    write_cmvn,
    write_json_atomic,
    write_manifest,
)
from data.vocab import Vocabulary

DEFAULT_SHARD_FRAMES = 200_000  # 2,000 s of audio, 32 MB of float16 per shard
DEFAULT_MAX_DURATION = 30.0


class PrepareError(Exception):
    """A run that cannot go on (no train split and no --lang, inconsistent lang folder); names the cause."""


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
    plm: PLMInfo | None
    error: str | None = None  # set when the train split ended empty (no lang written)

    @property
    def empty_splits(self) -> list[str]:
        return [s.name for s in self.splits if s.utterances == 0]


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
    progress = progress or NullProgress()
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
            if info.width != teacher.width or info.name != teacher.name or info.layer != teacher.layer:
                raise PrepareError(
                    f"{lang_dir}/plm.json was made with {info.name} layer {info.layer} "
                    f"width {info.width}, not {teacher.name} layer {teacher.layer} width {teacher.width}"
                )
    elif lang_dir is not None:
        raise PrepareError("--lang is only for runs without a train split (train defines the lang folder)")
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. screen every split, then 2. plan and run the feature tasks of all splits together
    screened: dict[str, tuple[list[list[dict]], list[Skip], list[str]]] = {}
    tasks: list[dict] = []
    parts: dict[tuple[str, int], dict] = {}
    for split in splits:
        items, skips = screen(split.records, split.skips, options.max_duration, options.frontend)
        if split.name == "train" and options.speed_perturb:
            items = speed_perturbed(items, options.speed_perturb)
        shards = plan_shards(items, options.shard_frames)
        split_dir = out_dir / split.name
        fps = []
        for index, group in enumerate(shards):
            fp = fingerprint(group, options.max_duration, feature_key(options.pitch, options.frontend))
            fps.append(fp)
            done = read_part(split_dir / PARTS_DIR / f"feats-{index:05d}.json", fp)
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
        remove_stale_shards(split_dir, len(shards))
        screened[split.name] = (shards, skips, fps)

    total_frames = sum(it["est_frames"] for t in tasks for it in t["items"])
    task_id = progress.add_task("fbank", total=total_frames * FRAME_SHIFT_S)
    for part, task in run_tasks(tasks, options.jobs):
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
        fingerprints = {name: screened[name][2] for name in names}
        kept_by_split = {name: gathered[name][0] for name in names}
        plm_parts = build_plm_cache(
            out_dir, fingerprints, kept_by_split, teacher, options.plm_batch_size, progress
        )
        if has_train:
            write_teacher_stats(out_lang, teacher, plm_parts["train"])
        plm_info = read_plm_info(out_lang)
    elif has_train and vocab is not None and (out_lang / "plm.json").exists():
        (out_lang / "plm.json").unlink()  # a stale teacher description from an earlier run with a PLM

    # 6. manifests and reports
    summaries = []
    for split in splits:
        kept, skips, stats = gathered[split.name]
        split_dir = out_dir / split.name
        split_dir.mkdir(parents=True, exist_ok=True)
        entries: list[ManifestEntry] = []
        plm_by_id = {}
        for part in plm_parts.get(split.name, []):
            plm_by_id.update({e["id"]: (part["index"], e) for e in part["entries"]})
        plm_tokens = 0
        for k in kept:
            plm = None
            if k["id"] in plm_by_id:
                index, e = plm_by_id[k["id"]]
                plm = PLMRef(f"{PLM_DIR}/{shard_name(index)}", e["offset"], e["num_tokens"], e["tokens"])
                plm_tokens += e["num_tokens"]
            entries.append(
                ManifestEntry(
                    id=k["id"],
                    duration=k["duration"],
                    num_frames=k["num_frames"],
                    text=k["text"],
                    token_ids=vocab.encode(k["text"]) if vocab is not None else [],
                    speaker=k["speaker"],
                    feats=FeatureRef(f"{FEATS_DIR}/{shard_name(k['shard'])}", k["offset"]),
                    plm=plm,
                )
            )
        if vocab is not None or not has_train:
            write_manifest(split_dir, entries)
        elif (split_dir / MANIFEST).exists():
            (split_dir / MANIFEST).unlink()  # train ended empty: no lang, so no usable manifest
        summary = SplitSummary(
            name=split.name,
            utterances=len(entries),
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
