"""recipes/transfer_study/ablation.py: runs x seeds from one pretrained start, ablation.json, the report,
resuming."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from study_scripts import load_study_script

from data.store import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _load_ablation() -> ModuleType:
    return load_study_script("ablation")


ablation = _load_ablation()


def test_mean_std_and_run_specs() -> None:
    assert ablation.mean_std([0.1, 0.3]) == pytest.approx((0.2, math.sqrt(0.02)))
    assert ablation.mean_std([0.25]) == (0.25, None)
    specs = ablation.run_specs(0.7)
    assert specs["baseline"].overrides["gmot.mode"] == "none"
    assert specs["wd"].overrides["gmot.mode"] == "wd"
    assert [specs[f"fgw-{s}"].overrides["gmot.structure"] for s in ("cosine", "temporal", "hybrid")] == [
        "cosine",
        "temporal",
        "hybrid",
    ]
    assert specs["fgw-tot"].overrides["gmot.tot_weight"] == 0.7
    assert all(specs[n].overrides["gmot.tot_weight"] == 0.0 for n in ("wd", "fgw-cosine", "fgw-hybrid"))


def test_bad_options_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        ablation.parse_args([str(tmp_path), str(tmp_path / "o"), "--runs", "baseline,nonsense"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        ablation.parse_args(
            [str(tmp_path), str(tmp_path / "o"), "--init-from", "x.pt", "--pretrain-epochs", "1"]
        )
    quick = ablation.parse_args([str(tmp_path), str(tmp_path / "o"), "--quick", "--epochs", "5"])
    assert (quick.epochs, quick.pretrain_epochs, quick.seeds) == (1, 1, [0])
    assert quick.dev_max_utts > 0 and quick.test_max_utts > 0


def test_variants_add_sweep_arms_on_top_of_a_base_run(tmp_path: Path) -> None:
    base = [str(tmp_path), str(tmp_path / "o"), "--runs", "baseline,fgw-cosine", "--preset", "tiny"]
    opt = ablation.parse_args(
        [
            *base,
            "--variant",
            "fgw-w2=fgw-cosine:train.kt_weight=2,gmot.alpha=0.3",
            "--variant",
            "wd-w2=wd:train.kt_weight=2",
        ]
    )
    assert opt.runs == ["baseline", "fgw-cosine", "fgw-w2", "wd-w2"]
    spec = opt.variants["fgw-w2"]
    assert spec.overrides["gmot.structure"] == "cosine" and spec.overrides["train.kt_weight"] == "2"
    assert "train.kt_weight=2, gmot.alpha=0.3" in spec.description
    cfg = ablation.run_config(opt, spec, 1)
    assert (cfg.train.kt_weight, cfg.gmot.alpha, cfg.gmot.mode, cfg.train.seed) == (2.0, 0.3, "fgw", 1)
    assert ablation.run_config(opt, opt.variants["wd-w2"], 0).gmot.mode == "wd"
    for bad in ("noequals", "x=nobase:train.lr=1", "x=wd", "x=wd:train.lr", "wd=fgw-cosine:train.lr=1"):
        with pytest.raises(SystemExit) as exc:
            ablation.parse_args([*base, "--variant", bad])
        assert exc.value.code == 2


def test_unknown_set_key_is_a_usage_error(tiny_prepared: Path, tmp_path: Path) -> None:
    code = ablation.main(
        [str(tiny_prepared), str(tmp_path / "out"), "--preset", "tiny", "--set", "train.lerning_rate=1"]
    )
    assert code == 2
    assert not (tmp_path / "out" / "pretrain").exists()  # nothing trained before the config was checked


@pytest.mark.slow
def test_ablation_end_to_end_and_resume(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "abl"
    report = tmp_path / "report.md"
    argv = [
        str(tiny_prepared),
        str(out),
        "--preset",
        "tiny",
        "--pretrain-epochs",
        "15",
        "--set",
        "train.max_utts=4",
        "--epochs",
        "1",
        "--seeds",
        "0,1",
        "--runs",
        "baseline,wd,fgw-cosine",
        "--device",
        "cpu",
        "--no-progress",
        "--report",
        str(report),
        "--jobs",
        "2",
    ]
    # the workers run this checkout's package, not the one the venv's editable install may point at
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    assert ablation.main(argv) == 0
    # --jobs 2: every run x seed was trained by a worker process, each with its own log
    assert sorted(p.name for p in (out / "logs").glob("*.log")) == sorted(
        f"{name}-seed{seed}.log" for name in ("baseline", "wd", "fgw-cosine") for seed in (0, 1)
    )
    data = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    runs = data["runs"]
    assert sorted((r["run"], r["seed"]) for r in runs) == sorted(
        (name, seed) for name in ("baseline", "wd", "fgw-cosine") for seed in (0, 1)
    )
    for r in runs:
        assert math.isfinite(r["test_cer"]) and 0.0 <= r["test_cer"] < 1.0  # the pretrained start learned
        assert r["dev_cer"] is not None and math.isfinite(r["dev_cer"])
        assert r["wall_seconds"] > 0
        assert r["config"]["train"]["seed"] == r["seed"]
        assert r["config"]["train"]["epochs"] == 1
    by_run = {(r["run"], r["seed"]): r for r in runs}
    assert by_run[("baseline", 0)]["config"]["gmot"]["mode"] == "none"
    assert by_run[("wd", 1)]["config"]["gmot"]["mode"] == "wd"
    assert by_run[("fgw-cosine", 0)]["config"]["gmot"]["structure"] == "cosine"
    # one pretrained start for every run, and it is the checkpoint pretrained into OUT/pretrain
    start = Path(data["settings"]["start_checkpoint"])
    assert start.parent == out / "pretrain" and start.is_file()
    assert {r["init_sha256"] for r in runs} == {file_sha256(start)}
    assert {r["init_checkpoint"] for r in runs} == {str(start)}
    # the same budget of updates for every run
    assert len({r["steps"] for r in runs}) == 1 and runs[0]["steps"] > 0
    # the decoded test set is scored against its references
    rtf = json.loads((out / "runs" / "wd-seed1" / "decode_test" / "rtf.json").read_text(encoding="utf-8"))
    assert rtf["cer"] == pytest.approx(by_run[("wd", 1)]["test_cer"])
    # summary: mean and sample std of the two seeds
    summary = {row["run"]: row for row in data["summary"]}
    cers = [by_run[("fgw-cosine", s)]["test_cer"] for s in (0, 1)]
    assert summary["fgw-cosine"]["test_cer_mean"] == pytest.approx(sum(cers) / 2)
    assert summary["fgw-cosine"]["test_cer_std"] == pytest.approx(abs(cers[0] - cers[1]) / math.sqrt(2))
    # the report: one table row per run, the exact command, machine and settings
    text = report.read_text(encoding="utf-8")
    for name in ("baseline", "wd", "fgw-cosine"):
        row = summary[name]
        assert f"| {name} | " in text
        assert f"| {100 * row['test_cer_mean']:.2f} | {100 * row['test_cer_std']:.2f} |" in text
    assert "python recipes/transfer_study/ablation.py " + " ".join(argv) in text
    assert data["command"] == "python recipes/transfer_study/ablation.py " + " ".join(argv)
    for key in ("- cpu:", "- cores:", "- torch:", "- threads:", "- alpha:", "- epsilon:", "- kt_weight:"):
        assert key in text
    assert "- jobs: 2 (worker processes of 1 thread each)" in text
    assert f"This invocation took {data['elapsed_seconds'] / 60:.1f} min of wall time" in text
    assert data["elapsed_seconds"] > 0
    # a second invocation reuses the finished runs: no training, decoding or worker, the same numbers
    ckpt_mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}

    def no_more_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained, decoded or given to a worker again")

    with monkeypatch.context() as patched:
        patched.setattr(ablation, "train", no_more_work)
        patched.setattr(ablation, "decode_test", no_more_work)
        patched.setattr(ablation, "subprocess", SimpleNamespace(Popen=no_more_work, STDOUT=subprocess.STDOUT))
        assert ablation.main(argv) == 0
    again = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    assert [(r["run"], r["seed"], r["test_cer"]) for r in again["runs"]] == [
        (r["run"], r["seed"], r["test_cer"]) for r in runs
    ]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == ckpt_mtimes
    # a finished run is not silently mixed with a run from other settings
    assert ablation.main([*argv, "--epochs", "2"]) == 2


@pytest.mark.slow
def test_from_scratch_runs_carry_the_transfer_diagnostics(tiny_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    report = tmp_path / "report.md"
    argv = [
        str(tiny_prepared), str(out), "--preset", "tiny", "--from-scratch", "--epochs", "2", "--seeds", "3",
        "--set", "train.max_utts=4", "--runs", "baseline,fgw-centred-tot", "--device", "cpu", "--no-progress",
        "--report", str(report),
    ]  # fmt: skip
    assert ablation.main(argv) == 0
    assert not (out / "pretrain").exists()  # no common start
    data = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    by_run = {r["run"]: r for r in data["runs"]}
    assert {r["init_sha256"] for r in data["runs"]} == {"scratch"}
    assert {r["init_checkpoint"] for r in data["runs"]} == {None}
    transfer = by_run["fgw-centred-tot"]
    assert transfer["config"]["gmot"]["centre"] is True and transfer["config"]["gmot"]["tot_weight"] == 0.5
    for key in ("align_lift", "align_order", "align_entropy", "grad_ratio"):
        assert math.isfinite(transfer[key])
        assert key not in by_run["baseline"]  # no transfer, no plans
    assert 0.0 < transfer["align_entropy"] <= 1.0
    text = report.read_text(encoding="utf-8")
    assert "Every run trains from random weights" in text
    row = next(r for r in data["summary"] if r["run"] == "fgw-centred-tot")
    assert f"| {row['align_lift']:.2f} | {row['align_order']:+.2f} |" in text
    with pytest.raises(SystemExit):
        ablation.parse_args([str(tiny_prepared), str(out), "--from-scratch", "--init-from", "x.pt"])


def test_collect_reports_the_finished_runs_and_trains_nothing(tiny_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [str(tiny_prepared), str(out), "--preset", "tiny", "--from-scratch", "--seeds", "0,1"]
    argv += ["--runs", "baseline,fgw-shuffle", "--report", str(tmp_path / "r.md")]
    opt = ablation.parse_args([*argv, "--collect"])
    spec = ablation.run_specs(0.5)["baseline"]
    finished = {
        **ablation.run_settings(opt, spec, (None, ablation.SCRATCH)),
        "run": "baseline",
        "description": spec.description,
        "seed": 1,
        "steps": 7,
        "test_cer": 0.5,
        "dev_cer": 0.4,
        "wall_seconds": 1.0,
    }
    ablation.write_json(out / "runs" / "baseline-seed1" / "result.json", finished)
    assert ablation.main([*argv, "--collect"]) == 0
    data = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    assert [(r["run"], r["seed"]) for r in data["runs"]] == [("baseline", 1)]
    assert [r["run"] for r in data["summary"]] == ["baseline"]
    assert not [p for p in (out / "runs").iterdir() if p.name != "baseline-seed1"]  # nothing trained
    # a finished run with other settings is refused, as when training
    ablation.write_json(out / "runs" / "baseline-seed1" / "result.json", {**finished, "epochs": 99})
    assert ablation.main([*argv, "--collect"]) == 2
