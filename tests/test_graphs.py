"""models.ot.graphs: node costs, structure matrices and marginals on padded batches."""

from __future__ import annotations

import pytest
import torch

from models.ot.graphs import cosine_cost, structure_matrix, temporal_positions, uniform_marginal
from models.ot.transport import fused_gromov_wasserstein

F64 = torch.float64


def batch(seed: int = 0, lengths=(3, 1, 4), width: int = 5):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, width, generator=g, dtype=F64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = 9.0  # garbage at padding
    return x, mask


def test_cosine_cost_values_and_padding():
    x, xm = batch(0, (3, 1, 4))
    y, ym = batch(1, (2, 2, 1))
    cost = cosine_cost(x, y, xm, ym)
    assert cost.shape == (3, 4, 2)
    for i in range(3):
        for r in range(4):
            for c in range(2):
                if xm[i, r] and ym[i, c]:
                    ref = 1 - torch.nn.functional.cosine_similarity(x[i, r], y[i, c], dim=0)
                    assert float(cost[i, r, c]) == pytest.approx(float(ref), abs=1e-12)
                else:
                    assert float(cost[i, r, c]) == 0.0


def test_zero_feature_vector_costs_one_and_is_finite():
    x = torch.zeros(1, 2, 3, dtype=F64, requires_grad=True)
    y = torch.ones(1, 1, 3, dtype=F64)
    m = torch.ones(1, 2, dtype=torch.bool)
    cost = cosine_cost(x, y, m, torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(cost, torch.ones(1, 2, 1, dtype=F64))
    (g,) = torch.autograd.grad(cost.sum(), x)
    assert bool(torch.isfinite(g).all())


def test_temporal_structure():
    x, mask = batch(2, (3, 1, 4))
    d = structure_matrix(x, mask, "temporal")
    assert torch.allclose(temporal_positions(mask, F64)[0, :3], torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert torch.allclose(d[0, :3, :3], torch.tensor([[0, 0.5, 1], [0.5, 0, 0.5], [1, 0.5, 0]], dtype=F64))
    assert bool((d[1] == 0).all())  # a single node: no edges, padding zero
    assert float(d[2, 0, 3]) == pytest.approx(1.0) and float(d[2, 1, 2]) == pytest.approx(1 / 3)
    assert bool((d[0, 3:] == 0).all()) and bool((d[0, :, 3:] == 0).all())
    assert torch.equal(d, d.transpose(1, 2))


def test_cosine_and_hybrid_structures():
    x, mask = batch(3, (4, 2, 3))
    cos = structure_matrix(x, mask, "cosine")
    assert torch.allclose(cos, cosine_cost(x, x, mask, mask))
    assert torch.allclose(cos, cos.transpose(1, 2))
    assert torch.allclose(torch.diagonal(cos, dim1=1, dim2=2)[mask], torch.zeros(9, dtype=F64), atol=1e-12)
    hyb = structure_matrix(x, mask, "hybrid", mix=0.3)
    assert torch.allclose(hyb, 0.3 * cos + 0.7 * structure_matrix(x, mask, "temporal"))
    assert bool((hyb[1, 2:] == 0).all())


@pytest.mark.parametrize(("kind", "mix", "name"), [("graph", 0.5, "kind"), ("hybrid", 1.5, "mix")])
def test_structure_bad_arguments(kind, mix, name):
    x, mask = batch()
    with pytest.raises(ValueError, match=f"^{name}"):
        structure_matrix(x, mask, kind, mix)


def test_mask_shape_is_checked():
    x, mask = batch()
    with pytest.raises(ValueError, match=r"^x_mask"):
        structure_matrix(x, mask[:, :2])


def test_uniform_marginal():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w = uniform_marginal(mask, F64)
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0], [1, 0, 0]], dtype=F64))
    with pytest.raises(ValueError, match=r"^mask"):
        uniform_marginal(torch.tensor([[True, False], [False, False]]))


def test_gradients_reach_features_and_vanish_at_padding():
    x, xm = batch(4, (4, 2, 3), width=6)
    y, ym = batch(5, (2, 3, 1), width=6)
    x.requires_grad_()
    y.requires_grad_()
    res = fused_gromov_wasserstein(
        cosine_cost(x, y, xm, ym),
        structure_matrix(x, xm, "hybrid"),
        structure_matrix(y, ym, "cosine"),
        uniform_marginal(xm, F64),
        uniform_marginal(ym, F64),
        outer_iter=5,
        inner_iter=10,
        check_convergence=False,  # a small budget on purpose: this test is about where gradients go
    )
    gx, gy = torch.autograd.grad(res.value.sum(), (x, y))
    assert bool((gx[~xm] == 0).all()) and bool((gy[~ym] == 0).all())
    assert bool(gx[xm].abs().sum() > 0) and bool(gy[ym].abs().sum() > 0)
    assert bool(torch.isfinite(gx).all())
