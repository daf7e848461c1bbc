"""Lhotse manifests -> utterance records: a CutSet, or a RecordingSet with its SupervisionSet.

Each utterance is one supervision's span of a single-file, single-channel recording. Manifests are read line
by line (JSONL, gzipped or not, as lhotse writes them) and each line is turned into a lhotse object with
lhotse itself, so a bad line is reported with its file and line number and the rest is still read. Like the
readers in data/corpora.py, bad entries become `Skip`s and only an unusable file raises `CorpusError`.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data import corpora
from data.corpora import CorpusError, Skip, UtteranceRecord, drop_duplicate_ids

INSTALL_HINT = "reading lhotse manifests needs the lhotse package: pip install 'gmot[lhotse]'"
_KEPT_TRANSFORMS = {"Resample"}  # load_audio resamples to 16 kHz itself; other transforms change the audio


def _lhotse() -> Any:
    try:
        import lhotse
    except ImportError:
        raise CorpusError(INSTALL_HINT) from None
    return lhotse


def _items(path: Path) -> Iterator[tuple[int, Any | None, str]]:
    """Yield (line number, lhotse object or None, why it is None) for each non-blank line of a JSONL file."""
    from lhotse.serialization import deserialize_item

    if not path.is_file():
        raise CorpusError(f"lhotse manifest not found: {path}")
    if not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise CorpusError(
            f"{path}: only JSONL lhotse manifests (.jsonl or .jsonl.gz) are read; convert it with "
            "lhotse.load_manifest(path).to_file('name.jsonl.gz')"
        )
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield lineno, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                    continue
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(obj, dict):
                    yield lineno, None, "not a JSON object"
                    continue
                try:
                    yield lineno, deserialize_item(obj), ""
                except Exception as exc:  # lhotse raises whatever its from_dict hits (KeyError, TypeError...)
                    yield lineno, None, f"not a lhotse manifest entry ({type(exc).__name__}: {exc})"
    except (OSError, EOFError) as exc:  # a truncated or non-gzip .gz file
        raise CorpusError(f"cannot read lhotse manifest {path}: {exc}") from None


def _kind(obj: Any) -> str:
    """'cut', 'recording', 'supervision' or the class name of a lhotse object."""
    from lhotse import Recording, SupervisionSegment
    from lhotse.cut import Cut

    if isinstance(obj, Cut):
        return "cut"
    if isinstance(obj, Recording):
        return "recording"
    if isinstance(obj, SupervisionSegment):
        return "supervision"
    return type(obj).__name__


def _read_manifest(path: Path, kind: str, skips: list[Skip]) -> list[tuple[int, Any]]:
    """The (line number, object) entries of one manifest whose first entry must be of `kind`.

    Lines that do not parse, or hold another kind of entry, are reported in `skips` as malformed lines.
    CorpusError when the file is missing, unreadable or its first entry is of another kind.
    """
    entries: list[tuple[int, Any]] = []
    for lineno, obj, why in _items(path):
        where = f"{path}:{lineno}"
        if obj is None:
            reason = corpora.NON_UTF8 if why.startswith("not valid UTF-8") else corpora.BAD_LINE
            skips.append(Skip(where, reason, f"{where}: {why}"))
            continue
        found = _kind(obj)
        if found != kind:
            if not entries:
                first = f"its first entry, line {lineno}, is a {found}"
                raise CorpusError(f"{path} is not a lhotse {_SET_NAMES[kind]} ({first})")
            skips.append(Skip(where, corpora.BAD_LINE, f"{where}: a {found} in a {_SET_NAMES[kind]}"))
            continue
        entries.append((lineno, obj))
    return entries


_SET_NAMES = {"cut": "CutSet", "recording": "RecordingSet", "supervision": "SupervisionSet"}


def _locate(source: str, manifest: Path) -> str:
    """A recording's file path: as given when it exists (or is absolute), else relative to the manifest."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    alt = manifest.parent / path
    return str(alt if alt.exists() else path)


def _recording_problem(recording: Any) -> str:
    """Why a lhotse Recording cannot be read as one mono file ("" when it can)."""
    sources = recording.sources
    if len(sources) != 1:
        return f"recording {recording.id!r} has {len(sources)} audio sources; only one file is supported"
    if sources[0].type != "file":
        return (
            f"recording {recording.id!r} has a {sources[0].type!r} audio source; "
            "only files are supported (write the audio to files first)"
        )
    if recording.num_channels != 1:
        return f"recording {recording.id!r} has {recording.num_channels} channels; only mono is supported"
    transforms = [t["name"] if isinstance(t, dict) else type(t).__name__ for t in recording.transforms or []]
    changed = [t for t in transforms if t not in _KEPT_TRANSFORMS]
    if changed:
        return f"recording {recording.id!r} has audio transforms ({', '.join(changed)}) that are not applied"
    return ""


def _segment(
    uid: str, recording: Any, start: float, duration: float, supervision: Any, manifest: Path
) -> UtteranceRecord | Skip:
    """The record of `supervision`'s span [start, start + duration) of `recording` (clipped to it)."""
    problem = _recording_problem(recording)
    if problem:
        return Skip(uid, corpora.UNSUPPORTED_AUDIO_ENTRY, f"{manifest}: {problem}")
    begin = max(start, 0.0)
    end = min(start + duration, recording.duration)
    if end <= begin:
        why = f"{manifest}: supervision {supervision.id!r} spans no audio of the recording"
        return Skip(uid, corpora.EMPTY_AUDIO, why)
    return UtteranceRecord(
        id=uid,
        audio=_locate(recording.sources[0].source, manifest),
        text=supervision.text or "",
        speaker=supervision.speaker,
        start=begin,
        end=end,
        duration=end - begin,
    )


def read_cuts(path: Path) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Read a lhotse CutSet (JSONL, e.g. from CutSet.from_manifests(...).to_file("cuts.jsonl.gz")).

    Each MonoCut with exactly one supervision becomes one record: id = the cut id, audio = its recording's
    file, start / end = the supervision's span within the recording, text and speaker from the supervision.
    Other cuts (MultiCut, MixedCut, no or several supervisions, a recording that is not one mono file) are
    skips naming the cut id and manifest. Returns (records in file order, skips).
    """
    _lhotse()
    path = Path(path)
    skips: list[Skip] = []
    entries: list[tuple[str, int, UtteranceRecord | Skip]] = []
    for lineno, cut in _read_manifest(path, "cut", skips):
        uid = cut.id
        where = f"{path}:{lineno}"
        kind = type(cut).__name__
        if kind != "MonoCut":
            got: UtteranceRecord | Skip = Skip(
                uid, corpora.UNSUPPORTED_AUDIO_ENTRY, f"{where}: a {kind}; only MonoCuts are supported"
            )
        elif cut.recording is None:
            got = Skip(uid, corpora.NO_AUDIO_ENTRY, f"{where}: the cut has no recording")
        elif not cut.supervisions:
            got = Skip(uid, corpora.NO_TRANSCRIPT, f"{where}: the cut has no supervision")
        elif len(cut.supervisions) > 1:
            ids = ", ".join(repr(s.id) for s in cut.supervisions[:5])
            got = Skip(
                uid,
                corpora.MULTIPLE_SUPERVISIONS,
                f"{where}: {len(cut.supervisions)} supervisions ({ids}); split it with "
                "cuts.trim_to_supervisions() first",
            )
        else:
            sup = cut.supervisions[0]
            got = _segment(uid, cut.recording, cut.start + sup.start, sup.duration, sup, path)
        entries.append((uid, lineno, got))
    records, more = drop_duplicate_ids(entries, str(path))
    return records, skips + more


def read_recordings_supervisions(
    recordings: Path, supervisions: Path
) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Read a lhotse RecordingSet and SupervisionSet (as `lhotse prepare ...` writes them).

    Each supervision becomes one record: id = the supervision id, its span of its recording's file, its text
    and speaker. Supervisions of a recording not in the RecordingSet, or of one that is not a mono file, and
    repeated ids are skips. Returns (records in supervision-file order, skips).
    """
    _lhotse()
    recordings, supervisions = Path(recordings), Path(supervisions)
    skips: list[Skip] = []
    recs: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for lineno, rec in _read_manifest(recordings, "recording", skips):
        recs[rec.id].append((lineno, rec))
    entries: list[tuple[str, int, UtteranceRecord | Skip]] = []
    for lineno, sup in _read_manifest(supervisions, "supervision", skips):
        where = f"{supervisions}:{lineno}"
        found = recs.get(sup.recording_id, [])
        if not found:
            why = f"{where}: recording {sup.recording_id!r} is not in {recordings}"
            got: UtteranceRecord | Skip = Skip(sup.id, corpora.NO_AUDIO_ENTRY, why)
        elif len(found) > 1:
            lines = ", ".join(str(n) for n, _ in found)
            got = Skip(
                sup.id,
                corpora.DUPLICATE_ID,
                f"{where}: recording {sup.recording_id!r} appears on lines {lines} of {recordings}",
            )
        else:
            got = _segment(sup.id, found[0][1], sup.start, sup.duration, sup, recordings)
        entries.append((sup.id, lineno, got))
    records, more = drop_duplicate_ids(entries, str(supervisions))
    return records, skips + more


def read_lhotse(paths: list[Path]) -> tuple[list[UtteranceRecord], list[Skip]]:
    """One CutSet file, or a RecordingSet and a SupervisionSet (either order) -> (records, skips)."""
    _lhotse()
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return read_cuts(paths[0])
    if len(paths) != 2:
        raise CorpusError(
            f"expected a CutSet, or a recordings and a supervisions manifest; got {len(paths)} files"
        )
    kinds = [_first_kind(p) for p in paths]
    if sorted(kinds) != ["recording", "supervision"]:
        raise CorpusError(
            f"expected a RecordingSet and a SupervisionSet, got {paths[0]} ({kinds[0]}) "
            f"and {paths[1]} ({kinds[1]})"
        )
    rec, sup = paths if kinds[0] == "recording" else paths[::-1]
    return read_recordings_supervisions(rec, sup)


def _first_kind(path: Path) -> str:
    """The kind of the first parseable entry of a manifest ("empty" when there is none)."""
    for _, obj, _ in _items(path):
        if obj is not None:
            return _kind(obj)
    return "empty"
