"""Step 5 of `gmot prepare` (the pipeline is data/preparation.py): the PLM cache.

The PLM teacher (any object with name, source, width, layer and `encode(texts)`: `Teacher`) runs in this
process over each feature shard's kept transcripts -> `plm/shard-N.npy` + `parts/plm-N.json`, resumable like
the feature shards (a part whose fingerprint matches and whose shard holds its rows is not redone); the
per-dimension mean/std over the train tokens goes to lang/plm.json (`write_teacher_stats`).
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from data.feature_shards import PARTS_DIR, read_part
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
            else:
                todo.append((split_name, index, entries, fp))
    task_id = progress.add_task("PLM cache", total=sum(len(e) for _, _, e, _ in todo))
    for split_name, index, entries, fp in todo:
        split_dir = out_dir / split_name
        arrays: list[np.ndarray] = []
        tokens: list[list[str]] = []
        texts = [e["text"] for e in entries]
        counts = collections.Counter(texts)
        unique = list(counts)  # utterances of this shard with one transcript (several voices) are encoded once
        encoded: dict[str, tuple[list[str], np.ndarray]] = {}
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            for text, (toks, feats) in zip(batch, teacher.encode(batch), strict=True):
                matrix = np.asarray(feats, dtype=np.float32).reshape(len(toks), teacher.width)
                encoded[text] = (list(toks), matrix)
            progress.update(task_id, advance=sum(counts[t] for t in batch))
        for text in texts:
            toks, feats = encoded[text]
            arrays.append(feats)
            tokens.append(toks)
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
