"""recipes/transfer_study/knowledge_gradient.py: the sentence-specific share of the transfer's gradient, on a
tiny model fitted to the `tiny_prepared` folder (tests/tiny_model.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from study_scripts import load_study_script
from tiny_model import build_tiny_checkpoint

from models.engine.checkpoint import load_checkpoint, save_checkpoint

kg = load_study_script("knowledge_gradient")

# three batches of at most three utterances from the 12 train utterances; random_units needs the adapter's
# width (the tiny PLM's 16)
COMMON = ["--batches", "3", "--set", "train.max_utts=3", "--set", "gmot.random_width=16"]


@pytest.fixture(scope="module")
def tiny_exp(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tiny_prepared, tmp_path_factory.mktemp("kg_exp"), steps=5)


def _run(argv: list[str], out: Path) -> dict:
    assert kg.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_shuffle_changes_the_gradient_and_the_real_teacher_again_does_not(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    controls = "shuffle,real,random_units"
    report = _run([str(tiny_exp), str(tiny_prepared), *COMMON, "--controls", controls], tmp_path / "kg.json")
    assert report["controls"] == ["shuffle", "real (again)", "random_units"]
    assert report["skipped_controls"] == {}
    assert report["adapter"] == "trained"
    batches = report["batches"]
    assert len(batches) == 3
    assert [b["batch"] for b in batches] == [0, 1, 2]
    assert all(1 <= b["utterances"] <= 3 for b in batches)
    for b in batches:
        assert math.isfinite(b["ratio"]) and b["ratio"] > 0
        shuffle, again = b["controls"]["shuffle"], b["controls"]["real (again)"]
        for c in b["controls"].values():
            assert -1.0 <= c["cos"] <= 1.0 and -1.0 <= c["utt_cos"] <= 1.0
            assert c["ratio"] == b["ratio"]
            assert math.isfinite(c["ratio_control"]) and c["ratio_control"] > 0
        # another sentence's features: another loss and a gradient that differs
        assert b["kt"]["shuffle"] != b["kt"]["real"]
        assert shuffle["share"] > 0 and shuffle["utt_share"] > 0
        assert shuffle["cos"] < 1 - 1e-6
        # the same features again: the same loss and gradient to the bit
        assert b["kt"]["real (again)"] == b["kt"]["real"]
        assert again["share"] == 0.0 and again["utt_share"] == 0.0
        assert again["cos"] == pytest.approx(1.0, abs=1e-12)
        assert again["ratio_control"] == b["ratio"]
    mean = report["mean"]
    assert mean["ratio"] == pytest.approx(sum(b["ratio"] for b in batches) / 3)
    assert mean["controls"]["shuffle"]["share"] == pytest.approx(
        sum(b["controls"]["shuffle"]["share"] for b in batches) / 3
    )
    # the ratio is the one training logs (grad_ratio, before kt_weight) for the same tensors
    assert report["gmot"]["teacher"] == "real"


def test_compare_of_identical_gradients_is_exactly_zero() -> None:
    g = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    ctc = 2.0 * torch.ones(2, 5, 4)
    same = kg.compare(ctc, g, g.clone())
    assert same["share"] == 0.0 and same["utt_share"] == 0.0
    assert same["ratio"] == pytest.approx(float(g.norm() / ctc.norm()))
    opposite = kg.compare(ctc, g, -g)
    assert opposite["cos"] == pytest.approx(-1.0) and opposite["share"] == pytest.approx(2.0)
    assert math.isnan(kg.compare(ctc, torch.zeros_like(g), g)["share"])


def test_a_run_without_transfer_needs_a_mode_and_gets_a_fresh_adapter(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    state = load_checkpoint(tiny_exp / "avg.pt")
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("adapter.")}
    state["config"] = {**state["config"], "gmot": {**state["config"]["gmot"], "mode": "none"}}
    baseline = tmp_path / "baseline"
    save_checkpoint(baseline / "avg.pt", state)
    argv = [str(baseline), str(tiny_prepared), *COMMON, "--controls", "shuffle"]
    assert kg.main([*argv, "--json", str(tmp_path / "refused.json")]) == 2
    assert not (tmp_path / "refused.json").exists()
    report = _run([*argv, "--mode", "fgw"], tmp_path / "baseline.json")
    assert report["trained_mode"] == "none" and report["gmot"]["mode"] == "fgw"
    assert report["adapter"] == "fresh"
    assert len(report["batches"]) == 3
    assert all(b["controls"]["shuffle"]["share"] > 0 for b in report["batches"])


def test_a_missing_experiment_folder_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-run"
    assert kg.main([str(missing), str(tmp_path)]) == 2
    assert "no-such-run" in "".join(capsys.readouterr().err.split())  # rich may fold a long path
