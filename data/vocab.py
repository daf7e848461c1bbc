"""CTC units for Mandarin: text normalisation and the character vocabulary.

The vocabulary file (`lang/vocab.txt`) has one unit per line; the line index is the unit id. Line 0 is the
CTC blank `<blank>`, line 1 is `<unk>` (characters unseen in training), then the training characters sorted
by Unicode code point.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

BLANK = "<blank>"
UNK = "<unk>"

# Unicode general categories kept by the normaliser: letters, marks and numbers. Punctuation (P*), symbols
# (S*), separators/whitespace (Z*) and control/format characters (C*) are dropped.
_KEPT_CATEGORIES = ("L", "M", "N")


def normalize_mandarin(text: str) -> str:
    """Normalise a Mandarin transcript for character-level CTC.

    Input: any string. Output: NFKC-normalised (full-width to half-width), punctuation, symbols and whitespace
    removed, Latin letters upper-cased; Chinese characters, digits and letters kept in order.
    An all-punctuation input gives the empty string.
    """
    text = unicodedata.normalize("NFKC", text)
    kept = [ch for ch in text if unicodedata.category(ch)[0] in _KEPT_CATEGORIES]
    return "".join(kept).upper()


class Vocabulary:
    """Character units for CTC: id 0 = blank, id 1 = <unk>, then characters.

    `units` is the list of unit strings indexed by id.
    """

    blank_id = 0
    unk_id = 1

    def __init__(self, units: Sequence[str]):
        units = list(units)
        if len(units) < 2 or units[0] != BLANK or units[1] != UNK:
            raise ValueError(f"a vocabulary must start with {BLANK!r}, {UNK!r}; got {units[:2]!r}")
        if len(set(units)) != len(units):
            raise ValueError("vocabulary units must be unique")
        self.units: list[str] = units
        self._index = {u: i for i, u in enumerate(units)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocabulary:
        """Build from normalised texts: every character that occurs, sorted by code point."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        chars.discard(BLANK)
        return cls([BLANK, UNK, *sorted(chars)])

    def __len__(self) -> int:
        return len(self.units)

    def __contains__(self, unit: str) -> bool:
        return unit in self._index

    def encode(self, text: str) -> list[int]:
        """One id per character of `text` (already normalised); unknown characters map to `unk_id`."""
        return [self._index.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Join the units of `ids` into a string; blanks are dropped, <unk> is written as `<unk>`."""
        return "".join(self.units[i] for i in ids if i != self.blank_id)

    @classmethod
    def from_file(cls, path: Path) -> Vocabulary:
        """Read a vocab.txt (one unit per line)."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines)

    def to_file(self, path: Path) -> None:
        """Write vocab.txt atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(u + "\n" for u in self.units), encoding="utf-8")
        os.replace(tmp, path)
