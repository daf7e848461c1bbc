"""benchmarks/avx2_only.env: sourced in bash, it holds torch and numpy to AVX2 on a machine that has more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "avx2_only.env"

PROBE = """
import numba.core.config as numba_config
import numpy._core._multiarray_umath as umath
import torch
print(torch.backends.cpu.get_cpu_capability())
print(" ".join(sorted(k for k in ("X86_V4", "AVX512_ICL", "AVX512_SPR") if umath.__cpu_features__.get(k))))
print(numba_config.CPU_NAME)
"""


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the CPU has no AVX2"
)
def test_sourcing_the_file_holds_torch_numpy_and_numba_to_avx2() -> None:
    cmd = f'source "{ENV_FILE}" && "{sys.executable}" -c "$PROBE"'
    res = subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, env={"PROBE": PROBE, "PATH": "/usr/bin:/bin"}
    )
    assert res.returncode == 0, res.stderr
    capability, numpy_wide, numba_cpu = res.stdout.splitlines()
    assert capability == "AVX2"
    assert numpy_wide == ""  # numpy's AVX-512 loops are switched off
    assert numba_cpu == "haswell"
