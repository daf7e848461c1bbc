"""data.homophones and `gmot score --by-homophone`: Mandarin character errors sorted by whether only context
(homophones) or also the sound (another tone, another syllable) tells them apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data.homophones import homophone_breakdown, readings, sentence_readings, substitution_kind
from data.scoring import score_transcripts
from gmot_cli.app import app


def test_readings_in_context_and_of_a_character() -> None:
    # 行 is hang2 in 银行 and xing2 in 不行: the sentence decides
    assert sentence_readings(list("银行不行")) == ["yin2", "hang2", "bu4", "xing2"]
    assert {"hang2", "xing2"} <= readings("行")
    assert sentence_readings(list("好，A")) == ["hao3", "", ""]
    assert readings("A") == frozenset()


@pytest.mark.parametrize(
    ("reading", "hyp", "kind"),
    [
        ("ta1", "她", "homophone"),  # 他 -> 她
        ("shi4", "时", "tone"),  # 是 -> 时 (shi2)
        ("hao3", "猫", "other_sub"),
        ("", "好", "other_sub"),  # a reference character with no reading (punctuation, latin)
        ("hang2", "杭", "homophone"),  # 行 in 银行 -> 杭
        ("xing2", "杭", "other_sub"),  # 行 in 不行 -> 杭 (hang2): another syllable
    ],
)
def test_substitution_kinds(reading: str, hyp: str, kind: str) -> None:
    assert substitution_kind(reading, hyp) == kind


def test_breakdown_counts_every_error_once() -> None:
    refs = {"a": "我们去银行吧", "b": "他是老师", "c": "不行"}
    hyps = {"a": "我门去银杭把", "b": "她时老", "c": "不杭好"}
    result = score_transcripts(refs, hyps, "char")
    b = homophone_breakdown(result)
    # 们->门 men5/men2 tone, 行->杭 homophone (hang2 in 银行), 吧->把 tone, 他->她 homophone, 是->时 tone,
    # 师 deleted, 行->杭 in 不行 (xing2 vs hang2): other, 好 inserted
    assert b.counts == {"homophone": 2, "tone": 3, "other_sub": 1, "deletion": 1, "insertion": 1}
    assert b.errors == result.errors and b.ref_len == result.ref_len == 12
    assert b.top_homophones[0][2] == 1 and {(r, h) for r, h, _ in b.top_homophones} == {
        ("行", "杭"),
        ("他", "她"),
    }
    with pytest.raises(ValueError, match="character units"):
        homophone_breakdown(score_transcripts({"a": "x y"}, {"a": "x"}, "word"))


def test_score_cli_by_homophone(tmp_path: Path) -> None:
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("a 我们去银行吧\nb 他是老师\n", encoding="utf-8")
    hyp.write_text("a 我门去银杭把\nb 她时老\n", encoding="utf-8")
    runner = CliRunner()
    out = runner.invoke(app, ["score", str(ref), str(hyp), "--by-homophone", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["by_homophone"]["counts"] == {
        "homophone": 2,
        "tone": 3,
        "other_sub": 0,
        "deletion": 1,
        "insertion": 0,
    }
    assert data["by_homophone"]["rates"]["homophone"] == pytest.approx(0.2)
    table = runner.invoke(app, ["score", str(ref), str(hyp), "--by-homophone"])
    assert table.exit_code == 0 and "homophone" in table.stdout and "行->杭" in table.stdout
    assert "homophone" not in runner.invoke(app, ["score", str(ref), str(hyp)]).stdout
    refused = runner.invoke(app, ["score", str(ref), str(hyp), "--by-homophone", "--unit", "word"])
    assert refused.exit_code == 2 and "character units" in refused.output
