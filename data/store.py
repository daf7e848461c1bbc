"""Sharded on-disk storage of a prepared data folder (the format is in docs/design.md section 4.1).

```
OUT/lang/vocab.txt  cmvn.json  plm.json (optional)
OUT/<split>/manifest.jsonl  feats/shard-NNNNN.npy  plm/shard-NNNNN.npy (optional)  prepare_report.json
```
Feature shards are float16 (total_frames, F) arrays of raw features (F = 80 fbank bins, 83 with pitch),
utterances concatenated in manifest order; PLM shards are float16 (total_tokens, D). Readers memory-map
shards lazily, so a training epoch reads them sequentially without loading whole files. Every writer is
atomic (temp file in the same folder + rename). Manifest lines and plm.json are read into, and written from,
the typed records of data/records.py (`ManifestEntry`, `FeatureRef`, `PLMRef`, `PLMInfo`), re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data.records import FeatureRef, ManifestEntry, PLMInfo, PLMRef, StoreError
from data.vocab import Vocabulary

MANIFEST = "manifest.jsonl"
REPORT = "prepare_report.json"
FEATS_DIR = "feats"
PLM_DIR = "plm"


# ----------------------------------------------------------------------------------------------------------
# atomic writers


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write a JSON file (UTF-8, indented) atomically."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-00000.npy."""
    return f"shard-{index:05d}.npy"


def write_shard(path: Path, arrays: Sequence[np.ndarray], dim: int) -> list[int]:
    """Concatenate 2-D arrays (T_i, dim) into one float16 .npy file, written atomically.

    Returns the row offset of each array. An empty list writes a (0, dim) array.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, total = [], 0
    for a in arrays:
        if a.ndim != 2 or a.shape[1] != dim:
            raise ValueError(f"expected arrays of shape (T, {dim}), got {a.shape}")
        offsets.append(total)
        total += a.shape[0]
    out = np.empty((total, dim), dtype=np.float16)
    for a, off in zip(arrays, offsets, strict=True):
        out[off : off + a.shape[0]] = a
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, out)
    os.replace(tmp, path)
    return offsets


def write_manifest(split_dir: Path, entries: Iterable[ManifestEntry]) -> None:
    """Write `split_dir/manifest.jsonl` (one JSON object per entry, one per line) atomically."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in entries]
    write_text_atomic(Path(split_dir) / MANIFEST, "".join(lines))


def write_vocab(lang_dir: Path, vocab: Vocabulary) -> None:
    """Write `lang_dir/vocab.txt`."""
    Path(lang_dir).mkdir(parents=True, exist_ok=True)
    vocab.to_file(Path(lang_dir) / "vocab.txt")


def write_cmvn(lang_dir: Path, mean: np.ndarray, std: np.ndarray, frames: int, frontend: str) -> None:
    """Write `lang_dir/cmvn.json`: {"dim", "frames", "frontend", "mean", "std"}; mean and std are (dim,),
    `frontend` names the data.features front end the features were computed with."""
    write_json_atomic(
        Path(lang_dir) / "cmvn.json",
        {
            "dim": len(mean),
            "frames": int(frames),
            "frontend": frontend,
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in std],
        },
    )


def write_plm_info(
    lang_dir: Path, *, name: str, source: str, width: int, layer: int, mean: np.ndarray, std: np.ndarray
) -> PLMInfo:
    """Write `lang_dir/plm.json` naming the teacher and the per-dimension mean/std (D,) of train tokens;
    returns what it wrote."""
    info = PLMInfo(name, source, int(width), int(layer), [float(x) for x in mean], [float(x) for x in std])
    write_json_atomic(Path(lang_dir) / "plm.json", info.to_json())
    return info


def write_split(
    split_dir: Path,
    utterances: Sequence[dict],
    *,
    vocab: Vocabulary,
    shard_frames: int = 500_000,
) -> list[ManifestEntry]:
    """Write a whole split from in-memory utterances (used by tests and small tools).

    Each utterance dict has "id", "text" (normalised), "feats" (T, 80) array, optional "speaker",
    optional "duration" (default T * 10 ms), optional "plm_tokens" (list[str]) with "plm_feats" (M, D).
    Shards are cut every `shard_frames` frames. Returns the manifest entries (also written to disk).
    """
    split_dir = Path(split_dir)
    groups: list[list[dict]] = [[]]
    frames = 0
    for u in utterances:
        if groups[-1] and frames + len(u["feats"]) > shard_frames:
            groups.append([])
            frames = 0
        groups[-1].append(u)
        frames += len(u["feats"])
    entries = []
    for index, group in enumerate(groups):
        if not group:
            continue
        feat_offsets = write_shard(split_dir / FEATS_DIR / shard_name(index), [u["feats"] for u in group], 80)
        plm_offsets = None
        if "plm_feats" in group[0]:
            dim = group[0]["plm_feats"].shape[1]
            plm_offsets = write_shard(
                split_dir / PLM_DIR / shard_name(index), [u["plm_feats"] for u in group], dim
            )
        for i, u in enumerate(group):
            plm = None
            if plm_offsets is not None:
                plm_shard = f"{PLM_DIR}/{shard_name(index)}"
                plm = PLMRef(plm_shard, plm_offsets[i], len(u["plm_feats"]), list(u["plm_tokens"]))
            entries.append(
                ManifestEntry(
                    id=u["id"],
                    duration=float(u.get("duration", round(len(u["feats"]) * 0.01, 3))),
                    num_frames=len(u["feats"]),
                    text=u["text"],
                    token_ids=vocab.encode(u["text"]),
                    speaker=u.get("speaker"),
                    feats=FeatureRef(f"{FEATS_DIR}/{shard_name(index)}", feat_offsets[i]),
                    plm=plm,
                )
            )
    write_manifest(split_dir, entries)
    return entries


# ----------------------------------------------------------------------------------------------------------
# readers


def read_manifest(split_dir: Path) -> list[ManifestEntry]:
    """Read `split_dir/manifest.jsonl` into its entries, in file order (format in docs/design.md section 4.1).

    StoreError naming the file and line for invalid JSON or an entry with a missing or invalid key."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise StoreError(f"no manifest: {path} (run `gmot prepare` first)")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
            entries.append(ManifestEntry.from_json(obj, f"{path}:{lineno}"))
    return entries


class SplitReader:
    """Random access to a prepared split's features; shards are memory-mapped lazily on first use.

    Safe to use in DataLoader workers: the open memory maps are not pickled, each process maps its own.
    """

    def __init__(self, split_dir: Path):
        self.split_dir = Path(split_dir)
        self.records: list[ManifestEntry] = read_manifest(self.split_dir)
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _rows(self, loc: FeatureRef | PLMRef, count: int, record: ManifestEntry) -> np.ndarray:
        """Rows offset..offset + count of the shard `loc` names, as (count, width) float32; StoreError naming
        the shard, the utterance `record` and how to rebuild the shard when it cannot give them."""
        rel, off = loc.shard, loc.offset
        path = self.split_dir / rel
        arr = self._maps.get(rel)
        if arr is None:
            if not path.is_file():
                raise StoreError(_shard_problem(path, "is missing", record))
            try:
                arr = _map_shard(path)
            except (ValueError, OSError, EOFError) as err:
                raise StoreError(_shard_problem(path, f"is truncated or corrupt ({err})", record)) from None
            self._maps[rel] = arr
        if off + count > arr.shape[0]:
            what = f"holds {arr.shape[0]} rows where the manifest needs {off + count}"
            raise StoreError(_shard_problem(path, what, record))
        return np.array(arr[off : off + count], dtype=np.float32)

    def features(self, record: ManifestEntry) -> np.ndarray:
        """Raw features of one entry: (num_frames, F) float32 (no CMVN)."""
        return self._rows(record.feats, record.num_frames, record)

    def plm_features(self, record: ManifestEntry) -> np.ndarray | None:
        """Raw PLM token features of one entry: (num_tokens, D) float32, or None without a PLM cache."""
        if record.plm is None:
            return None
        return self._rows(record.plm, record.plm.num_tokens, record)


def _map_shard(path: Path) -> np.ndarray:
    """Memory-map a (rows, width) shard; ValueError, OSError or EOFError when the file is truncated, is not
    a .npy array or is not two-dimensional (its header and size are checked, its values are not read)."""
    arr = np.load(path, mmap_mode="r")
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise ValueError("not a (rows, width) array")
    return arr


def _shard_problem(path: Path, what: str, record: ManifestEntry) -> str:
    return (
        f"shard {path} {what}; it holds utterance {record.id!r}. Re-run `gmot prepare` with the same "
        "arguments to rebuild it: it resumes, redoing only the shards that are missing or damaged"
    )


def shard_rows(path: Path) -> int | None:
    """Number of rows of the shard at `path`, or None when it is missing, truncated or corrupt (how
    `gmot prepare` tells a finished shard from one to redo)."""
    try:
        return int(_map_shard(Path(path)).shape[0])
    except (ValueError, OSError, EOFError):
        return None


def read_vocab(lang_dir: Path) -> list[str]:
    """Units of `lang_dir/vocab.txt`, index = id (0 = <blank>, 1 = <unk>)."""
    path = Path(lang_dir) / "vocab.txt"
    if not path.is_file():
        raise StoreError(f"no vocabulary: {path}")
    return Vocabulary.from_file(path).units


def read_cmvn(lang_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean (80,), std (80,)) float32 from `lang_dir/cmvn.json`."""
    path = Path(lang_dir) / "cmvn.json"
    if not path.is_file():
        raise StoreError(f"no CMVN statistics: {path}")
    d = json.loads(path.read_text(encoding="utf-8"))
    return np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32)


def read_frontend(lang_dir: Path) -> str:
    """The feature front end named in `lang_dir/cmvn.json` ("kaldi-snip" for folders prepared before front
    ends were named). StoreError when the file is missing."""
    path = Path(lang_dir) / "cmvn.json"
    if not path.is_file():
        raise StoreError(f"no CMVN statistics: {path}")
    from data.features import frontend

    try:
        return frontend(json.loads(path.read_text(encoding="utf-8")).get("frontend")).name
    except ValueError as err:  # a folder written by a gmot that knows more front ends
        raise StoreError(f"{path}: {err}") from None


def frontend_mismatch(data_dir: Path, model_frontend: str) -> str | None:
    """None when the prepared folder `data_dir` (its lang/cmvn.json) has features of `model_frontend`, or
    names no lang folder; else a sentence saying what each side is and how to prepare the data to match."""
    lang = Path(data_dir) / "lang"
    if not (lang / "cmvn.json").is_file():
        return None
    data_frontend = read_frontend(lang)
    if data_frontend == model_frontend:
        return None
    return (
        f"{data_dir} has {data_frontend!r} features but the model was trained on {model_frontend!r} "
        f"features: prepare it again with --frontend {model_frontend}"
    )


def read_plm_info(lang_dir: Path) -> PLMInfo | None:
    """The teacher of `lang_dir/plm.json` (name, source, width, layer, mean, std), or None when absent.

    StoreError naming the file when it is not JSON or has a missing or invalid key."""
    path = Path(lang_dir) / "plm.json"
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: invalid JSON ({exc})") from exc
    return PLMInfo.from_json(obj, str(path))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 8 MB chunks (identifies model images and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()
