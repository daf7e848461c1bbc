"""models.engine.allocator: freed memory stays in the process, so memory freed by one training step is reused
by the next without new page faults; GMOT_MALLOC=default leaves glibc alone; results do not depend on it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# A child process allocates, touches and frees N MiB three times (the pattern of one activation over three
# steps) and prints the minor page faults of the last two rounds.
_CHILD = """
import ctypes, resource, sys
from models.engine.allocator import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = int(sys.argv[1]) * 1024 * 1024

def step():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")


def _faults(env_value: str | None, mib: int = 16) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GMOT_MALLOC"}
    if env_value is not None:
        env["GMOT_MALLOC"] = env_value
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(mib)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=True,
    ).stdout.split("\n")
    return out[0], int(out[1])


@needs_glibc
def test_freed_memory_is_reused_without_page_faults() -> None:
    state, faults = _faults(None)
    assert state.startswith("glibc: freed memory kept")
    assert faults < 100  # 16 MiB reused twice: no fresh pages
    state, faults = _faults("default")
    assert "GMOT_MALLOC=default" in state
    # glibc's default maps the first block and unmaps it on free (then raises its threshold), so the second
    # round faults in 4,096 fresh heap pages
    assert faults > 3000


@needs_glibc
def test_blocks_above_glibcs_largest_mmap_threshold_are_reused_too() -> None:
    # 48 MiB is above the 32 MiB that glibc's mmap threshold can be raised to: only with mmap off does the
    # block come from the heap and stay there (12,288 fresh pages a round otherwise)
    _, faults = _faults(None, mib=48)
    assert faults < 100
    _, faults = _faults("default", mib=48)
    assert faults > 2 * 12000


@pytest.mark.slow
def test_training_sets_the_allocator_and_is_unchanged_by_it(tiny_prepared: Path, tmp_path: Path) -> None:
    import torch

    from models.engine import allocator
    from models.engine.config import resolve_config
    from models.engine.training import train

    cfg = resolve_config("tiny", None, ["train.epochs=1", "train.threads=1"], {"gmot.mode": "none"})
    allocator._state = None
    train(tiny_prepared, tmp_path / "run", cfg, device="cpu", progress=False)
    assert allocator._state is not None  # the engine asked for it (whatever the C library)
    if platform.libc_ver()[0] == "glibc":
        assert allocator._state.startswith("glibc: freed memory kept")
    # the allocator decides where memory comes from, never what is computed: a run in a process with
    # glibc's defaults gives the same weights bit for bit
    env = {**os.environ, "GMOT_MALLOC": "default", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "gmot_cli", "pretrain", str(tiny_prepared), str(tmp_path / "default"),
        "--preset", "tiny", "--epochs", "1", "--no-progress", "--set", "train.threads=1",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=root, capture_output=True)
    mine = sorted((tmp_path / "run").glob("ckpt-*.pt"))[-1]
    theirs = sorted((tmp_path / "default").glob("ckpt-*.pt"))[-1]
    a = torch.load(mine, map_location="cpu", weights_only=True)["model"]
    b = torch.load(theirs, map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
