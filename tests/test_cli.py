"""The command-line entry points exist and answer --help, --version; the commands keep one exit-code rule."""

import subprocess
import sys
from pathlib import Path

import pytest
from prepare_helpers import write_kaldi_dir
from typer.testing import CliRunner

import gmot_cli.common
from gmot_cli import __version__
from gmot_cli.app import app
from models.engine.checkpoint import CheckpointError
from models.engine.training import TrainingError, TrainingSetupError


def test_version_prints_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gmot {__version__}"
    assert __version__ != "0.0.0+unknown"


def test_python_dash_m_runs_the_same_app() -> None:
    out = subprocess.run([sys.executable, "-m", "gmot_cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "GM-OT" in out.stdout


# --- the exit-code rule (gmot_cli.common): 2 a usage error, 1 a failed run ---------------------------------


def test_help_states_the_exit_code_rule() -> None:
    text = " ".join(CliRunner().invoke(app, ["--help"]).output.split())
    assert "Exit codes: 0 done. 2 a usage error" in text and "1 a failed run" in text


def test_score_usage_error_exits_2_and_a_failed_write_exits_1(tmp_path: Path) -> None:
    ref = tmp_path / "ref.txt"
    ref.write_text("u1 你好\nu2 天气\n", encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("u1 你好\nu2 天汽\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["score", str(ref), str(hyp), "--unit", "syllable"])
    assert res.exit_code == 2 and "--unit must be one of" in res.output
    res = CliRunner().invoke(app, ["score", str(ref), str(hyp), "--details", str(tmp_path)])  # a folder
    assert res.exit_code == 1 and "cannot write" in res.output


def test_prepare_usage_error_exits_2_and_an_empty_split_exits_1(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["prepare", "kaldi", str(tmp_path / "o"), "--split", "train", "--no-plm-cache"]
    )
    assert res.exit_code == 2 and "NAME=DIR" in res.output
    write_kaldi_dir(tmp_path / "train", {"t1": str(tmp_path / "none.wav")}, {"t1": "你好"})
    res = CliRunner().invoke(
        app,
        ["prepare", "kaldi", str(tmp_path / "o"), "--split", f"train={tmp_path / 'train'}", "--no-plm-cache"],
    )
    assert res.exit_code == 1 and "ended empty" in res.output


@pytest.mark.parametrize("command", ["pretrain", "distill"])
def test_training_usage_errors_exit_2_and_a_stopped_run_exits_1(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing data folder, an unknown preset and an unusable checkpoint are usage errors; the engine
    stopping (TrainingError) is a failed run. The engine is replaced: no training runs here."""
    args = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--no-progress",
        *(["--mode", "fgw"] * (command == "distill")),
    ]
    data = tmp_path / "data"
    res = CliRunner().invoke(app, [command, str(tmp_path / "nowhere"), str(tmp_path / "exp"), *args])
    assert res.exit_code == 2 and "nowhere" in res.output and "gmot prepare" in res.output
    res = CliRunner().invoke(app, [command, str(data), str(tmp_path / "exp"), *args, "--preset", "huge"])
    assert res.exit_code == 2 and "huge" in res.output
    (data / "train").mkdir(parents=True)
    (data / "train" / "manifest.jsonl").write_text("", encoding="utf-8")
    setup = TrainingSetupError("no PLM cache")
    for error, code in [
        (CheckpointError("checkpoint init.pt does not exist"), 2),
        (setup, 2),
        (TrainingError("NaN"), 1),
    ]:

        def fail(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(gmot_cli.common, "train", fail)
        res = CliRunner().invoke(app, [command, str(data), str(tmp_path / "exp"), *args])
        assert res.exit_code == code and f"error: {error}" in res.output, res.output


def test_a_data_folder_without_its_lang_folder_is_a_usage_error_from_the_real_engine(tmp_path: Path) -> None:
    """Not mocked: the engine refuses the folder before training (TrainingSetupError), naming what is
    missing."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "manifest.jsonl").write_text("", encoding="utf-8")
    args = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(app, ["pretrain", str(data), str(tmp_path / "exp"), *args])
    assert res.exit_code == 2, res.output
    assert "lang" in res.output and "error:" in res.output
