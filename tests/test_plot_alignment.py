"""`gmot plot-alignment`: plans, structures and CTC spans for one utterance, figure files, font fallback and
the bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import TINY_GMOT, build_tiny_checkpoint
from typer.testing import CliRunner

from data.store import SplitReader
from gmot_cli.app import app
from models.engine.checkpoint import load_model
from models.tasks.alignment_plot import (
    CJK_FONT_NAMES,
    AlignmentData,
    compute_alignment,
    display_tokens,
    draw_alignment,
    find_cjk_font,
    worst_utterances,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_exp(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An experiment folder with avg.pt of a tiny model (with adapter) fitted on tiny_prepared/train."""
    return build_tiny_checkpoint(tiny_prepared, tmp_path_factory.mktemp("tiny_exp_plot"))


@pytest.fixture(scope="module")
def first_train(tiny_prepared: Path) -> dict:
    """The first train record: its text holds all ten characters, so every PLM token matches characters."""
    return SplitReader(tiny_prepared / "train").records[0]


@pytest.fixture(scope="module")
def both_plans(tiny_exp: Path, tiny_prepared: Path, first_train: dict) -> AlignmentData:
    return compute_alignment(load_model(tiny_exp), tiny_prepared, "train", first_train.id, ("wd", "fgw"))


def test_plans_structures_and_ctc_spans(both_plans: AlignmentData, first_train: dict) -> None:
    data = both_plans
    m = first_train.plm.num_tokens
    n = data.struct_acoustic.shape[0]
    assert set(data.plans) == {"wd", "fgw"}
    assert data.alphas == {"wd": 0.0, "fgw": TINY_GMOT["alpha"]}
    for plan in data.plans.values():
        assert plan.shape == (n, m)
        assert plan.min() >= 0
        # uniform marginals: rows sum to 1/N, columns to 1/M
        np.testing.assert_allclose(plan.sum(1), np.full(n, 1 / n), atol=2e-3)
        np.testing.assert_allclose(plan.sum(0), np.full(m, 1 / m), atol=2e-3)
    assert not np.allclose(data.plans["wd"], data.plans["fgw"], atol=1e-4)  # the Gromov term matters
    assert data.struct_linguistic.shape == (m, m)
    np.testing.assert_allclose(np.diag(data.struct_acoustic), 0.0, atol=1e-5)  # cosine structure
    assert data.tokens == first_train.plm.tokens
    # CTC forced alignment: one span per reference character, in order, inside the frames
    assert data.char_spans is not None
    assert "".join(ch for ch, _, _ in data.char_spans) == first_train.text
    starts = [s for _, s, _ in data.char_spans]
    assert starts == sorted(starts) and all(0 <= s < e <= n for _, s, e in data.char_spans)


@pytest.mark.slow
def test_cli_writes_png_svg_pdf(
    tiny_exp: Path, tiny_prepared: Path, first_train: dict, tmp_path: Path
) -> None:
    utt = first_train.id
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"plan{suffix}"
        res = runner.invoke(app, ["plot-alignment", str(tiny_exp), str(tiny_prepared), "--split", "train",
                                  "--utt", utt, "--out", str(out), "--compare", "wd,fgw"])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert out.read_bytes().startswith(magic)
        assert out.stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_cli_worst_k(tiny_exp: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["plot-alignment", str(tiny_exp), str(tiny_prepared), "--split", "test",
                              "--worst", "2", "--out", str(tmp_path / "worst.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in tmp_path.glob("worst_*.png"))
    assert len(files) == 2 and files[0].startswith("worst_01_test-") and files[1].startswith("worst_02_test-")


def test_worst_utterances_ranks_by_cer() -> None:
    refs = {"a": "你好我们", "b": "学习", "c": "中文天气"}
    hyps = {"a": "你好我们", "b": "", "c": "中文天"}
    assert worst_utterances(hyps, refs, 2) == [("b", 1.0), ("c", 0.25)]


def test_figure_without_cjk_font_uses_token_indices(both_plans: AlignmentData) -> None:
    assert display_tokens(["\u2581你好", "ab", "学习"], None) == ["#0", "ab", "#2"]
    assert display_tokens(["\u2581你好", "ab"], "WenQuanYi Zen Hei") == ["你好", "ab"]
    fig = draw_alignment(both_plans, cjk_font=None)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"#{j}" for j in range(len(both_plans.tokens))]
    assert "\u25a1" in fig._suptitle.get_text()  # CJK in the title replaced, not dropped
    fig.canvas.draw()  # renders without a CJK font
    titles = [ax.get_title() for ax in fig.axes]
    assert "WD plan (alpha = 0)" in titles and "FGW plan (alpha = 0.5)" in titles
    assert any("acoustic structure" in t for t in titles) and any("linguistic structure" in t for t in titles)


def test_cjk_font_choice_has_cjk_glyphs() -> None:
    # The chosen font really renders Chinese; None only when no known CJK font is installed (Debian package
    # fonts-wqy-zenhei or fonts-noto-cjk, a system dependency of readable figures).
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = find_cjk_font()
    installed = {f.name for f in font_manager.fontManager.ttflist}
    if font is None:
        assert not installed & set(CJK_FONT_NAMES)
        pytest.skip("no CJK font installed (Debian fonts-wqy-zenhei or fonts-noto-cjk): no glyphs to check")
    path = font_manager.findfont(font_manager.FontProperties(family=font), fallback_to_default=False)
    assert FT2Font(path).get_char_index(ord("中")) != 0


def test_unknown_utterance_lists_some_that_exist(tiny_exp: Path, tiny_prepared: Path) -> None:
    res = runner.invoke(app, ["plot-alignment", str(tiny_exp), str(tiny_prepared), "--split", "test",
                              "--utt", "no-such-utt"])  # fmt: skip
    assert res.exit_code == 2
    assert "'no-such-utt' is not in" in res.output and "test-spk0-0000" in res.output
    assert "Traceback" not in res.output


def test_bad_inputs(tiny_exp: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    base = ["plot-alignment", str(tiny_exp), str(tiny_prepared)]
    res = runner.invoke(app, [*base, "--split", "eval", "--utt", "x"])
    assert res.exit_code == 2 and "split 'eval' is not prepared" in res.output
    res = runner.invoke(app, [*base, "--utt", "x", "--compare", "wd,ot"])
    assert res.exit_code == 2 and "--compare" in res.output
    res = runner.invoke(app, [*base, "--utt", "x", "--out", str(tmp_path / "a.jpg")])
    assert res.exit_code == 2 and ".png" in res.output
    res = runner.invoke(
        app, ["plot-alignment", str(tmp_path / "missing.pt"), str(tiny_prepared), "--utt", "x"]
    )
    assert res.exit_code == 2 and "missing.pt does not exist" in res.output


def test_data_of_another_front_end_is_refused(tiny_exp: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_exp / "avg.pt", weights_only=True)
    state["cmvn"]["frontend"] = "kaldi-snip"
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    res = runner.invoke(app, ["plot-alignment", str(legacy), str(tiny_prepared), "--worst", "1",
                              "--out", str(tmp_path / "p.png")])  # fmt: skip
    assert res.exit_code == 2
    assert "'sherpa-onnx' features but the model was trained on 'kaldi-snip'" in res.output
    assert not (tmp_path / "p.png").exists()
