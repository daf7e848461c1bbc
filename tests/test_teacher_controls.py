"""The knowledge controls of the transfer (data.teacher_controls, gmot.teacher, --plm untrained:...): each
removes the teacher's knowledge of the sentence and keeps everything else; a transfer of weight 0 through the
distill path is the baseline to the digit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from study_scripts import load_study_script

from data.loader import SpeechDataset
from data.store import read_cmvn, read_plm_info
from data.teacher_controls import random_features, shuffle_sources
from models.engine.config import resolve_config
from models.engine.training import Trainer, train


def test_shuffle_never_keeps_the_sentence_and_keeps_the_token_count() -> None:
    rng = np.random.default_rng(0)
    sentences = [f"s{k}" for k in range(40)]
    counts = {s: int(rng.integers(3, 7)) for s in sentences}
    texts = [s for s in sentences for _ in range(2)]  # two voices per sentence, as in the demo
    plan = shuffle_sources(texts, [counts[t] for t in texts], seed=3)
    assert plan.off_count == 0
    for i, j in enumerate(plan.source):
        assert texts[j] != texts[i]
        assert counts[texts[j]] == counts[texts[i]]
    # both voices of a sentence read the same other sentence, and every sentence is read by someone
    assert plan.source[0] == plan.source[1]
    assert {texts[j] for j in plan.source} == set(sentences)
    assert shuffle_sources(texts, [counts[t] for t in texts], seed=3) == plan
    assert shuffle_sources(texts, [counts[t] for t in texts], seed=4) != plan


def test_shuffle_a_lonely_token_count_borrows_from_the_nearest() -> None:
    texts = ["a", "b", "c", "d"]
    plan = shuffle_sources(texts, [3, 3, 3, 9], seed=0)
    assert plan.off_count == 1
    assert texts[plan.source[3]] in {"a", "b", "c"}
    with pytest.raises(ValueError, match="two distinct sentences"):
        shuffle_sources(["a", "a"], [3, 3], seed=0)


def test_random_features_are_fixed_per_utterance_with_the_teacher_statistics() -> None:
    mean, std = np.full(64, 2.0, np.float32), np.full(64, 3.0, np.float32)
    x = random_features((500, 64), 7, 1, mean, std)
    assert x.shape == (500, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x, random_features((500, 64), 7, 1, mean, std))
    assert not np.array_equal(x, random_features((500, 64), 8, 1, mean, std))
    assert not np.array_equal(x, random_features((500, 64), 7, 2, mean, std))
    assert abs(float(x.mean()) - 2.0) < 0.05 and abs(float(x.std()) - 3.0) < 0.05


def _trainer(data: Path, tmp: Path, teacher: str) -> Trainer:
    cfg = resolve_config("tiny", None, [f"gmot.teacher={teacher}"], {"gmot.mode": "fgw"})
    trainer = Trainer(data, tmp / teacher, cfg, device="cpu")
    trainer._load_data()
    return trainer


@pytest.mark.parametrize("teacher", ["shuffle", "random"])
def test_the_trainer_gives_control_features_to_train_only(
    tiny_prepared: Path, tmp_path: Path, teacher: str
) -> None:
    trainer = _trainer(tiny_prepared, tmp_path, teacher)
    mean, std = read_cmvn(tiny_prepared / "lang")
    real = SpeechDataset(tiny_prepared / "train", mean, std)
    records = real.records
    changed = 0
    for i in range(len(real)):
        mine, theirs = trainer.train_set[i]["plm"], real[i]["plm"]
        assert mine is not None and theirs is not None
        if teacher == "shuffle":
            source = records[trainer.train_set.teacher_source[i]]
            assert source.text != records[i].text
            torch.testing.assert_close(mine, real[trainer.train_set.teacher_source[i]]["plm"])
        else:
            assert mine.shape == theirs.shape
        changed += not torch.equal(mine, theirs)
    assert changed == len(real)
    assert trainer.dev_set is not None  # dev keeps the real teacher (the diagnostics score real tokens)
    dev_real = SpeechDataset(tiny_prepared / "dev", mean, std)
    for i in range(len(dev_real)):
        torch.testing.assert_close(trainer.dev_set[i]["plm"], dev_real[i]["plm"])
    if teacher == "random":
        info = read_plm_info(tiny_prepared / "lang")
        assert info is not None
        stacked = torch.cat([trainer.train_set[i]["plm"] for i in range(len(real))])
        assert abs(float(stacked.mean()) - float(np.mean(info.mean))) < 0.3


def test_an_unknown_teacher_control_is_refused() -> None:
    from models.engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"gmot\.teacher"):
        resolve_config("tiny", None, ["gmot.teacher=wrong"], {})


def _weights(exp: Path) -> dict[str, torch.Tensor]:
    state = torch.load(sorted(exp.glob("ckpt-*.pt"))[-1], map_location="cpu", weights_only=True)
    return state["model"]


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_distill_with_transfer_weight_zero_is_the_baseline_to_the_digit(
    tiny_prepared: Path, tmp_path: Path, dropout: float
) -> None:
    common = ["train.epochs=2", "train.seed=5", "train.threads=1", "train.average_best=0"]
    common.append(f"model.dropout={dropout}")  # dropout draws: the adapter path must not consume any
    base = resolve_config("tiny", None, common, {"gmot.mode": "none"})
    zero = resolve_config("tiny", None, [*common, "train.kt_weight=0"], {"gmot.mode": "fgw"})
    train(tiny_prepared, tmp_path / "base", base, device="cpu")
    train(tiny_prepared, tmp_path / "zero", zero, device="cpu")
    a, b = _weights(tmp_path / "base"), _weights(tmp_path / "zero")
    shared = set(a) & set(b)
    assert shared == set(a)  # the distill model has the baseline's parameters plus its adapter
    assert set(b) - set(a) and all("adapter" in k for k in set(b) - set(a))
    for key in sorted(shared):
        assert torch.equal(a[key], b[key]), key


def test_untrained_teacher_keeps_tokens_and_width_and_loses_the_weights(tmp_path: Path) -> None:
    from tiny_plm import make_tiny_bert_dir

    from models.nn.plm import load_teacher

    folder = make_tiny_bert_dir(tmp_path / "tiny_bert")
    trained = load_teacher(str(folder))
    untrained = load_teacher(f"untrained:{folder}")
    again = load_teacher(f"untrained:{folder}")
    assert untrained.name == f"untrained:{trained.name}" and "re-initialised (seed 0)" in untrained.source
    assert (untrained.width, untrained.layer, untrained.prefix) == (
        trained.width,
        trained.layer,
        trained.prefix,
    )
    texts = ["我们喜欢喝茶", "你好"]
    for (tok_a, feat_a), (tok_b, feat_b), (tok_c, feat_c) in zip(
        trained.encode(texts), untrained.encode(texts), again.encode(texts), strict=True
    ):
        assert tok_a == tok_b == tok_c and feat_a.shape == feat_b.shape
        assert not np.allclose(feat_a, feat_b)  # other weights
        np.testing.assert_array_equal(feat_b, feat_c)  # seeded: the same untrained teacher every time
    state_a, state_b = trained.model.state_dict(), untrained.model.state_dict()
    emb = "embeddings.word_embeddings.weight"
    assert not torch.equal(state_a[emb], state_b[emb])
    rng_before = torch.random.get_rng_state()
    load_teacher(f"untrained:{folder}")
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is left alone


def _ablation():
    return load_study_script("ablation")


def test_ablation_control_arms(tiny_prepared: Path, tmp_path: Path) -> None:
    ablation = _ablation()
    specs = ablation.run_specs(0.5)
    gmot = specs["fgw-centred-tot"].overrides
    assert specs["fgw-shuffle"].overrides == {**gmot, "gmot.teacher": "shuffle"}
    assert specs["fgw-random"].overrides == {**gmot, "gmot.teacher": "random"}
    assert specs["fgw-untrained"].overrides == gmot  # only its data differ
    argv = [str(tiny_prepared), str(tmp_path / "out"), "--preset", "tiny", "--from-scratch"]
    assert ablation.main([*argv, "--runs", "baseline,fgw-untrained"]) == 2  # no --untrained-data
    assert not (tmp_path / "out" / "runs").exists()
    opt = ablation.parse_args([*argv, "--untrained-data", str(tmp_path / "u")])
    assert opt.data_for("fgw-untrained") == tmp_path / "u"
    assert opt.data_for("fgw-shuffle") == tiny_prepared


@pytest.mark.slow
def test_random_units_needs_no_plm(tiny_prepared: Path, tmp_path: Path) -> None:
    import yaml
    from conftest import copy_without_plm_cache

    from data.store import read_manifest
    from models.engine.checkpoint import plm_width_of

    data = copy_without_plm_cache(tiny_prepared, tmp_path / "data")
    sets = ["gmot.teacher=random_units", "gmot.random_width=24", "train.epochs=1", "train.threads=1"]
    cfg = resolve_config("tiny", None, sets, {"gmot.mode": "fgw"})
    trainer = Trainer(data, tmp_path / "probe", cfg, device="cpu")
    trainer._load_data()
    records = read_manifest(data / "train")
    for i in (0, 5):
        item = trainer.train_set[i]["plm"]
        assert item is not None and item.shape == (len(records[i].token_ids), 24)
        assert abs(float(item.mean())) < 1.0
    assert trainer.dev_set is not None and trainer.dev_set[0]["plm"] is None  # nothing to score plans against
    outcome = train(data, tmp_path / "run", cfg, device="cpu", progress=False)
    assert outcome.step > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["gmot"]["teacher"] == "random_units" and saved["gmot"]["standardise"] is False
    state = torch.load(
        sorted((tmp_path / "run").glob("ckpt-*.pt"))[-1], map_location="cpu", weights_only=True
    )
    assert plm_width_of(state) == 24
    # the other controls need the teacher's cache, and say so
    from models.engine.training import TrainingError

    shuffle = resolve_config("tiny", None, ["gmot.teacher=shuffle"], {"gmot.mode": "fgw"})
    with pytest.raises(TrainingError, match="has no complete PLM feature cache"):
        train(data, tmp_path / "shuffle", shuffle, device="cpu", progress=False)
