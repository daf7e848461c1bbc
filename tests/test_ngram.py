"""The character n-gram LM that `gmot prepare` writes: Kneser-Ney estimates, ARPA read back by KenLM."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from data.ngram import BOS, EOS, UNK, count_ngrams, kneser_ney, lm_file_name, log_prob, train_char_lm

LN10 = math.log(10.0)
SENTENCES = ["我们是学生", "他们是老师", "我是学生", "你们好", "我们好", "他是老师吗", "老师好"]


def _units(texts: list[str]) -> list[list[str]]:
    return [list(t) for t in texts]


def test_counts_include_sentence_boundaries() -> None:
    counts = count_ngrams([["a", "b"], ["a"]], 2)
    assert counts[0] == {(BOS,): 2, ("a",): 2, ("b",): 1, (EOS,): 2}
    assert counts[1] == {(BOS, "a"): 2, ("a", "b"): 1, ("b", EOS): 1, ("a", EOS): 1}


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_history_gives_a_distribution(order: int) -> None:
    probs, backoffs = kneser_ney(_units(SENTENCES), order)
    units = [g[0] for g in probs[0] if g[0] != BOS]
    assert {EOS, UNK} <= set(units)
    for history in [(), (BOS,), ("我",), ("我", "们"), (BOS, "我", "们"), ("生", "吗"), ("x", "y", "z")]:
        total = sum(math.exp(log_prob(probs, backoffs, history, u)) for u in units)
        assert total == pytest.approx(1.0, abs=1e-9), history


def test_kneser_ney_prefers_seen_continuations_and_uses_continuation_counts() -> None:
    probs, backoffs = kneser_ney(_units(SENTENCES), 3)
    assert log_prob(probs, backoffs, ("我",), "们") > log_prob(probs, backoffs, ("我",), "师")
    assert log_prob(probs, backoffs, ("老",), "师") > math.log(0.5)
    # 们 follows 3 distinct characters (我, 他, 你), 生 only 学 (twice): continuation counts rank 们 higher
    assert probs[0][("们",)] > probs[0][("生",)]
    assert log_prob(probs, backoffs, ("我",), "没见过") == log_prob(probs, backoffs, ("我",), UNK)


def test_arpa_file_is_read_by_kenlm_with_the_same_scores(tmp_path: Path) -> None:
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    path = tmp_path / lm_file_name(3)
    n = train_char_lm(SENTENCES + SENTENCES[:2], path, order=3)  # repeated transcripts count once
    probs, backoffs = kneser_ney(_units(SENTENCES), 3)
    assert n == sum(len(t) for t in probs)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("\n\\data\\\nngram 1=") and text.rstrip().endswith("\\end\\")
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temp file and a rename
    assert not list(tmp_path.glob("*.tmp"))

    units = sorted({ch for s in SENTENCES for ch in s})
    lm = KenLM(str(path), Dictionary(units))
    for sentence in ["我们是老师", "你是学生吗", "他们好"]:
        state = lm.start(False)
        history: tuple[str, ...] = (BOS,)
        for ch in sentence:
            state, score = lm.score(state, units.index(ch))  # KenLM scores are log10
            assert score * LN10 == pytest.approx(log_prob(probs, backoffs, history, ch), abs=1e-4), ch
            history = (*history, ch)
        _, score = lm.finish(state)
        assert score * LN10 == pytest.approx(log_prob(probs, backoffs, history, EOS), abs=1e-4)


def test_no_transcripts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty transcripts"):
        train_char_lm(["", "  "], tmp_path / "lm.arpa")
    assert not (tmp_path / "lm.arpa").exists()
