"""GM-OT knowledge-transfer loss: modes, marginals, gradients and padding, standardisation, learning, and
its value computed by hand."""

import dataclasses

import numpy as np
import pytest
import torch

from data.store import PLMInfo
from models.nn.encoder import PRESETS, ConformerCTC
from models.nn.transfer_loss import GMOTConfig, GMOTLoss, order_prior

torch.set_num_threads(1)


def _batch(seed: int = 0, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    n_len, m_len = torch.tensor([12, 7, 9]), torch.tensor([5, 3, 4])
    acoustic = torch.randn(3, 12, d, generator=g)
    plm = torch.randn(3, 5, d, generator=g) + 2.0
    return acoustic, n_len, plm, m_len


def _stats(d: int = 8):
    return torch.full((d,), 2.0), torch.full((d,), 1.5)


def _loss(**kw) -> GMOTLoss:
    return GMOTLoss(GMOTConfig(**kw), *_stats())


def test_mode_wd_is_fgw_with_alpha_zero() -> None:
    acoustic, n_len, plm, m_len = _batch()
    kw = {"epsilon": 0.1, "outer_iter": 20, "inner_iter": 50, "structure": "cosine"}
    wd = _loss(mode="wd", alpha=0.7, **kw)(acoustic, n_len, plm, m_len)
    fgw0 = _loss(mode="fgw", alpha=0.0, **kw)(acoustic, n_len, plm, m_len)
    fgw = _loss(mode="fgw", alpha=0.7, **kw)(acoustic, n_len, plm, m_len)
    assert torch.allclose(wd["plan"], fgw0["plan"], atol=1e-5)
    assert torch.allclose(wd["kt"], fgw0["kt"], atol=1e-5)
    assert not torch.allclose(wd["plan"], fgw["plan"], atol=1e-3)  # alpha matters in mode fgw
    assert GMOTConfig(mode="wd", alpha=0.7).effective_alpha == 0.0


@pytest.mark.parametrize("structure", ["cosine", "temporal", "hybrid"])
def test_plan_has_the_marginals_and_zero_padding(structure: str) -> None:
    acoustic, n_len, plm, m_len = _batch(1)
    out = _loss(structure=structure, outer_iter=10, inner_iter=50)(acoustic, n_len, plm, m_len)
    plan = out["plan"]
    assert plan.shape == (3, 12, 5) and not plan.requires_grad
    for i in range(3):
        n, m = int(n_len[i]), int(m_len[i])
        assert plan[i, n:].abs().sum() == 0 and plan[i, :, m:].abs().sum() == 0
        assert torch.allclose(plan[i, :n].sum(1), torch.full((n,), 1 / n), atol=1e-4)
        assert torch.allclose(plan[i, :, :m].sum(0), torch.full((m,), 1 / m), atol=1e-4)
    for key in ("kt", "kt_ot", "kt_align"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])


def test_an_item_alone_gets_the_same_plan_as_in_a_padded_batch() -> None:
    acoustic, n_len, plm, m_len = _batch(2)
    loss = _loss(outer_iter=5, inner_iter=30)
    batch_plan = loss(acoustic, n_len, plm, m_len)["plan"]
    alone = loss(acoustic[1:2, :7], n_len[1:2], plm[1:2, :3], m_len[1:2])["plan"]
    assert torch.allclose(alone[0], batch_plan[1, :7, :3], atol=1e-6)


@pytest.mark.parametrize("mode", ["wd", "fgw"])
@pytest.mark.parametrize("terms", ["ot", "align", "both"])
def test_gradients_reach_valid_frames_and_are_zero_at_padding(mode: str, terms: str) -> None:
    acoustic, n_len, plm, m_len = _batch(3)
    acoustic.requires_grad_(True)
    out = _loss(mode=mode, terms=terms)(acoustic, n_len, plm, m_len)
    out["kt"].backward()
    grad = acoustic.grad
    assert grad[1, 7:].abs().max() == 0 and grad[2, 9:].abs().max() == 0
    for i in range(3):
        assert grad[i, : int(n_len[i])].abs().sum(-1).min() > 0
    if terms == "both":
        assert torch.allclose(out["kt"], out["kt_ot"] + out["kt_align"])


@pytest.mark.parametrize("fault", ["inf_feature", "nan_feature", "no_tokens"])
@pytest.mark.parametrize(
    "options",
    [
        {"mode": "fgw"},
        {"mode": "wd"},
        {"unbalanced_tau": 1.0},
        {"epsilon_scale": "cost_std", "reduction": "sum"},
    ],
    ids=["fgw", "wd", "unbalanced", "cost_std-sum"],
)
def test_an_item_with_a_broken_teacher_weighs_nothing_and_its_batch_mates_train(
    fault: str, options: dict
) -> None:
    """One item whose teacher features are non-finite (a float16 overflow in the cache) or empty must not
    turn the batch NaN: the batch gives what its other items give alone, and that item no gradient."""
    acoustic, n_len, plm, m_len = _batch(6)
    plm[2, 4:] = float("inf")  # in item 2's padding: ignored, item 2 stays usable
    if fault == "inf_feature":
        plm[1, 1, 3] = float("inf")
    elif fault == "nan_feature":
        plm[1, 0, 0] = float("nan")
    else:
        m_len[1] = 0
    loss = _loss(outer_iter=5, inner_iter=30, **options)
    acoustic.requires_grad_(True)
    out = loss(acoustic, n_len, plm, m_len)
    out["kt"].backward()
    keep = torch.tensor([0, 2])
    alone_acoustic = acoustic.detach()[keep].requires_grad_(True)
    alone = loss(alone_acoustic, n_len[keep], plm[keep], m_len[keep])
    alone["kt"].backward()
    for key in ("kt", "kt_ot", "kt_align", "plan_entropy", "plan_marginal_error"):
        assert torch.isfinite(out[key]), key
        assert torch.allclose(out[key], alone[key], atol=1e-5), key
    assert torch.isfinite(acoustic.grad).all() and acoustic.grad[1].abs().max() == 0
    assert torch.allclose(acoustic.grad[keep], alone_acoustic.grad, atol=1e-6)
    assert out["plan"][1].abs().max() == 0
    assert torch.allclose(out["plan"][keep], alone["plan"], atol=1e-6)


def test_a_batch_without_any_usable_teacher_gives_zero() -> None:
    acoustic, n_len, plm, m_len = _batch(7)
    acoustic.requires_grad_(True)
    out = _loss()(acoustic, n_len, plm * float("nan"), m_len)
    assert out["kt"] == 0 and out["plan"].abs().max() == 0
    out["kt"].backward()
    assert acoustic.grad.abs().max() == 0
    empty = _loss()(acoustic, n_len, plm[:, :0], torch.zeros(3, dtype=torch.long))
    assert empty["kt"] == 0 and empty["plan"].shape == (3, 12, 0)


def test_gradients_reach_the_adapter_and_encoder_through_the_model() -> None:
    torch.manual_seed(4)
    model = ConformerCTC(PRESETS["tiny"], vocab_size=9, plm_width=8)
    out = model(torch.randn(2, 40, 80), torch.tensor([40, 30]))
    plm, m_len = torch.randn(2, 4, 8), torch.tensor([4, 2])
    _loss()(out["adapted"], out["lengths"], plm, m_len)["kt"].backward()
    assert model.adapter.weight.grad.abs().sum() > 0
    assert model.layers[0].ffn1.sequential[1].weight.grad.abs().sum() > 0
    assert model.ctc_head.weight.grad is None  # kt does not touch the CTC head


def test_standardisation_uses_the_given_statistics() -> None:
    acoustic, n_len, plm, m_len = _batch(5)
    mean, std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    with_stats = GMOTLoss(GMOTConfig(standardise=True, centre=False), mean, std)(acoustic, n_len, plm, m_len)
    by_hand = GMOTLoss(GMOTConfig(standardise=False, centre=False))(
        acoustic, n_len, (plm - mean) / std, m_len
    )
    raw = GMOTLoss(GMOTConfig(standardise=False, centre=False))(acoustic, n_len, plm, m_len)
    assert torch.allclose(with_stats["kt"], by_hand["kt"], atol=1e-6)
    assert not torch.allclose(with_stats["kt"], raw["kt"], atol=1e-3)
    info = GMOTLoss.from_plm_info(
        GMOTConfig(centre=False), PLMInfo("x", "tests", 8, -1, mean.tolist(), std.tolist())
    )
    assert torch.allclose(info(acoustic, n_len, plm, m_len)["kt"], with_stats["kt"], atol=1e-6)
    assert "plm_mean" in dict(info.named_buffers())
    with pytest.raises(ValueError, match="no PLM feature statistics"):
        GMOTLoss(GMOTConfig(standardise=True, centre=False))(acoustic, n_len, plm, m_len)
    with pytest.raises(ValueError, match="width 4"):
        GMOTLoss(GMOTConfig(centre=False), torch.zeros(4), torch.ones(4))(acoustic, n_len, plm, m_len)


def test_mode_none_costs_nothing() -> None:
    acoustic, n_len, plm, m_len = _batch(6)
    out = _loss(mode="none")(acoustic, n_len, plm, m_len)
    assert out["kt"].item() == 0.0 and out["plan"].shape == (3, 12, 5)


def test_order_prior_pulls_the_plan_to_the_diagonal() -> None:
    acoustic, n_len, plm, m_len = _batch(7)
    a_mask = torch.arange(12)[None] < n_len[:, None]
    b_mask = torch.arange(5)[None] < m_len[:, None]
    prior = order_prior(a_mask, b_mask)
    assert prior.shape == (3, 12, 5) and prior[1, 7:].abs().max() == 0
    assert torch.isclose(prior[0, 0, 0], torch.tensor(abs(0.5 / 12 - 0.5 / 5)))
    off = (_loss(tot_weight=0.0)(acoustic, n_len, plm, m_len)["plan"] * prior).sum()
    on = (_loss(tot_weight=5.0)(acoustic, n_len, plm, m_len)["plan"] * prior).sum()
    assert on < 0.5 * off


@pytest.mark.parametrize("mode", ["wd", "fgw"])
def test_kt_decreases_when_matching_is_possible(mode: str) -> None:
    # acoustic frames are a hidden linear image of the tokens, each token held for 3 frames;
    # a learnable linear adapter can undo it, so the transfer loss must fall.
    g = torch.Generator().manual_seed(8)
    d = 8
    z = torch.randn(4, 5, d, generator=g)
    m_len = torch.tensor([5, 4, 5, 3])
    frames = z.repeat_interleave(3, dim=1)  # (4, 15, d)
    n_len = m_len * 3
    mix = torch.randn(d, d, generator=g)
    x = frames @ mix + 0.05 * torch.randn(4, 15, d, generator=g)
    adapter = torch.nn.Linear(d, d)
    loss = GMOTLoss(GMOTConfig(mode=mode, standardise=False, structure="hybrid", epsilon=0.05))
    opt = torch.optim.Adam(adapter.parameters(), lr=0.05)
    values = []
    for _ in range(40):
        out = loss(adapter(x), n_len, z, m_len)
        opt.zero_grad()
        out["kt"].backward()
        opt.step()
        values.append(out["kt"].item())
    assert values[-1] < 0.5 * values[0]
    assert sum(values[-5:]) < sum(values[:5])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        GMOTConfig(alpha=1.5)
    with pytest.raises(ValueError, match="unknown gmot config keys"):
        GMOTConfig.from_dict({"alhpa": 0.1})
    assert GMOTConfig.from_dict(GMOTConfig(mode="wd").to_dict()) == GMOTConfig(mode="wd")


@pytest.mark.parametrize("align_loss", ["cosine", "mse"])
def test_kt_by_hand_on_two_frames_and_three_tokens(align_loss: str) -> None:
    """Mode wd on N = 2 frames and M = 3 tokens, computed here in float64 without the loss's code: teacher
    tokens standardised and centred, the cosine cost plus the order prior, a plain Sinkhorn plan, the
    transport value and the alignment loss against the transported frames."""
    mean, std = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])
    plm = torch.tensor([[[5.0, 1.0], [1.0, 2.0], [3.0, 0.0]]])
    # standardised: (2, 1), (0, 2), (1, 0), whose mean is (1, 1); centred:
    z = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    h = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = 1.0 / np.sqrt(2.0)
    cos = np.array([[1.0, -r, 0.0], [0.0, r, -1.0]])  # cos(h_i, z_j)
    # |(i + 1/2)/N - (j + 1/2)/M|: frames at 1/4, 3/4, tokens at 1/6, 1/2, 5/6
    prior = np.array([[1 / 12, 1 / 4, 7 / 12], [7 / 12, 1 / 4, 1 / 12]])
    tot_weight, epsilon = 0.5, 0.1
    cost = 1.0 - cos + tot_weight * prior
    a, b = np.full(2, 1 / 2), np.full(3, 1 / 3)
    kernel, v = np.exp(-cost / epsilon), np.ones(3)
    for _ in range(2000):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    plan = u[:, None] * kernel * v[None, :]
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-12)  # converged
    kt_ot = float((plan * cost).sum())
    moved = plan.T @ h / b[:, None]  # h~_j = sum_i T_ij h_i / b_j
    if align_loss == "cosine":
        per_token = 1.0 - (moved * z).sum(1) / np.linalg.norm(moved, axis=1) / np.linalg.norm(z, axis=1)
    else:
        per_token = ((moved - z) ** 2).mean(1)
    kt_align = float(per_token.mean())

    cfg = GMOTConfig(mode="wd", epsilon=epsilon, tot_weight=tot_weight, outer_iter=20, inner_iter=50,
                     align_loss=align_loss)  # fmt: skip
    loss = GMOTLoss(cfg, mean, std)
    n_len, m_len = torch.tensor([2]), torch.tensor([3])
    b_mask = torch.ones(1, 3, dtype=torch.bool)
    assert np.allclose(loss.teacher_features(plm, b_mask)[0].numpy(), z)
    assert np.allclose(order_prior(torch.ones(1, 2, dtype=torch.bool), b_mask)[0].numpy(), prior)
    out = loss(torch.tensor(h[None], dtype=torch.float32), n_len, plm, m_len)
    np.testing.assert_allclose(out["plan"][0].numpy(), plan, atol=1e-6)
    assert out["kt_ot"].item() == pytest.approx(kt_ot, abs=1e-5)
    assert out["kt_align"].item() == pytest.approx(kt_align, abs=1e-5)
    assert out["kt"].item() == pytest.approx(kt_ot + kt_align, abs=1e-5)
    # reduction "sum": per utterance times its 3 tokens
    summed = GMOTLoss(dataclasses.replace(cfg, reduction="sum"), mean, std)
    out = summed(torch.tensor(h[None], dtype=torch.float32), n_len, plm, m_len)
    assert out["kt"].item() == pytest.approx(3 * (kt_ot + kt_align), abs=1e-4)
