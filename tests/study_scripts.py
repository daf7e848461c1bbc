"""Load a script of recipes/transfer_study/ (not a package) as a module, for the tests of the study."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

STUDY = Path(__file__).resolve().parents[1] / "recipes" / "transfer_study"


def load_study_script(stem: str) -> ModuleType:
    """recipes/transfer_study/STEM.py, executed afresh as module `study_STEM` (registered in sys.modules,
    where its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"study_{stem}", STUDY / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
