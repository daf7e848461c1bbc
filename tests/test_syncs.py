"""Host synchronisations of the transfer loss and the solver, counted on the CPU with a shim: every call that
would make a GPU wait (Tensor.__bool__, item, tolist, __int__, __float__, nonzero) is counted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from models import transport
from models.gmot import GMOTConfig, GMOTLoss

SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def count_syncs() -> Iterator[dict[str, int]]:
    """Count the calls of SYNCING tensor methods inside the block."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(original):
        def wrapper(self, *args, **kwargs):
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
            transport.unbalanced_fused_gromov_wasserstein(cost, sa, sb, a, None, 0.5, 0.1, validate=False)
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
