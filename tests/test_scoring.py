"""Scoring: our CER / WER equal jiwer's on the same pairs; missing ids, empty hypotheses and bad files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jiwer
import pytest
from typer.testing import CliRunner

from data.scoring import (
    ScoringError,
    format_alignment,
    read_kaldi_text,
    read_transcripts,
    score_transcripts,
)
from gmot_cli.app import app

CHARS = "今天天气很好我们去公园玩吧"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _random_pairs(n: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(seed)
    refs, hyps = {}, {}
    for i in range(n):
        ref = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 12)))
        hyp = list(ref)
        for _ in range(rng.randint(0, 4)):
            op = rng.choice("sdi")
            pos = rng.randrange(len(hyp) + 1)
            if op == "i":
                hyp.insert(pos, rng.choice(CHARS))
            elif hyp and pos < len(hyp):
                if op == "s":
                    hyp[pos] = rng.choice(CHARS)
                else:
                    del hyp[pos]
        refs[f"utt{i:03d}"] = ref
        hyps[f"utt{i:03d}"] = "".join(hyp)
    return refs, hyps


def test_cer_equals_direct_jiwer_computation() -> None:
    refs, hyps = _random_pairs(60, seed=3)
    # spaces inside a transcript are ignored for CER
    hyps["utt000"] = " ".join(hyps["utt000"])
    result = score_transcripts(refs, hyps, "char")
    ids = list(refs)
    direct = jiwer.process_characters([refs[i] for i in ids], [hyps[i].replace(" ", "") for i in ids])
    assert result.rate == pytest.approx(direct.cer)
    assert result.rate == pytest.approx(
        jiwer.cer([refs[i] for i in ids], [hyps[i].replace(" ", "") for i in ids])
    )
    assert (result.substitutions, result.deletions, result.insertions, result.hits) == (
        direct.substitutions,
        direct.deletions,
        direct.insertions,
        direct.hits,
    )
    assert result.ref_len == sum(len(r) for r in refs.values())
    assert result.errors > 0
    assert result.sentence_errors == sum(1 for i in ids if refs[i] != hyps[i].replace(" ", ""))


def test_wer_equals_direct_jiwer_computation() -> None:
    refs = {"a": "the cat sat on the mat", "b": "hello world", "c": "one two three"}
    hyps = {"a": "the cat sat on mat today", "b": "hello  there world", "c": ""}
    result = score_transcripts(refs, hyps, "word")
    direct = jiwer.process_words(list(refs.values()), [" ".join(h.split()) for h in hyps.values()])
    assert result.rate == pytest.approx(direct.wer)
    assert (result.substitutions, result.deletions, result.insertions) == (
        direct.substitutions,
        direct.deletions,
        direct.insertions,
    )
    assert result.to_json()["wer"] == pytest.approx(direct.wer)


def test_cli_word_units_score_words(tmp_path: Path) -> None:
    refs = {"a": "the cat sat on the mat", "b": "hello world", "c": "one two three"}
    hyps = {"a": "the cat sat on mat today", "b": "hello  there world", "c": ""}
    ref = _write(tmp_path / "ref", [f"{k} {v}" for k, v in refs.items()])
    hyp = _write(tmp_path / "hyp", [f"{k} {v}".rstrip() for k, v in hyps.items()])
    direct = jiwer.process_words(list(refs.values()), [" ".join(h.split()) for h in hyps.values()])
    errors = direct.substitutions + direct.deletions + direct.insertions
    assert errors == 6  # a: 2, b: 1 insertion, c: 3 deletions
    out = CliRunner().invoke(app, ["score", str(ref), str(hyp), "--unit", "word", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["unit"] == "word" and "cer" not in payload
    assert payload["wer"] == pytest.approx(direct.wer) == pytest.approx(6 / 11)
    assert (payload["substitutions"], payload["deletions"], payload["insertions"], payload["ref_len"]) == (
        direct.substitutions,
        direct.deletions,
        direct.insertions,
        11,
    )
    out = CliRunner().invoke(app, ["score", str(ref), str(hyp), "--unit", "word"])
    assert out.exit_code == 0, out.output
    summary = (
        f"%WER {100 * direct.wer:.2f} [ {errors} / 11, {direct.insertions} ins, {direct.deletions} del, "
        f"{direct.substitutions} sub ]"
    )
    assert summary in out.output
    assert "# Wrd" in out.output and "# Chr" not in out.output


def test_missing_ids_count_as_deletions_and_extra_ids_are_ignored() -> None:
    refs = {"u1": "今天很好", "u2": "我们去", "u3": "公园"}
    hyps = {"u1": "今天很好", "u3": "公园", "x9": "多余"}
    result = score_transcripts(refs, hyps)
    assert result.missing_in_hyp == ["u2"]
    assert result.missing_in_ref == ["x9"]
    assert result.deletions == 3 and result.errors == 3
    assert result.ref_len == 9
    assert result.rate == pytest.approx(3 / 9)
    assert "%CER 33.33 [ 3 / 9, 0 ins, 3 del, 0 sub ]" in result.kaldi_summary()


def test_empty_hypotheses_are_all_deletions() -> None:
    result = score_transcripts({"u1": "今天", "u2": "好"}, {"u1": "", "u2": ""})
    assert (result.deletions, result.errors, result.ref_len, result.sentence_errors) == (3, 3, 3, 2)
    assert result.rate == 1.0


def test_no_common_ids_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ScoringError, match="no utterance id in common"):
        score_transcripts({"a": "今天"}, {"b": "今天"})
    ref = _write(tmp_path / "ref", ["a 今天"])
    hyp = _write(tmp_path / "hyp", ["b 今天"])
    out = CliRunner().invoke(app, ["score", str(ref), str(hyp)])
    assert out.exit_code == 2
    assert "no utterance id in common" in out.output
    assert "Traceback" not in out.output


def test_kaldi_text_reader_handles_empty_hyp_and_names_bad_lines(tmp_path: Path) -> None:
    good = _write(tmp_path / "good", ["u1 今天 很好", "u2", "", "u3\t公园"])
    assert read_kaldi_text(good) == {"u1": "今天 很好", "u2": "", "u3": "公园"}
    (tmp_path / "latin1").write_bytes("u1 ok\nu2 caf\xe9\n".encode("latin-1"))
    with pytest.raises(ScoringError, match=r"latin1:2: not valid UTF-8"):
        read_kaldi_text(tmp_path / "latin1")
    bad = _write(tmp_path / "bad", ["u1 今天", " 没有编号"])
    with pytest.raises(ScoringError, match=r"bad:2: malformed"):
        read_kaldi_text(bad)
    dup = _write(tmp_path / "dup", ["u1 今天", "u2 好", "u1 再"])
    with pytest.raises(ScoringError, match=r"dup:3: duplicate utterance id 'u1'"):
        read_kaldi_text(dup)
    out = CliRunner().invoke(app, ["score", str(tmp_path / "latin1"), str(good)])
    assert out.exit_code == 2 and "latin1:2" in out.output


def test_prepared_split_folder_as_reference(tmp_path: Path) -> None:
    split = tmp_path / "test"
    split.mkdir()
    records = [
        {"id": "u1", "text": "今天很好", "duration": 1.0},
        {"id": "u2", "text": "公园", "duration": 0.5},
    ]
    (split / "manifest.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    assert read_transcripts(split) == {"u1": "今天很好", "u2": "公园"}
    hyp_dir = tmp_path / "hyp"
    hyp_dir.mkdir()
    _write(hyp_dir / "text", ["u1 今天很号", "u2 公园"])
    out = CliRunner().invoke(app, ["score", str(split), str(hyp_dir), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["cer"] == pytest.approx(1 / 6)
    assert payload["substitutions"] == 1 and payload["ref_len"] == 6


def test_cli_summary_table_and_details(tmp_path: Path) -> None:
    ref = _write(tmp_path / "ref", ["u1 今天天气很好", "u2 我们去公园", "u3 玩吧"])
    hyp = _write(tmp_path / "hyp", ["u1 今天气很好啊", "u2 我门去公园", "zz 多"])
    details = tmp_path / "details.txt"
    out = CliRunner().invoke(app, ["score", str(ref), str(hyp), "--details", str(details)])
    assert out.exit_code == 0, out.output
    # u1: 1 del + 1 ins, u2: 1 sub, u3: 2 del (missing) -> 5 errors over 13 characters
    assert "%CER 38.46 [ 5 / 13, 1 ins, 3 del, 1 sub ]" in out.output
    for col in ("Snt", "Corr", "Sub", "Del", "Ins", "Err", "S.Err"):
        assert col in out.output
    assert "u3" in out.output and "zz" in out.output
    text = details.read_text(encoding="utf-8")
    assert "id: (u2)" in text and "Scores: (#C #S #D #I) 4 1 0 0" in text
    assert "HYP:  我 门 去 公 园" in text


def test_alignment_block_marks_gaps() -> None:
    result = score_transcripts({"u": "ABC"}, {"u": "AXCD"})
    block = format_alignment(result.utterances[0])
    assert "REF:  A B C *" in block
    assert "HYP:  A X C D" in block
    assert "Eval: C S C I" in block
