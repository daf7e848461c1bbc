"""recipes/transfer_study/transfer_report.py: the decision rule, the report tables and the learning-curve
plot."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from study_scripts import load_study_script

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    return load_study_script("transfer_report")


report = _load()


def _row(run: str, devs: list[float], tests: list[float], **diag: float) -> dict:
    import statistics

    return {
        "run": run,
        "description": run,
        "seeds": list(range(len(devs))),
        "steps": [100],
        "dev_cer_mean": statistics.fmean(devs),
        "dev_cer_std": statistics.stdev(devs) if len(devs) > 1 else None,
        "dev_cer_per_seed": devs,
        "test_cer_mean": statistics.fmean(tests),
        "test_cer_std": statistics.stdev(tests) if len(tests) > 1 else None,
        "test_cer_per_seed": tests,
        **diag,
    }


def test_paired_interval_and_p_value_match_scipy() -> None:
    from scipy import stats

    base = _row("baseline", [0.50, 0.55, 0.52, 0.58, 0.51], [0.5] * 5)
    arm = _row("a", [0.47, 0.54, 0.50, 0.55, 0.50], [0.5] * 5)
    x = report.paired(arm, base, "dev_cer")
    diffs = [b - a for a, b in zip(arm["dev_cer_per_seed"], base["dev_cer_per_seed"], strict=True)]
    ref = stats.ttest_rel(base["dev_cer_per_seed"], arm["dev_cer_per_seed"])
    ci = ref.confidence_interval(0.95)
    assert x is not None and x.n == 5
    assert x.mean == pytest.approx(sum(diffs) / 5)
    assert x.p == pytest.approx(ref.pvalue)
    assert (x.lo, x.hi) == pytest.approx((ci.low, ci.high))
    # t with n - 1 degrees of freedom, not 2 standard errors: 2.776 SE with 5 seeds
    se = x.sd / 5**0.5
    assert (x.hi - x.mean) / se == pytest.approx(2.7764, abs=1e-4)


def test_decision_rule_needs_the_dev_interval_above_zero_and_a_test_gain() -> None:
    base = _row("baseline", [0.50, 0.51, 0.49], [0.50, 0.50, 0.50])
    clear = _row("a", [0.45, 0.46, 0.445], [0.46, 0.46, 0.47])
    assert report.beats(clear, base)[0] is True
    # a gain of 3.5 standard errors, which the old "two standard errors" rule accepted: with 3 seeds the
    # interval is mean +- 4.30 SE, so it is no decision in favour
    two_se = _row("b", [0.49, 0.48, 0.47], [0.48, 0.48, 0.48])  # gains 1, 3, 2 points: 3.5 SE
    x = report.paired(two_se, base, "dev_cer")
    assert x is not None and 2 < x.mean / (x.sd / 3**0.5) < 4.3
    ok, why = report.beats(two_se, base)
    assert ok is False and "n = 3" in why and "p " in why
    no_test = _row("c", [0.45, 0.46, 0.44], [0.52, 0.52, 0.52])
    assert report.beats(no_test, base)[0] is False
    one_seed = _row("d", [0.30], [0.30])
    assert report.beats(one_seed, base) == (False, "fewer than 2 common seeds: no decision")
    # paired: a small but consistent gain per seed passes although the seeds spread widely
    spread = _row("baseline", [0.50, 0.60, 0.55], [0.50, 0.60, 0.55])
    steady = _row("e", [0.48, 0.58, 0.531], [0.49, 0.59, 0.54])
    assert report.beats(steady, spread)[0] is True


def test_comparisons_put_the_reference_against_each_control() -> None:
    rows = [
        _row("baseline", [0.5, 0.5], [0.5, 0.5]),
        _row("real", [0.4, 0.41], [0.4, 0.4]),
        _row("shuffle", [0.45, 0.46], [0.45, 0.45]),
    ]
    pairs = [(a["run"], b["run"]) for a, b in report.comparisons({"summary": rows}, "real")]
    assert pairs == [("real", "baseline"), ("shuffle", "baseline"), ("real", "shuffle")]
    lines = report.comparison_table({"summary": rows}, "real")
    assert lines[-1].startswith("| real | shuffle | 2 | +5.00 [")


def test_extra_pairs_add_a_variant_against_its_own_control_once() -> None:
    rows = [
        _row("baseline", [0.5, 0.5], [0.5, 0.5]),
        _row("real", [0.4, 0.41], [0.4, 0.4]),
        _row("strong", [0.38, 0.40], [0.39, 0.39]),
        _row("strong-shuffle", [0.42, 0.43], [0.42, 0.42]),
    ]
    extra = [("strong", "strong-shuffle"), ("real", "strong"), ("strong", "missing")]
    pairs = [(a["run"], b["run"]) for a, b in report.comparisons({"summary": rows}, "real", extra)]
    assert pairs[-1] == ("strong", "strong-shuffle")  # appended; ("real", "strong") was there already
    assert pairs.count(("real", "strong")) == 1 and ("strong", "missing") not in pairs
    lines = report.comparison_table({"summary": rows}, "real", extra)
    assert lines[-1].startswith("| strong | strong-shuffle | 2 | +3.50 [")


def test_report_and_curve_from_ablation_folders(tmp_path: Path) -> None:
    for size, gain in ((500, 0.05), (1000, 0.02)):
        folder = tmp_path / f"d{size}"
        folder.mkdir()
        summary = [
            _row("baseline", [0.60, 0.61, 0.59], [0.60, 0.61, 0.62]),
            _row(
                "fgw-centred-tot",
                [0.60 - gain, 0.61 - gain, 0.59 - gain],
                [0.55, 0.56, 0.57],
                align_lift=2.1,
                align_order=0.8,
                align_entropy=0.8,
                grad_ratio=0.01,
            ),
        ]
        data = {
            "command": f"python recipes/transfer_study/ablation.py d{size} ...",
            "machine": {"cpu": "EPYC" if size == 500 else "Xeon", "cores": 2},
            "summary": summary,
        }
        (folder / "ablation.json").write_text(json.dumps(data), encoding="utf-8")
    notes = tmp_path / "notes.md"
    notes.write_text("Decision: written by hand.\n", encoding="utf-8")
    out, plot = tmp_path / "study.md", tmp_path / "curve.png"
    gains = tmp_path / "gains.png"
    argv = [
        "--gains-plot",
        str(gains),
        "--curve",
        f"500={tmp_path / 'd500'}",
        "--curve",
        f"1000={tmp_path / 'd1000'}",
        "--notes",
        str(notes),
        "--out",
        str(out),
        "--plot",
        str(plot),
    ]
    assert report.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert text.index("Decision: written by hand.") < text.index("## 500 train sentences")
    assert "## 1000 train sentences" in text and "python recipes/transfer_study/ablation.py d1000 ..." in text
    assert "| 2.10 | +0.80 | 0.80 | 0.010 |" in text
    assert "**yes**" in text  # the 5-point dev gain at 500 sentences, the same on every seed
    assert "| fgw-centred-tot | baseline | 3 | +5.00 [+5.00, +5.00] |" in text
    # each size ran on its own machine: each section names it, and no one machine closes the report
    assert "Machine of these runs: cpu EPYC, cores 2." in text and "Machine of these runs: cpu Xeon" in text
    assert "## Machine" not in text
    for png in (plot, gains):
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        report.main(["--curve", f"2000={tmp_path / 'missing'}", "--out", str(out)])


def test_error_kinds_of_the_runs_decodes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "test").mkdir(parents=True)
    refs = {"u1": "他是老师", "u2": "我们去银行"}
    (data_dir / "test" / "manifest.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in refs.items()),
        encoding="utf-8",
    )
    hyps = {  # per (arm, seed): the baseline makes homophone errors, the arm fewer
        ("baseline", 0): {"u1": "她是老师", "u2": "我们去银杭"},
        ("baseline", 1): {"u1": "她时老师", "u2": "我们去银杭"},
        ("arm", 0): {"u1": "他是老师", "u2": "我们去银杭"},
        ("arm", 1): {"u1": "他时老师", "u2": "我们去银行"},
    }
    runs = []
    for (arm, seed), texts in hyps.items():
        out = tmp_path / "ab" / "runs" / f"{arm}-seed{seed}" / "decode_test"
        out.mkdir(parents=True)
        (out / "text").write_text("".join(f"{k} {v}\n" for k, v in texts.items()), encoding="utf-8")
        runs.append({"run": arm, "seed": seed})
    runs.append({"run": "arm", "seed": 2})  # no decode: left out
    rows = report.error_kinds(tmp_path / "ab", {"data_dir": str(data_dir), "runs": runs})
    by_run = {r["run"]: r for r in rows}
    assert by_run["arm"]["seeds"] == [0, 1]
    assert by_run["baseline"]["homophone_per_seed"] == pytest.approx([2 / 9, 2 / 9])
    assert by_run["arm"]["homophone_per_seed"] == pytest.approx([1 / 9, 0.0])
    assert by_run["baseline"]["tone_per_seed"] == pytest.approx([0.0, 1 / 9])
    lines = report.error_kind_table(rows)
    arm_line = next(line for line in lines if line.startswith("| arm | 2 |"))
    assert "+16.67 [" in arm_line  # the homophone gain: (2/9 - 1/9 + 2/9 - 0) / 2 = 1/6


def test_error_kinds_read_the_references_archived_with_the_runs(tmp_path: Path) -> None:
    """A study archived without its data folder keeps its error table: test_references.txt beside the runs
    is read first, and the data folder named in ablation.json (here gone) is not needed."""
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / report.REFERENCES).write_text("u1 他是老师\nu2 我们去银行\n", encoding="utf-8")
    out = tmp_path / "ab" / "runs" / "baseline-seed0" / "decode_test"
    out.mkdir(parents=True)
    (out / "text").write_text("u1 她是老师\nu2 我们去银行\n", encoding="utf-8")
    runs = [{"run": "baseline", "seed": 0}]
    rows = report.error_kinds(tmp_path / "ab", {"data_dir": str(tmp_path / "gone"), "runs": runs})
    assert rows[0]["homophone_per_seed"] == pytest.approx([1 / 9])
    (tmp_path / "ab" / report.REFERENCES).unlink()  # neither references nor data folder: no rows
    assert report.error_kinds(tmp_path / "ab", {"data_dir": str(tmp_path / "gone"), "runs": runs}) == []


def test_pair_option_adds_its_row_and_warns_of_an_arm_no_folder_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "d3840"
    folder.mkdir()
    summary = [
        _row("baseline", [0.50, 0.52], [0.50, 0.51]),
        _row("strong", [0.40, 0.41], [0.40, 0.42]),
        _row("strong-shuffle", [0.42, 0.44], [0.43, 0.44]),
    ]
    data = {"command": "ablation.py ...", "machine": {"cpu": "Xeon"}, "summary": summary}
    (folder / "ablation.json").write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "report.md"
    base = ["--curve", f"3840={folder}", "--out", str(out)]
    assert report.main([*base, "--pair", "strong=strong-shuffle", "--pair", "strong=strnog-shuffle"]) == 0
    assert "| strong | strong-shuffle | 2 | +2.50 [" in out.read_text(encoding="utf-8")
    assert "--pair strong=strnog-shuffle: no --curve folder ran both arms" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        report.main([*base, "--pair", "strong"])
    assert bad.value.code == 2
