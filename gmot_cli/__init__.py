"""gmot command-line interface: one small module per subcommand over the `models` and `data` libraries."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gmot")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
