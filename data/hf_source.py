"""Hugging Face datasets -> utterance records: a dataset saved with `save_to_disk` (Dataset or DatasetDict),
or an `audiofolder` directory (metadata.csv / metadata.jsonl beside the audio files).

The preparation pipeline reads audio from files, so audio stored as bytes inside the arrow files is written
once to `audio_dir` (one file per row, named by the utterance id and a hash of the bytes, written atomically;
unchanged rows keep their file and path, so a rerun resumes). Audio given as a path is used in place. Audio is
never decoded through `datasets` (that needs torchcodec and FFmpeg): the column is cast to Audio(decode=False)
and the bytes are checked with soundfile. Bad rows become `Skip`s naming the row and id; a missing folder,
an unknown subset or missing columns raise `CorpusError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile

from data import corpora
from data.corpora import CorpusError, Skip, UtteranceRecord, drop_duplicate_ids

INSTALL_HINT = "reading a saved Hugging Face dataset needs the datasets package: pip install 'gmot[hf]'"
METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # audiofolder's metadata, with a file_name column
_EXTENSIONS = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MPEG": ".mp3"}  # soundfile format -> suffix
_BATCH = 64


@dataclass
class HFColumns:
    """Column names: audio and text (required), id and speaker (optional; id None = "id" if there is one)."""

    audio: str = "audio"
    text: str = "text"
    id: str | None = None
    speaker: str | None = None


Row = dict[str, Any] | str  # a row's wanted columns, or why its line could not be read


@dataclass
class _Rows:
    """A table: its column names, rows(wanted columns) -> (row index, Row) pairs, a name for messages and
    the folder that relative audio paths start from."""

    columns: list[str]
    rows: Callable[[list[str]], Iterator[tuple[int, Row]]]
    where: str
    base: Path


def parse_location(text: str) -> tuple[Path, str | None]:
    """ "DIR" -> (DIR, None); "DIR:SUBSET" -> (DIR, SUBSET) when SUBSET holds no path separator."""
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail and not Path(text).exists():
        return Path(head), tail
    return Path(text), None


def _choose(available: list[str], subset: str | None, split: str, where: str) -> str:
    """The subset to read: `subset` if given, else the one named like the split, else the only one."""
    if subset is not None:
        if subset not in available:
            raise CorpusError(f"{where} has no subset {subset!r} (it has: {', '.join(available) or 'none'})")
        return subset
    if split in available:
        return split
    if len(available) == 1:
        return available[0]
    raise CorpusError(
        f"{where} holds the subsets {', '.join(available)} and none is named {split!r}; "
        f"pick one with --split {split}=DIR:SUBSET"
    )


def _saved_rows(path: Path, subset: str | None, split: str, audio_column: str) -> _Rows:
    """Rows of a dataset saved with save_to_disk, the audio column cast to Audio(decode=False)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(INSTALL_HINT) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, pyarrow errors...
        raise CorpusError(f"cannot load the Hugging Face dataset saved in {path}: {exc}") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        name = _choose(list(ds), subset, split, where)
        ds, where = ds[name], f"{path}:{name}"
    elif subset is not None:
        raise CorpusError(f"{path} holds a single Dataset, not a DatasetDict: drop ':{subset}'")
    if isinstance(ds.features.get(audio_column), datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))

    def rows(wanted: list[str]) -> Iterator[tuple[int, Row]]:
        index = 0
        for batch in ds.select_columns(wanted).iter(batch_size=_BATCH):
            for j in range(len(batch[wanted[0]])):
                yield index, {c: batch[c][j] for c in wanted}
                index += 1

    return _Rows(list(ds.column_names), rows, where, path)


def _audiofolder_rows(folder: Path) -> _Rows:
    """Rows of an audiofolder's metadata file; "audio" = {"bytes": None, "path": folder / file_name}."""
    meta = next(folder / m for m in METADATA_FILES if (folder / m).is_file())
    if meta.suffix == ".csv":
        with open(meta, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            table: list[dict[str, Any] | str] = list(reader)
    else:
        table, names = [], {}
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                table.append(f"{meta}:{lineno}: invalid JSON ({exc.msg})")
                continue
            table.append(obj if isinstance(obj, dict) else f"{meta}:{lineno}: not a JSON object")
            names.update(dict.fromkeys(obj) if isinstance(obj, dict) else {})
        columns = list(names)
    if "file_name" not in columns:
        raise CorpusError(f"{meta} has no file_name column (its columns: {', '.join(columns) or 'none'})")

    def rows(wanted: list[str]) -> Iterator[tuple[int, Row]]:
        for index, row in enumerate(table):
            if isinstance(row, str):
                yield index, row
                continue
            audio = {"bytes": None, "path": str(folder / row["file_name"])} if row.get("file_name") else None
            yield index, {**{c: row.get(c) for c in wanted}, "audio": audio}

    return _Rows(["audio", *(c for c in columns if c != "file_name")], rows, str(meta), folder)


def _open(location: Path, subset: str | None, split: str, audio_column: str) -> _Rows:
    """The rows of `location`: a save_to_disk folder or an audiofolder (or its SUBSET subfolder)."""
    if not location.is_dir():
        raise CorpusError(f"Hugging Face dataset folder not found: {location}")
    if (location / "dataset_dict.json").is_file() or (location / "state.json").is_file():
        return _saved_rows(location, subset, split, audio_column)
    if any((location / m).is_file() for m in METADATA_FILES) and subset is None:
        return _audiofolder_rows(location)
    subsets = sorted(
        d.name for d in location.iterdir() if d.is_dir() and any((d / m).is_file() for m in METADATA_FILES)
    )
    if not subsets and subset is None:
        raise CorpusError(
            f"{location} is neither a dataset saved with save_to_disk (no dataset_dict.json or state.json) "
            f"nor an audiofolder (no {' or '.join(METADATA_FILES)})"
        )
    return _audiofolder_rows(location / _choose(subsets, subset, split, str(location)))


def _materialise(data: bytes, fmt: str, uid: str, audio_dir: Path) -> Path:
    """Write audio bytes to audio_dir/<id>-<hash><ext> (atomically, unless that file already exists)."""
    digest = hashlib.sha1(data).hexdigest()[:16]
    safe = re.sub(r"[^\w.-]", "_", uid)[:80]
    target = audio_dir / f"{safe}-{digest}{_EXTENSIONS.get(fmt, '.' + fmt.lower())}"
    if not (target.is_file() and target.stat().st_size == len(data)):
        audio_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def _row_record(
    index: int, row: dict[str, Any], uid: str, columns: HFColumns, table: _Rows, audio_dir: Path
) -> UtteranceRecord | Skip:
    """One row -> its record, or a Skip naming the row and id."""
    where = f"{table.where} row {index}"
    text = row[columns.text]
    if text is None:
        return Skip(uid, corpora.NO_TRANSCRIPT, f"{where}: no text in column {columns.text!r}")
    audio = row[columns.audio]
    data, path = (audio.get("bytes"), audio.get("path")) if isinstance(audio, dict) else (None, audio)
    if data:
        try:
            info = soundfile.info(io.BytesIO(data))
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            return Skip(uid, corpora.UNREADABLE_AUDIO, f"{where}: audio bytes cannot be decoded ({exc})")
        file = _materialise(data, info.format, uid, audio_dir)
    elif isinstance(path, str) and path:
        file = Path(path).expanduser()
        if not file.is_absolute() and not file.exists():
            file = table.base / file
        if not file.is_file():
            return Skip(uid, corpora.MISSING_AUDIO, f"{where}: audio file not found: {file}")
    else:
        return Skip(
            uid, corpora.MISSING_AUDIO, f"{where}: no audio bytes or path in column {columns.audio!r}"
        )
    speaker = row.get(columns.speaker) if columns.speaker else None
    return UtteranceRecord(uid, str(file), str(text), None if speaker is None else str(speaker))


def read_hf(
    location: str, split: str, columns: HFColumns, audio_dir: Path
) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Read a saved Hugging Face dataset or an audiofolder ("DIR" or "DIR:SUBSET") for the split `split`.

    Without a subset, a DatasetDict (or an audiofolder with subfolders) gives its subset named like `split`,
    or its only one. The id is the id column's value (default: "id" if the dataset has it), else
    "row-NNNNNN" (the row index). Audio bytes are written under `audio_dir` (see the module docstring).
    Returns (records in row order, skips).
    """
    path, subset = parse_location(location)
    table = _open(path, subset, split, columns.audio)
    if columns.id is None and "id" in table.columns:
        columns = HFColumns(columns.audio, columns.text, "id", columns.speaker)
    wanted = [c for c in (columns.audio, columns.text, columns.id, columns.speaker) if c]
    missing = [c for c in dict.fromkeys(wanted) if c not in table.columns]
    if missing:
        raise CorpusError(
            f"{table.where} has no column {', '.join(repr(c) for c in missing)} "
            f"(its columns: {', '.join(table.columns)}); choose with --audio-column / --text-column / "
            "--id-column / --speaker-column"
        )
    skips: list[Skip] = []
    entries: list[tuple[str, int, UtteranceRecord | Skip]] = []
    for index, row in table.rows(list(dict.fromkeys(wanted))):
        if isinstance(row, str):
            skips.append(Skip(f"{table.where} row {index}", corpora.BAD_LINE, row))
            continue
        raw_id = row[columns.id] if columns.id else None
        uid = f"row-{index:06d}" if raw_id is None or str(raw_id) == "" else str(raw_id)
        entries.append((uid, index, _row_record(index, row, uid, columns, table, audio_dir)))
    records, more = drop_duplicate_ids(entries, table.where, "in rows")
    skips.extend(more)
    _remove_unused(audio_dir, {Path(r.audio) for r in records})
    return records, skips


def _remove_unused(audio_dir: Path, used: set[Path]) -> None:
    """Delete files in audio_dir that no record uses (rows of an earlier run that changed or went)."""
    if not audio_dir.is_dir():
        return
    for path in audio_dir.iterdir():
        if path.is_file() and path not in used:
            path.unlink()
