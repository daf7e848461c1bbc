"""Typed records of a prepared data folder's JSON files (the format is in docs/design.md section 4.1): a line
of `<split>/manifest.jsonl` (`ManifestEntry`, with `FeatureRef` and `PLMRef`) and `lang/plm.json` (`PLMInfo`),
and `StoreError`, which data.store raises for a folder that is missing a file or is inconsistent.

`from_json` checks the keys a reader needs and raises StoreError naming the place (`where`: the file, with
its line for a manifest) and the missing or invalid key. `to_json` writes the keys in the order gmot has
always written them, so a prepared folder is byte-for-byte what earlier versions wrote; keys this version does
not know (from a newer gmot, or added by hand) are kept in `extra` and written back after the known ones.
data.store re-exports every name here (StoreError lives here so that the records can raise it; it is the one
data.store.StoreError).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar


class StoreError(Exception):
    """A prepared folder that is missing a file or is inconsistent; the message names the file.

    Raised in a DataLoader worker, it reaches the main process re-created from the worker's whole traceback
    text (torch's ExceptionWrapper); the constructor keeps only the original message, so that the user reads
    the same one line either way.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].rstrip()
        super().__init__(message)


def _get(obj: dict[str, Any], key: str, kinds: tuple[type, ...], where: str, nullable: bool = False) -> Any:
    """obj[key] when it has one of the types `kinds` (or is None and `nullable`); StoreError otherwise."""
    if key not in obj:
        raise StoreError(f"{where}: missing key {key!r}")
    value = obj[key]
    if (value is None and nullable) or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    names = " or ".join(k.__name__ for k in kinds) + (" or null" if nullable else "")
    raise StoreError(f"{where}: invalid {key!r}: {json.dumps(value, ensure_ascii=False)[:60]} is not {names}")


def _get_list(obj: dict[str, Any], key: str, kinds: tuple[type, ...], where: str) -> list:
    """obj[key] when it is a list of values of the types `kinds`; StoreError otherwise."""
    value = _get(obj, key, (list,), where)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
        names = " or ".join(k.__name__ for k in kinds)
        raise StoreError(f"{where}: invalid {key!r}: not a list of {names}")
    return value


def _object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StoreError(f"{where}: not a JSON object")
    return obj


def _extra(obj: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


_KINDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "str": ((str,), False),
    "int": ((int,), False),
    "list[str]": ((str,), True),
    "list[float]": ((int, float), True),
}
"""A plain field's annotation -> (the JSON types its value may have, whether it is a list of them)."""


@dataclass(frozen=True, slots=True)
class _Record:
    """Base of the records: the `extra` keys and, for a record of plain fields (annotated as in _KINDS),
    `from_json` and `to_json` taking the keys in field order."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    """Keys this version does not know, kept as read and written back after the known ones."""

    @classmethod
    def from_json(cls: type[_R], obj: Any, where: str) -> _R:
        """A parsed JSON object -> the record; StoreError naming `where` and the missing or invalid key."""
        obj = _object(obj, where)
        values = {}
        for name, (kinds, many) in _plain_fields(cls):
            values[name] = (_get_list if many else _get)(obj, name, kinds, where)
        return cls(**values, extra=_extra(obj, tuple(values)))

    def to_json(self) -> dict[str, Any]:
        """The JSON object as gmot writes it: the fields in order, then the extra keys."""
        return {**{name: getattr(self, name) for name, _ in _plain_fields(type(self))}, **self.extra}


_R = TypeVar("_R", bound=_Record)


@functools.cache
def _plain_fields(cls: type) -> tuple[tuple[str, tuple[tuple[type, ...], bool]], ...]:
    return tuple((f.name, _KINDS[f.type]) for f in dataclasses.fields(cls) if f.name != "extra")


@dataclass(frozen=True, slots=True)
class FeatureRef(_Record):
    """Where an utterance's features lie: rows offset .. offset + num_frames of a feature shard."""

    shard: str
    """Shard path relative to the split folder: "feats/shard-NNNNN.npy"."""
    offset: int
    """First row of the utterance in the shard."""


@dataclass(frozen=True, slots=True)
class PLMRef(_Record):
    """Where an utterance's cached PLM token features lie: rows offset .. offset + num_tokens of a shard."""

    shard: str
    """Shard path relative to the split folder: "plm/shard-NNNNN.npy"."""
    offset: int
    """First row of the utterance in the shard."""
    num_tokens: int
    """M, the number of teacher tokens (rows) of the utterance; 0 when the teacher gave none."""
    tokens: list[str]
    """The teacher's M token strings, in order."""


@dataclass(frozen=True, slots=True)
class ManifestEntry(_Record):
    """One utterance of a prepared split: one line of `<split>/manifest.jsonl`."""

    id: str
    """Utterance id, unique in the split (speed-perturbed copies: "sp0.9-<id>")."""
    duration: float
    """Length of the audio in seconds (as read: an int stays an int, so that it is written back alike)."""
    num_frames: int
    """T, the number of 10 ms feature frames (rows in the feature shard)."""
    text: str
    """Normalised transcript."""
    token_ids: list[int]
    """The transcript as vocabulary ids (lang/vocab.txt; 1 = <unk>), one per character."""
    speaker: str | None
    """Speaker id, or None when the corpus names none."""
    feats: FeatureRef
    """Where the (T, F) raw features lie."""
    plm: PLMRef | None = None
    """Where the (M, D) cached PLM token features lie; None (no "plm" key) without a PLM cache."""

    KEYS = ("id", "duration", "num_frames", "text", "token_ids", "speaker", "feats", "plm")

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ManifestEntry:
        """A parsed manifest line -> ManifestEntry; StoreError naming `where` (file:line) and the missing or
        invalid key."""
        obj = _object(obj, where)
        plm = obj.get("plm")
        return cls(
            id=_get(obj, "id", (str,), where),
            duration=_get(obj, "duration", (int, float), where),
            num_frames=_get(obj, "num_frames", (int,), where),
            text=_get(obj, "text", (str,), where),
            token_ids=_get_list(obj, "token_ids", (int,), where),
            speaker=_get(obj, "speaker", (str,), where, nullable=True),
            feats=FeatureRef.from_json(_get(obj, "feats", (dict,), where), f"{where}: feats"),
            plm=None if plm is None else PLMRef.from_json(plm, f"{where}: plm"),
            extra=_extra(obj, cls.KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest line as gmot writes it: id, duration, num_frames, text, token_ids, speaker, feats,
        plm (only with a PLM cache), then the extra keys."""
        out: dict[str, Any] = {
            "id": self.id,
            "duration": self.duration,
            "num_frames": self.num_frames,
            "text": self.text,
            "token_ids": self.token_ids,
            "speaker": self.speaker,
            "feats": self.feats.to_json(),
        }
        if self.plm is not None:
            out["plm"] = self.plm.to_json()
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class PLMInfo(_Record):
    """The PLM teacher of a prepared folder: `lang/plm.json`."""

    name: str
    """The teacher's name (e.g. "e5-small", a hub id or a folder name)."""
    source: str
    """Where its weights came from (a local folder, a hub id, a model image)."""
    width: int
    """D, the width of its token features."""
    layer: int
    """The hidden state cached (0 = embeddings, -1 = last layer)."""
    mean: list[float]
    """(D,) per-dimension mean of the stored (float16) train token features."""
    std: list[float]
    """(D,) per-dimension standard deviation of the same."""
