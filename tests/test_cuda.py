"""On a CUDA GPU (benchmarks/gpu_check.sh runs these; without a GPU they are skipped): the solver and the
transfer loss give the CPU's results, a training run picks the GPU's precision and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import transport
from models.gmot import GMOTConfig, GMOTLoss
from models.precision import choose_precision

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]


def _problem(device: str, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 30, 7, generator=g, dtype=dtype)
    sa = torch.rand(4, 30, 30, generator=g, dtype=dtype)
    sb = torch.rand(4, 7, 7, generator=g, dtype=dtype)
    sa, sb = sa + sa.mT, sb + sb.mT
    a = torch.zeros(4, 30, dtype=dtype)
    for k, n in enumerate((30, 25, 12, 3)):
        a[k, :n] = 1.0 / n
    return [t.to(device) for t in (cost, sa, sb, a)]


def test_fgw_on_the_gpu_matches_the_cpu() -> None:
    cpu = transport.fused_gromov_wasserstein(*_problem("cpu")[:3], _problem("cpu")[3], None, 0.5, 0.05)
    gpu = transport.fused_gromov_wasserstein(*_problem("cuda")[:3], _problem("cuda")[3], None, 0.5, 0.05)
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, atol=1e-10, rtol=0)


def test_unbalanced_on_the_gpu_matches_the_cpu() -> None:
    cost, _, _, a = _problem("cpu")
    ref = transport.unbalanced_fused_gromov_wasserstein(cost, None, None, a, None, 0.0, 0.1, tau_a=0.5)
    got = transport.unbalanced_fused_gromov_wasserstein(
        cost.cuda(), None, None, a.cuda(), None, 0.0, 0.1, tau_a=0.5
    )
    torch.testing.assert_close(got.plan.cpu(), ref.plan, atol=1e-10, rtol=0)


def test_transfer_loss_forward_and_backward_on_the_gpu() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 40, 16, generator=g)
    z = torch.randn(3, 6, 16, generator=g)
    hl, zl = torch.tensor([40, 33, 20]), torch.tensor([6, 5, 3])
    cfg = GMOTConfig(standardise=False, centre=True, tot_weight=0.5)
    results = {}
    for device in ("cpu", "cuda"):
        x = h.to(device).requires_grad_(True)
        out = GMOTLoss(cfg).to(device)(x, hl.to(device), z.to(device), zl.to(device))
        out["kt"].backward()
        results[device] = (out["kt"].detach().cpu(), x.grad.cpu())
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], atol=1e-4, rtol=1e-3)


def test_precision_follows_the_gpu() -> None:
    major, _ = torch.cuda.get_device_capability(0)
    assert choose_precision(torch.device("cuda:0"), True) == ("bf16" if major >= 8 else "fp16")


def test_tiny_distill_on_the_gpu(tiny_prepared: Path, tmp_path: Path) -> None:
    from models.config import resolve_config
    from models.training import train

    cfg = resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=2", "gmot.mode=fgw"])
    out = train(tiny_prepared, tmp_path / "exp", cfg, device="cuda", progress=False)
    assert out.epochs_done == 2 and out.step > 0 and out.skipped_nan == 0
