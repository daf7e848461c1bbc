"""Host synchronisations of the transfer loss, the solver and the training step, counted on the CPU with a
shim: every call that would make a GPU wait (Tensor.__bool__, item, tolist, __int__, __float__, nonzero) is
counted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import models.engine.training as training
from models.engine.config import resolve_config
from models.nn.ctc import ctc_impossible, ctc_losses
from models.nn.transfer_loss import GMOTConfig, GMOTLoss
from models.ot import transport, unbalanced

SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def count_syncs(counts: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Count the calls of SYNCING tensor methods inside the block into counts["n"] (a new dict by default),
    except while counts["paused"] > 0 (`paused`): for host work that does not wait for a device."""
    counts = {"n": 0, "paused": 0} if counts is None else counts
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            if not counts["paused"]:
                counts["n"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def paused(counts: dict[str, int]) -> Iterator[None]:
    """Stop counting inside the block."""
    counts["paused"] += 1
    try:
        yield
    finally:
        counts["paused"] -= 1


def _batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    z = torch.randn(3, 6, 16, generator=g)
    return h, torch.tensor([40, 33, 20]), z, torch.tensor([6, 5, 3])


def test_the_shim_sees_synchronisations() -> None:
    with count_syncs() as c:
        bool(torch.ones(1))
        torch.ones(1).item()
    assert c["n"] == 2


def test_trusted_solver_calls_do_not_synchronise() -> None:
    cost = torch.rand(4, 20, 6)
    sa, sb = torch.rand(4, 20, 20), torch.rand(4, 6, 6)
    sa, sb = sa + sa.mT, sb + sb.mT
    a = torch.zeros(4, 20)
    a[:, :15] = 1 / 15
    for domain in ("kernel", "log"):
        with count_syncs() as c:
            transport.fused_gromov_wasserstein(
                cost, sa, sb, a, None, 0.5, 0.1, domain=domain, symmetric=True, validate=False
            )
            transport.sinkhorn(cost, a, None, 0.1, max_iter=50, domain=domain, validate=False)
            unbalanced.unbalanced_fused_gromov_wasserstein(cost, sa, sb, a, None, 0.5, 0.1, validate=False)
        assert c["n"] == 0, domain
    with count_syncs() as c:  # the checked call does synchronise: the count above could be non-zero
        transport.fused_gromov_wasserstein(cost, sa, sb, a, None, 0.5, 0.1, domain="kernel", symmetric=True)
    assert c["n"] > 5


def test_transfer_loss_synchronises_at_most_twice_per_step() -> None:
    h, hl, z, zl = _batch()
    for mode in ("wd", "fgw"):
        loss = GMOTLoss(GMOTConfig(mode=mode, standardise=False, centre=True, tot_weight=0.5))
        with count_syncs() as c:
            out = loss(h, hl, z, zl)
            out["kt"].backward()
        # the empty-item check (only for CPU lengths, free there) and the kernel-domain rerun check
        assert c["n"] <= 2, (mode, c["n"])


def test_nan_features_give_a_nan_transfer_loss_not_an_error() -> None:
    h, hl, z, zl = _batch()
    bad = h.detach().clone()
    bad[1, 3] = float("nan")
    out = GMOTLoss(GMOTConfig(standardise=False))(bad, hl, z, zl)
    assert torch.isnan(out["kt"])


def test_impossible_ctc_is_found_without_the_loss() -> None:
    """The engine finds the utterances CTC cannot align from the lengths, on the device; they are exactly
    those whose CTC loss is infinite."""
    g = torch.Generator().manual_seed(0)
    # at the limit (labels plus repeats = frames) and one frame short of it, with and without repeats
    frames = torch.tensor([6, 5, 6, 5, 5, 4, 3, 7, 6, 2])
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], [2, 2, 3, 3, 0, 0], [2, 2, 3, 3, 0, 0],
                           [2, 2, 2, 0, 0, 0], [4, 4, 4, 0, 0, 0], [5, 0, 0, 0, 0, 0], [3, 3, 3, 3, 0, 0],
                           [3, 3, 3, 3, 0, 0], [2, 2, 0, 0, 0, 0]])  # fmt: skip
    token_lens = torch.tensor([6, 6, 4, 4, 3, 3, 1, 4, 4, 2])
    log_probs = torch.randn(10, 8, 9, generator=g).log_softmax(-1)
    out = {"log_probs": log_probs, "lengths": frames}
    expected = torch.isinf(ctc_losses(out, tokens, token_lens))
    assert expected.any() and not expected.all()
    assert torch.equal(ctc_impossible(frames, tokens, token_lens), expected)


@pytest.mark.parametrize(("mode", "most"), [("none", 1), ("fgw", 2)])
def test_a_training_step_synchronises_at_most_twice(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, most: int
) -> None:
    """Every training step (accum_grad 1) is counted, logged (log_interval 1, with the gradient ratio) and
    checked: one read of the step's results, and with a transfer loss the solver's log-domain rerun check.
    Not counted: the data loader (host tensors before they go to the device) and AdamW's step counters,
    which live on the host unless the optimiser is capturable, so their .item() waits for no device."""
    counted = {"n": 0, "paused": 0}
    original_build, original_epoch = training.Trainer._build, training.Trainer._train_epoch

    class HostLoader(training.DataLoader):
        def __iter__(self):
            with paused(counted):
                batches = super().__iter__()
            while True:
                with paused(counted):
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch

    def build(self) -> None:
        original_build(self)
        step = self.optimizer.step

        def host_step(*args, **kwargs):
            with paused(counted):
                return step(*args, **kwargs)

        self.optimizer.step = host_step

    def train_epoch(self, progress) -> None:
        with count_syncs(counted):
            original_epoch(self, progress)

    monkeypatch.setattr(training, "DataLoader", HostLoader)
    monkeypatch.setattr(training.Trainer, "_build", build)
    monkeypatch.setattr(training.Trainer, "_train_epoch", train_epoch)
    cfg = resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=1", f"gmot.mode={mode}"])
    out = training.train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    assert out.step == 4
    # before the reads were gathered: 26 per step with fgw (22 on a step that logs nothing)
    assert counted["n"] <= most * out.step, counted
