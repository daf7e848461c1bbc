"""The CUDA path against the CPU: the solver and the transfer loss give the CPU's results; training picks the
device's precision, resumes a checkpoint written on the CPU and runs an online teacher there; a model
beam-decodes there as on the CPU.

Every test takes a `device`. Its "cuda" leg is marked `cuda` (benchmarks/gpu_check.sh runs `pytest -m cuda
tests/test_cuda.py`) and is skipped without a GPU; its "cpu" leg runs the same code in CI, so the tests'
own logic is exercised where no GPU is lent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_without_plm_cache
from tiny_model import build_tiny_checkpoint
from torch import Tensor
from typer.testing import CliRunner

from data.scoring import read_kaldi_text
from gmot_cli.app import app
from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.config import resolve_config
from models.engine.precision import choose_precision, cpu_has_native_bf16
from models.engine.training import train
from models.nn.transfer_loss import GMOTConfig, GMOTLoss
from models.ot import transport, unbalanced

pytestmark = pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)


def _problem(device: str, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 30, 7, generator=g, dtype=dtype)
    sa = torch.rand(4, 30, 30, generator=g, dtype=dtype)
    sb = torch.rand(4, 7, 7, generator=g, dtype=dtype)
    sa, sb = sa + sa.mT, sb + sb.mT
    a = torch.zeros(4, 30, dtype=dtype)
    for k, n in enumerate((30, 25, 12, 3)):
        a[k, :n] = 1.0 / n
    return [t.to(device) for t in (cost, sa, sb, a)]


def _leaf(t: Tensor, device: str) -> Tensor:
    """A new leaf on `device` with `t`'s values. `t.to(device)` would be `t` itself where `t` already is,
    which then requires grad, so a second `.to(device)` is no leaf and gets no `.grad`."""
    return t.detach().to(device, copy=True).requires_grad_(True)


def _tiny(*extra: str):
    return resolve_config("tiny", overrides=["train.max_utts=3", *extra])


def test_fgw_on_the_device_matches_the_cpu(device: str) -> None:
    cpu = transport.fused_gromov_wasserstein(*_problem("cpu"), None, 0.5, 0.05)
    got = transport.fused_gromov_wasserstein(*_problem(device), None, 0.5, 0.05)
    torch.testing.assert_close(got.plan.cpu(), cpu.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(got.value.cpu(), cpu.value, atol=1e-10, rtol=0)


def test_unbalanced_on_the_device_matches_the_cpu(device: str) -> None:
    cost, _, _, a = _problem("cpu")
    ref = unbalanced.unbalanced_fused_gromov_wasserstein(cost, None, None, a, None, 0.0, 0.1, tau_a=0.5)
    got = unbalanced.unbalanced_fused_gromov_wasserstein(
        cost.to(device), None, None, a.to(device), None, 0.0, 0.1, tau_a=0.5
    )
    torch.testing.assert_close(got.plan.cpu(), ref.plan, atol=1e-10, rtol=0)


def test_transfer_loss_forward_and_backward_on_the_device(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 40, 16, generator=g)
    z = torch.randn(3, 6, 16, generator=g)
    hl, zl = torch.tensor([40, 33, 20]), torch.tensor([6, 5, 3])
    cfg = GMOTConfig(standardise=False, centre=True, tot_weight=0.5)
    results = {}
    for run, dev in (("reference", "cpu"), ("device", device)):
        x = _leaf(h, dev)
        out = GMOTLoss(cfg).to(dev)(x, hl.to(dev), z.to(dev), zl.to(dev))
        out["kt"].backward()
        assert x.grad is not None, run
        # copies: on the CPU .cpu() is the tensor itself, which a later backward into it would change
        results[run] = (out["kt"].detach().cpu().clone(), x.grad.cpu().clone())
    torch.testing.assert_close(results["device"][0], results["reference"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["device"][1], results["reference"][1], atol=1e-4, rtol=1e-3)


def test_precision_follows_the_device(device: str) -> None:
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability(0)
        expected = "bf16" if major >= 8 else "fp16"
    else:
        expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert choose_precision(torch.device(device), True) == expected
    assert choose_precision(torch.device(device), False) == "fp32"


@pytest.mark.slow
def test_tiny_distill_on_the_device(tiny_prepared: Path, tmp_path: Path, device: str) -> None:
    cfg = _tiny("train.epochs=2", "gmot.mode=fgw")
    out = train(tiny_prepared, tmp_path / "exp", cfg, device=device, progress=False)
    assert out.epochs_done == 2 and out.step > 0 and out.skipped_nan == 0
    assert set(out.dev_cer) == {1, 2}  # a dev pass after each epoch


@pytest.mark.slow
def test_a_cpu_checkpoint_resumes_on_the_device(tiny_prepared: Path, tmp_path: Path, device: str) -> None:
    exp = tmp_path / "exp"
    first = train(tiny_prepared, exp, _tiny("train.epochs=1", "gmot.mode=fgw"), device="cpu", progress=False)
    # the optimiser state, the sampler and the counters written on the CPU go on on the device
    out = train(tiny_prepared, exp, _tiny("train.epochs=2", "gmot.mode=fgw"), device=device, progress=False)
    assert out.resumed_from is not None and out.epochs_done == 2
    assert out.step == 2 * first.step and out.skipped_nan == 0
    state = load_checkpoint(list_checkpoints(exp)[-1])
    assert state["step"] == out.step and state["epoch_complete"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(torch.isfinite(m).all() for m in moments)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no PLM feature cache")
def test_online_teacher_on_the_device(tiny_prepared: Path, tmp_path: Path, device: str) -> None:
    from tiny_plm import make_tiny_bert_dir

    data = copy_without_plm_cache(tiny_prepared, tmp_path / "data")
    bert = make_tiny_bert_dir(tmp_path / "bert", width=24)
    cfg = _tiny("train.epochs=1", "gmot.mode=wd", f"train.plm={bert}")
    out = train(data, tmp_path / "exp", cfg, device=device, progress=False)
    assert out.epochs_done == 1 and out.skipped_nan == 0
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert state["model"]["adapter.weight"].shape[0] == 24  # the online teacher's width
    records = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    kts = [r["kt"] for r in records if r["event"] == "train"]
    assert kts and all(k > 0 for k in kts)


@pytest.mark.slow
def test_beam_decode_on_the_device_reads_as_on_the_cpu(
    tiny_prepared: Path, tmp_path: Path, device: str
) -> None:
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp")
    texts = {}
    for run, dev in (("reference", "cpu"), ("device", device)):
        out = tmp_path / run
        res = CliRunner().invoke(
            app,
            ["decode", str(exp), str(tiny_prepared), "--split", "train", "--method", "beam", "--beam-size",
             "4", "--device", dev, "--no-progress", "--out", str(out)],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert json.loads((out / "rtf.json").read_text(encoding="utf-8"))["device"] == dev
        texts[run] = read_kaldi_text(out / "text")
    assert list(texts["device"]) == list(texts["reference"])
    # the device's float32 rounding (TF32 convolutions) may tip a near tie of the search; not more than one
    differ = [u for u in texts["reference"] if texts["device"][u] != texts["reference"][u]]
    assert len(differ) <= 1, differ
