"""recipes/transfer_study/plot_diagnostics.py draws what runs logged, one colour per arm, and refuses a
folder that is not an experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study_scripts import load_study_script

ROOT = Path(__file__).resolve().parent.parent


def _module():
    return load_study_script("plot_diagnostics")


def _run(folder: Path, transfer: bool) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for step in (10, 20, 30):
        record = {"event": "train", "step": step, "ctc": 100.0 / step}
        if transfer:
            record |= {"kt": 1.5, "grad_ratio": 0.01, "plan_entropy": 0.8}
        lines.append(json.dumps(record))
    lines.append(
        json.dumps(
            {"event": "epoch", "step": 30, "dev_cer": 0.6, **({"align_lift": 2.0} if transfer else {})}
        )
    )
    lines.append('{"event": "train", "step": 4')  # cut off mid-write: skipped
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_one_colour_per_arm_and_a_cut_off_line_is_skipped(tmp_path: Path) -> None:
    pd = _module()
    runs = [_run(tmp_path / "baseline-seed1", False), _run(tmp_path / "fgw-seed1", True),
            _run(tmp_path / "fgw-seed2", True)]  # fmt: skip
    train, epochs = pd.read_metrics(runs[1])
    assert [r["step"] for r in train] == [10, 20, 30] and epochs[0]["align_lift"] == 2.0
    out = tmp_path / "diag.png"
    assert pd.main([str(out), *map(str, runs)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.plot(runs, out) == ["baseline", "fgw"]
    assert not list(tmp_path.glob(".diag.tmp*"))


def test_a_folder_without_metrics_is_refused_by_name(tmp_path: Path) -> None:
    pd = _module()
    with pytest.raises(SystemExit, match=r"no metrics\.jsonl"):
        pd.main([str(tmp_path / "x.png"), str(tmp_path)])


def test_the_title_is_the_one_given_and_dev_cer_is_drawn_in_percent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pd = _module()
    runs = [_run(tmp_path / "fgw-seed1", True)]
    seen: dict[str, object] = {}
    real_savefig = pd.plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen["title"] = fig._suptitle.get_text() if fig._suptitle else ""
        dev = next(ax for ax in fig.axes if ax.get_title() == "dev CER %")
        seen["dev"] = list(dev.lines[0].get_ydata())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(pd.plt.Figure, "savefig", spy)
    assert pd.main([str(tmp_path / "d.png"), str(runs[0]), "--title", "6,068 updates, seeds 21-23"]) == 0
    assert seen["title"] == "6,068 updates, seeds 21-23"
    assert seen["dev"] == [60.0]
