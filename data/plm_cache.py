"""Step 5 of `gmot prepare` (the pipeline is data/preparation.py): the PLM cache.

The PLM teacher (any object with name, source, width, layer and `encode(texts)`: `Teacher`) runs in this
process over each feature shard's kept transcripts -> `plm/shard-N.npy` + `parts/plm-N.json`, resumable like
the feature shards (a part whose fingerprint matches and whose shard holds its rows is not redone); the
per-dimension mean/std over the train tokens goes to lang/plm.json (`write_teacher_stats`).

The teacher runs once per distinct transcript of a shard. A speed-perturbed copy (its kept entry has a
"speed") shares its original's transcript but sits in another shard (copies are grouped by factor), so its
rows are copied from the first stored shard that holds that transcript instead of being encoded again: with
the usual three factors the teacher runs a third as often. Other utterances are always encoded with their
own shard, so a corpus without speed perturbation gets the same features as before.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from data.feature_shards import PARTS_DIR, is_speed_copy, read_part
from data.features import CMVNStats
from data.progress import ProgressSink
from data.store import PLM_DIR, shard_name, shard_rows, write_json_atomic, write_plm_info, write_shard


class Teacher(Protocol):
    """What the pipeline needs of a PLM teacher (models.nn.plm.PLMTeacher satisfies it)."""

    name: str
    source: str
    width: int
    layer: int

    def encode(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]: ...


def build_plm_cache(
    out_dir: Path,
    fingerprints: dict[str, list[str]],
    kept: dict[str, list[dict]],
    teacher: Teacher,
    batch_size: int,
    progress: ProgressSink,
) -> dict[str, list[dict]]:
    """Run the teacher over every shard's kept transcripts (in this process); write plm shards + parts.

    fingerprints: split name -> the feature fingerprint of each of its shards (one per shard, in order);
    kept: split name -> its kept utterances ({"id", "text", "shard", ...}); batch_size: distinct transcripts
    per `teacher.encode` call. Returns split name -> its parts sorted by shard index, in the order of
    `fingerprints`. Part: {"fingerprint", "index", "entries": [{"id", "offset", "num_tokens", "tokens"}],
    "stats": sums of the stored float16 features}.
    """
    teacher_key = json.dumps([teacher.name, teacher.source, teacher.width, teacher.layer])
    todo = []
    out: dict[str, list[dict]] = {}
    stored = _StoredTranscripts()
    for split_name, fps in fingerprints.items():
        by_shard: dict[int, list[dict]] = {}
        for k in kept[split_name]:
            by_shard.setdefault(k["shard"], []).append(k)
        out[split_name] = []
        for index in range(len(fps)):
            entries = by_shard.get(index, [])
            fp = hashlib.sha1(
                (fps[index] + teacher_key + "".join(e["id"] for e in entries)).encode()
            ).hexdigest()
            split_dir = out_dir / split_name
            part = read_part(split_dir / PARTS_DIR / f"plm-{index:05d}.json", fp)
            rows = sum(e["num_tokens"] for e in part["entries"]) if part is not None else None
            if rows is not None and shard_rows(split_dir / PLM_DIR / shard_name(index)) == rows:
                out[split_name].append(part)
                stored.add(split_dir / PLM_DIR / shard_name(index), part, entries)
            else:
                todo.append((split_name, index, entries, fp))
    todo.sort(key=lambda t: any(is_speed_copy(e) for e in t[2]))  # originals first; copies then reuse them
    task_id = progress.add_task("PLM cache", total=sum(len(e) for _, _, e, _ in todo))
    for split_name, index, entries, fp in todo:
        split_dir = out_dir / split_name
        copied = {e["text"]: stored.lookup(e["text"]) for e in entries if is_speed_copy(e)}
        reuse = [is_speed_copy(e) and copied[e["text"]] is not None for e in entries]
        counts = collections.Counter(e["text"] for e, r in zip(entries, reuse, strict=True) if not r)
        progress.update(task_id, advance=sum(reuse))
        unique = list(counts)  # a shard's utterances of one transcript (several voices): encoded once
        encoded: dict[str, tuple[list[str], np.ndarray]] = {}
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            for text, (toks, feats) in zip(batch, teacher.encode(batch), strict=True):
                matrix = np.asarray(feats, dtype=np.float32).reshape(len(toks), teacher.width)
                encoded[text] = (list(toks), matrix)
            progress.update(task_id, advance=sum(counts[t] for t in batch))
        arrays: list[np.ndarray] = []
        tokens: list[list[str]] = []
        for e, r in zip(entries, reuse, strict=True):
            found = copied.get(e["text"]) if r else None
            toks, feats = found if found is not None else encoded[e["text"]]
            arrays.append(feats)
            tokens.append(toks)
        shard_path = split_dir / PLM_DIR / shard_name(index)
        offsets = write_shard(shard_path, arrays, teacher.width)
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
        stored.add(shard_path, part, entries)
    for parts in out.values():
        parts.sort(key=lambda p: p["index"])
    return out


class _StoredTranscripts:
    """Where the PLM cache already holds each transcript's rows: text -> (shard path, offset, tokens)."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[Path, int, list[str]]] = {}
        self._open: dict[Path, np.ndarray] = {}  # the shards read from so far, memory-mapped

    def add(self, shard: Path, part: dict, kept: list[dict]) -> None:
        """Record the entries of a stored plm part (its shard at `shard`) under their transcripts, which
        `kept` (the shard's kept utterances, {"id", "text", ...}) gives by id."""
        text_of = {k["id"]: k["text"] for k in kept}
        for e in part["entries"]:
            text = text_of.get(e["id"])
            if text is not None:
                self._where.setdefault(text, (shard, int(e["offset"]), list(e["tokens"])))

    def lookup(self, text: str) -> tuple[list[str], np.ndarray] | None:
        """The tokens and (M, width) float32 rows stored for `text`, or None when no shard holds it yet."""
        found = self._where.get(text)
        if found is None:
            return None
        shard, offset, toks = found
        if shard not in self._open:
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            self._open[shard] = np.load(shard, mmap_mode="r")
        rows = self._open[shard][offset : offset + len(toks)]
        return toks, np.asarray(rows, dtype=np.float32)


def write_teacher_stats(lang_dir: Path, teacher: Teacher, parts: list[dict]) -> None:
    """Write lang_dir/plm.json: the teacher's description and the per-dimension mean/std (width,) of the
    features stored in `parts` (the train split's, from `build_plm_cache`); nothing when they hold no
    token."""
    stats = CMVNStats(teacher.width)
    for part in parts:
        stats.merge(CMVNStats.from_dict(part["stats"]))
    if stats.frames:
        mean, std = stats.mean_std()
        write_plm_info(
            lang_dir,
            name=teacher.name,
            source=teacher.source,
            width=teacher.width,
            layer=teacher.layer,
            mean=mean,
            std=std,
        )
