"""gmot command-line interface: one small module per subcommand over the `models` and `data` libraries."""

from models import __version__

__all__ = ["__version__"]
