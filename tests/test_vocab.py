"""data.vocab: Mandarin normalisation and the character vocabulary."""

from pathlib import Path

import pytest

from data.vocab import BLANK, UNK, Vocabulary, normalize_mandarin


def test_normalize_drops_punctuation_spaces_and_widens() -> None:
    assert normalize_mandarin("你好， 世界！") == "你好世界"
    # full-width Latin letters and digits become half-width upper-case
    assert normalize_mandarin("ＡＢｃ１２３") == "ABC123"
    assert normalize_mandarin("我 爱 abc.") == "我爱ABC"
    assert normalize_mandarin("“”。，、！？《》（）——…") == ""
    assert normalize_mandarin("  \t\n") == ""


def test_build_sorts_by_code_point_and_reserves_blank_unk() -> None:
    vocab = Vocabulary.build(["好你", "你们"])
    assert vocab.units[:2] == [BLANK, UNK]
    assert vocab.units[2:] == sorted("你好们")
    assert vocab.blank_id == 0 and vocab.unk_id == 1


def test_encode_maps_unseen_to_unk_and_decode_round_trips() -> None:
    vocab = Vocabulary.build(["你好"])
    ids = vocab.encode("你好吗")
    assert ids[2] == vocab.unk_id
    assert vocab.decode(vocab.encode("好你")) == "好你"
    assert vocab.decode([0, vocab.encode("你")[0], 0]) == "你"


def test_file_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.build(["中文天气"])
    vocab.to_file(tmp_path / "vocab.txt")
    assert Vocabulary.from_file(tmp_path / "vocab.txt").units == vocab.units
    assert not (tmp_path / "vocab.txt.tmp").exists()


def test_rejects_malformed_vocabulary() -> None:
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
