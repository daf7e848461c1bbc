"""recipes/transfer_study/teacher_layers.py: the per-layer statistics and the command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
_spec = importlib.util.spec_from_file_location(
    "teacher_layers", ROOT / "recipes" / "transfer_study" / "teacher_layers.py"
)
assert _spec is not None and _spec.loader is not None
teacher_layers = importlib.util.module_from_spec(_spec)
sys.modules["teacher_layers"] = teacher_layers  # dataclasses look their module up
_spec.loader.exec_module(teacher_layers)

CHARS = "我你他她们是的了不在有这个人大小中国学生老师喜欢吃饭喝茶水今天明天好很多少谢再见朋友家爸妈"


def _manifest(texts: list[str]) -> str:
    """manifest.jsonl lines for `texts` (feature references that are never read)."""
    return "".join(
        json.dumps({"id": f"u{i}", "duration": 1.0, "num_frames": 100, "text": t, "token_ids": [0],
                    "speaker": "s", "feats": {"shard": "feats/shard-00000.npy", "offset": 0}},
                   ensure_ascii=False) + "\n"
        for i, t in enumerate(texts)
    )  # fmt: skip


def _sentences(n: int, rng: np.random.Generator) -> list[list[str]]:
    return [list(rng.choice(list(CHARS), size=int(rng.integers(3, 7)))) for _ in range(n)]


def test_a_partner_that_is_the_sentence_itself_is_indistinguishable() -> None:
    rng = np.random.default_rng(0)
    tokens = _sentences(40, rng)
    feats = [rng.standard_normal((len(t), 8)).astype(np.float32) for t in tokens]
    s = teacher_layers.layer_stats(3, tokens, feats, list(range(len(tokens))))
    assert s.layer == 3
    assert s.shuffle_cos == pytest.approx(1.0, abs=1e-5)
    assert s.gw_corr == pytest.approx(1.0, abs=1e-5)


def test_lookup_features_are_all_token_identity_and_another_sentence_differs() -> None:
    rng = np.random.default_rng(1)
    table = {c: rng.standard_normal(8) for c in CHARS}
    tokens = _sentences(200, rng)
    feats = [np.stack([table[c] for c in t]) for t in tokens]
    partner = [(i + 1) % len(tokens) for i in range(len(tokens))]
    partner = [j if len(tokens[j]) == len(tokens[i]) else i for i, j in enumerate(partner)]
    s = teacher_layers.layer_stats(0, tokens, feats, partner)
    # centring blurs identity a little (the mean depends on the other tokens); identity still dominates
    assert s.token_r2 > 0.6 > s.position_r2
    # pairs kept as themselves give 1, real pairs of random sentences about 0: the mean lies well below 1
    own = sum(1 for i, j in enumerate(partner) if i == j) / len(partner)
    assert s.shuffle_cos < own + 0.3


def test_sentences_are_distinct_and_sampled_reproducibly(tmp_path: Path) -> None:
    train = tmp_path / "train"
    train.mkdir()
    texts = ["我是学生", "你好", "我是学生", "他们是老师", "今天很好", "明天再见"]
    (train / "manifest.jsonl").write_text(_manifest(texts), encoding="utf-8")
    assert teacher_layers.read_sentences(tmp_path, 0, 0) == [
        "我是学生",
        "你好",
        "他们是老师",
        "今天很好",
        "明天再见",
    ]
    a = teacher_layers.read_sentences(tmp_path, 3, 7)
    assert len(a) == 3 and len(set(a)) == 3 and a == teacher_layers.read_sentences(tmp_path, 3, 7)


def test_the_command_measures_every_layer_of_a_tiny_teacher(tmp_path: Path, capsys) -> None:
    from tiny_plm import make_tiny_bert_dir

    plm = make_tiny_bert_dir(tmp_path / "plm")
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    lines = ["".join(t) for t in _sentences(60, rng)]
    (data / "train" / "manifest.jsonl").write_text(_manifest(lines), encoding="utf-8")
    out = tmp_path / "layers.json"
    assert teacher_layers.main([str(data), "--plm", str(plm), "--sentences", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [row["layer"] for row in result["layers"]] == [0, 1, 2]  # embeddings + 2 layers
    assert result["sentences"] == len(set(lines))
    for row in result["layers"]:
        assert f"| {row['layer']} | {row['distance']:.3f} |" in table
        assert -1.0 <= row["shuffle_cos"] < 1.0 and 0.0 <= row["token_r2"] <= 1.0


def test_the_command_names_a_folder_without_a_manifest(tmp_path: Path, capsys) -> None:
    assert teacher_layers.main([str(tmp_path / "nowhere"), "--sentences", "10"]) == 2
    assert "nowhere" in capsys.readouterr().err
