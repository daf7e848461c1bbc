"""The command-line entry points exist and answer --help / --version."""

import subprocess
import sys

from typer.testing import CliRunner

from gmot_cli import __version__
from gmot_cli.app import app


def test_version_prints_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gmot {__version__}"
    assert __version__ != "0.0.0+unknown"


def test_python_dash_m_runs_the_same_app() -> None:
    out = subprocess.run([sys.executable, "-m", "gmot_cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "GM-OT" in out.stdout
