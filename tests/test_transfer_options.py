"""The options that make the transfer align and matter: unbalanced transport, teacher centring, relative
epsilon, summed reduction, non-blank marginals, the CTC head on the adapter, the kt ramp, and the
diagnostics that show whether a plan aligns (models.engine.diagnostics)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from models.engine import diagnostics
from models.engine.config import ConfigError, TrainConfig, resolve_config
from models.engine.schedule import kt_weight_at
from models.engine.training import train
from models.nn.encoder import ConformerCTC, ModelConfig
from models.nn.transfer_loss import GMOTConfig, GMOTLoss, plan_entropy_ratio
from models.ot import transport, unbalanced
from models.ot.problem import cost_spread


def _marginal(rng: torch.Generator, *shape: int) -> torch.Tensor:
    w = torch.rand(*shape, generator=rng, dtype=torch.float64) + 0.1
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("taus", [(1.0, None), (0.5, 2.0), (0.05, None)])
def test_unbalanced_sinkhorn_matches_pot(taus: tuple[float, float | None]) -> None:
    rng = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 7, 5, generator=rng, dtype=torch.float64)
    a, b = _marginal(rng, 3, 7), _marginal(rng, 3, 5)
    tau_a, tau_b = taus
    res = unbalanced.unbalanced_fused_gromov_wasserstein(
        cost, None, None, a, b, 0.0, 0.1, tau_a=tau_a, tau_b=tau_b, outer_iter=50, inner_iter=40
    )
    for i in range(3):
        reg_m = (tau_a, tau_b if tau_b is not None else 1e12)  # POT has no exact side: a huge tau instead
        ref = ot.unbalanced.sinkhorn_unbalanced(
            a[i].numpy(), b[i].numpy(), cost[i].numpy(), 0.1, reg_m, numItermax=5000, stopThr=1e-15
        )
        np.testing.assert_allclose(res.plan[i].numpy(), ref, atol=1e-8)
    if tau_b is None:  # the token side stays exact, the acoustic side does not
        torch.testing.assert_close(res.plan.sum(1), b)
        assert float((res.plan.sum(2) - a).abs().max()) > 1e-3


def test_unbalanced_with_a_huge_tau_is_the_balanced_fgw() -> None:
    rng = torch.Generator().manual_seed(1)
    cost = torch.rand(2, 6, 4, generator=rng, dtype=torch.float64)
    sa = torch.rand(2, 6, 6, generator=rng, dtype=torch.float64)
    sb = torch.rand(2, 4, 4, generator=rng, dtype=torch.float64)
    sa, sb = sa + sa.mT, sb + sb.mT
    a, b = _marginal(rng, 2, 6), _marginal(rng, 2, 4)
    relaxed = unbalanced.unbalanced_fused_gromov_wasserstein(
        cost, sa, sb, a, b, 0.5, 0.1, tau_a=1e8, outer_iter=10, inner_iter=60
    )
    exact = transport.fused_gromov_wasserstein(cost, sa, sb, a, b, 0.5, 0.1, outer_iter=10, inner_iter=60)
    torch.testing.assert_close(relaxed.plan, exact.plan, atol=1e-7, rtol=0)
    torch.testing.assert_close(relaxed.transport_cost, exact.transport_cost, atol=1e-7, rtol=0)


def test_unbalanced_padding_is_exactly_zero_with_zero_gradient() -> None:
    rng = torch.Generator().manual_seed(2)
    cost = torch.rand(2, 6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    a = torch.zeros(2, 6, dtype=torch.float64)
    a[0, :4], a[1] = 0.25, 1 / 6
    b = torch.zeros(2, 5, dtype=torch.float64)
    b[0, :3], b[1] = 1 / 3, 0.2
    res = unbalanced.unbalanced_fused_gromov_wasserstein(cost, None, None, a, b, 0.0, 0.1, tau_a=0.5)
    assert float(res.plan[0, 4:].abs().max()) == 0.0 and float(res.plan[0, :, 3:].abs().max()) == 0.0
    res.value.sum().backward()
    assert float(cost.grad[0, 4:].abs().max()) == 0.0 and float(cost.grad[0, :, 3:].abs().max()) == 0.0
    alone = unbalanced.unbalanced_fused_gromov_wasserstein(
        cost[:1, :4, :3].detach(), None, None, a[:1, :4], b[:1, :3], 0.0, 0.1, tau_a=0.5
    )
    torch.testing.assert_close(res.plan[0, :4, :3], alone.plan[0])


def test_unbalanced_rejects_bad_tau() -> None:
    with pytest.raises(ValueError, match="tau_a"):
        unbalanced.unbalanced_fused_gromov_wasserstein(torch.rand(1, 3, 2), None, None, tau_a=-1.0)


def _batch(seed: int = 0, b: int = 3, n: int = 12, m: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g)
    z = torch.randn(b, m, d, generator=g) + 2.0  # a shared offset: what centring removes
    return h, torch.tensor([n, n - 3, n - 5]), z, torch.tensor([m, m - 1, m - 2])


def test_centring_removes_each_utterances_mean_token() -> None:
    _, _, z, zl = _batch()
    loss = GMOTLoss(GMOTConfig(standardise=False, centre=True))
    mask = torch.arange(z.shape[1])[None] < zl[:, None]
    out = loss.teacher_features(z, mask)
    for k in range(3):
        torch.testing.assert_close(out[k, : zl[k]].mean(0), torch.zeros(z.shape[-1]), atol=1e-6, rtol=0)
        assert float(out[k, zl[k] :].abs().sum()) == 0.0
    plain = GMOTLoss(GMOTConfig(standardise=False, centre=False)).teacher_features(z, mask)
    assert float(plain[0].mean(0).abs().max()) > 1.0


def test_cost_std_epsilon_is_the_absolute_epsilon_times_the_spread() -> None:
    h, hl, z, zl = _batch(1)
    plain = {"standardise": False, "centre": False, "tot_weight": 0.0}
    rel = GMOTLoss(GMOTConfig(mode="wd", epsilon=0.5, epsilon_scale="cost_std", **plain))
    out_rel = rel(h, hl, z, zl)
    from models.ot import graphs

    am = torch.arange(h.shape[1])[None] < hl[:, None]
    bm = torch.arange(z.shape[1])[None] < zl[:, None]
    cost = graphs.cosine_cost(h, z, am, bm)
    spread = cost_spread(cost, am[:, :, None] & bm[:, None, :])
    for k in range(3):  # each item at its own absolute epsilon 0.5 * spread_k
        absolute = GMOTLoss(GMOTConfig(mode="wd", epsilon=0.5 * float(spread[k]), **plain))
        one = absolute(h[k : k + 1, : hl[k]], hl[k : k + 1], z[k : k + 1, : zl[k]], zl[k : k + 1])
        torch.testing.assert_close(out_rel["plan"][k, : hl[k], : zl[k]], one["plan"][0], atol=1e-5, rtol=0)


def test_sum_reduction_weighs_each_utterance_by_its_tokens() -> None:
    h, hl, z, zl = _batch(2)
    mean = GMOTLoss(GMOTConfig(standardise=False))(h, hl, z, zl)
    total = GMOTLoss(GMOTConfig(standardise=False, reduction="sum"))(h, hl, z, zl)
    assert float(total["kt"]) > 3.0 * float(mean["kt"])  # at least 3 tokens in every utterance
    per = []
    for k in range(3):
        one = GMOTLoss(GMOTConfig(standardise=False))(
            h[k : k + 1, : hl[k]], hl[k : k + 1], z[k : k + 1, : zl[k]], zl[k : k + 1]
        )
        per.append(float(one["kt"]) * int(zl[k]))
    assert math.isclose(float(total["kt"]), sum(per) / 3, rel_tol=1e-4)


def test_nonblank_marginal_follows_the_blank_probability() -> None:
    h, hl, z, zl = _batch(3)
    blank = torch.full(h.shape[:2], 0.99)
    blank[:, ::3] = 0.1  # every third frame is speech
    loss = GMOTLoss(
        GMOTConfig(mode="wd", standardise=False, acoustic_marginal="nonblank", marginal_floor=0.05)
    )
    plan = loss(h, hl, z, zl, blank_prob=blank)["plan"]
    rows = plan.sum(2)
    for k in range(3):
        w = (1 - blank[k, : hl[k]]).clamp(min=0.05)
        torch.testing.assert_close(rows[k, : hl[k]], w / w.sum(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="blank"):
        loss(h, hl, z, zl)


def test_unbalanced_option_frees_the_acoustic_marginal_in_the_loss() -> None:
    h, hl, z, zl = _batch(4)
    for mode in ("wd", "fgw"):
        out = GMOTLoss(GMOTConfig(mode=mode, standardise=False, unbalanced_tau=0.05))(h, hl, z, zl)
        rows = out["plan"].sum(2)
        assert float((rows[0] - 1 / int(hl[0])).abs().max()) > 1e-3
        torch.testing.assert_close(out["plan"].sum(1)[2, : zl[2]], torch.full((int(zl[2]),), 1 / int(zl[2])))
        assert torch.isfinite(out["kt"])


def test_plan_entropy_ratio_is_one_for_uniform_and_low_for_sharp_plans() -> None:
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    uniform = torch.full((1, 4, 4), 1 / 16)
    sharp = torch.eye(4)[None] / 4
    assert math.isclose(float(plan_entropy_ratio(uniform, valid)[0]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(plan_entropy_ratio(sharp, valid)[0]), 0.5, rel_tol=1e-6)  # log 4 / log 16


def test_gmot_config_rejects_unknown_choices() -> None:
    for bad in ({"reduction": "max"}, {"acoustic_marginal": "x"}, {"epsilon_scale": "y"},
                {"marginal_floor": 0.0}, {"unbalanced_tau": -1.0}):  # fmt: skip
        with pytest.raises(ValueError, match="gmot"):
            GMOTConfig(**bad)


# --- diagnostics -----------------------------------------------------------------------------------------


def _diagonal_plan(n: int, m: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    plan = np.zeros((n, m))
    spans = []
    step = n // m
    for j in range(m):
        plan[j * step : (j + 1) * step, j] = 1.0 / (step * m)
        spans.append((j * step, (j + 1) * step))
    return plan, spans


def test_score_plan_tells_aligned_reversed_and_uniform_plans_apart() -> None:
    plan, spans = _diagonal_plan(20, 5)
    aligned = diagnostics.score_plan(plan, spans)
    assert aligned["mass_in_span"] == pytest.approx(1.0)
    assert aligned["uniform_share"] == pytest.approx(0.2)
    assert aligned["lift"] == pytest.approx(5.0)
    assert aligned["order"] == pytest.approx(1.0)
    backwards = diagnostics.score_plan(plan[::-1], spans)
    assert backwards["order"] == pytest.approx(-1.0) and backwards["lift"] == pytest.approx(1.0)
    uniform = diagnostics.score_plan(np.full((20, 5), 1 / 100), spans)
    assert uniform["lift"] == pytest.approx(1.0) and uniform["entropy"] == pytest.approx(1.0)
    assert math.isnan(uniform["order"])  # every token at the same mean frame
    no_spans = diagnostics.score_plan(plan, None)
    assert math.isnan(no_spans["lift"]) and no_spans["order"] == pytest.approx(1.0)


def test_token_spans_from_pieces_and_character_frames() -> None:
    ranges = diagnostics.token_char_ranges(["\u2581我们", "学", "\u2581", "中文"], "我们学中文")
    assert ranges == [(0, 2), (2, 3), None, (3, 5)]
    chars = [(0, 2), (3, 4), (6, 7), (9, 12), (13, 14)]
    assert diagnostics.token_frame_spans(ranges, chars) == [(0, 4), (6, 7), None, (9, 14)]


def test_spearman_with_ties_and_short_inputs() -> None:
    assert diagnostics.spearman(np.arange(5.0), np.array([1.0, 2.0, 2.0, 3.0, 9.0])) > 0.9
    assert math.isnan(diagnostics.spearman(np.arange(2.0), np.arange(2.0)))
    assert diagnostics.spearman(np.arange(4.0), -np.arange(4.0)) == pytest.approx(-1.0)


def test_gradient_ratio_measures_the_relative_pull() -> None:
    h = torch.randn(4, 3, requires_grad=True)
    ratio = diagnostics.gradient_ratio(3.0 * (h**2).sum(), (h**2).sum(), h)
    assert ratio == pytest.approx(3.0)
    assert h.grad is None  # nothing accumulated into the parameters' gradients


# --- model and engine ---------------------------------------------------------------------------------------


def test_ctc_head_on_the_adapter() -> None:
    cfg = ModelConfig(d_model=16, num_heads=2, ffn_dim=32, num_layers=2, conv_kernel=3,
                      subsampling_channels=8, ctc_from="adapter")  # fmt: skip
    model = ConformerCTC(cfg, vocab_size=11, plm_width=24).eval()
    assert model.ctc_head.in_features == 24
    feats, lens = torch.randn(2, 40, 80), torch.tensor([40, 30])
    out = model(feats, lens)
    assert out["log_probs"].shape == (2, 9, 11)
    with torch.no_grad():  # the CTC output now depends on the adapter
        model.adapter.weight.mul_(2.0)
    assert not torch.allclose(model(feats, lens)["log_probs"], out["log_probs"])
    with pytest.raises(ValueError, match="PLM width"):
        ConformerCTC(cfg, vocab_size=11)
    with pytest.raises(ValueError, match="last block"):
        ModelConfig(num_layers=2, adapter_layer=0, ctc_from="adapter")


def test_kt_weight_ramps_linearly() -> None:
    t = TrainConfig(kt_weight=2.0, kt_warmup_steps=10)
    assert kt_weight_at(0, t, 1000) == pytest.approx(0.2)
    assert kt_weight_at(4, t, 1000) == pytest.approx(1.0)
    assert kt_weight_at(9, t, 1000) == pytest.approx(2.0) and kt_weight_at(500, t, 1000) == pytest.approx(2.0)
    assert kt_weight_at(0, TrainConfig(kt_weight=2.0), 1000) == 2.0


def test_kt_weight_decays_with_a_cosine_to_zero_at_the_last_step() -> None:
    t = TrainConfig(kt_weight=2.0, warmup_steps=10, kt_decay="cosine")
    # constant through the learning rate's warm-up, half at the middle of the rest, 0 at the last step
    assert kt_weight_at(0, t, 110) == pytest.approx(2.0) and kt_weight_at(9, t, 110) == pytest.approx(2.0)
    assert kt_weight_at(59, t, 110) == pytest.approx(1.0)
    assert kt_weight_at(109, t, 110) == pytest.approx(0.0, abs=1e-12)
    weights = [kt_weight_at(s, t, 110) for s in range(110)]
    assert all(a >= b for a, b in itertools.pairwise(weights))
    # the ramp still applies first: a ramp of 20 steps, step 4 is a quarter of the cosine-decayed weight
    ramped = TrainConfig(kt_weight=2.0, warmup_steps=10, kt_decay="cosine", kt_warmup_steps=20)
    assert kt_weight_at(4, ramped, 110) == pytest.approx(0.25 * kt_weight_at(4, t, 110))
    with pytest.raises(ConfigError, match="kt_decay"):
        resolve_config("tiny", overrides=["train.kt_decay=linear"])


@pytest.mark.slow
def test_distill_applies_the_decayed_transfer_weight(tiny_prepared: Path, tmp_path: Path) -> None:
    sets = ["train.max_utts=4", "train.epochs=2", "train.log_interval=1", "train.warmup_steps=2",
            "train.kt_decay=cosine", "train.kt_weight=2", "gmot.mode=fgw", "train.grad_ratio=false",
            "train.align_max_utts=0"]  # fmt: skip
    cfg = resolve_config("tiny", overrides=sets)
    train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train"]
    total = steps[-1]["step"]
    # loss = ctc + lambda * kt, logged per step: lambda is the schedule's value at that (0-based) step
    weights = [(r["loss"] - r["ctc"]) / r["kt"] for r in steps]
    want = [kt_weight_at(r["step"] - 1, cfg.train, total) for r in steps]
    assert weights == pytest.approx(want, abs=1e-4)
    assert want[0] == pytest.approx(2.0) and want[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_distill_logs_the_gradient_ratio_and_the_dev_plan_scores(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = resolve_config(
        "tiny",
        overrides=[
            "train.max_utts=4", "train.epochs=2", "train.log_interval=1", "gmot.mode=fgw", "gmot.centre=true",
            "gmot.reduction=sum", "gmot.acoustic_marginal=nonblank", "gmot.tot_weight=0.5",
            "model.ctc_from=adapter", "train.kt_warmup_steps=3",
        ],
    )  # fmt: skip
    train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train"]
    ratios = [r["grad_ratio"] for r in steps if "grad_ratio" in r]
    assert ratios and all(math.isfinite(x) and x > 0 for x in ratios)
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert len(epochs) == 2
    for e in epochs:
        assert 0.0 < e["align_entropy"] <= 1.0
        assert e["align_lift"] > 0 and -1.0 <= e["align_order"] <= 1.0
        assert e["grad_ratio"] > 0
    # the model decodes without the PLM, and its CTC head reads the adapter
    from models.engine.checkpoint import load_model

    loaded = load_model(tmp_path / "exp", device="cpu")
    assert loaded.model.cfg.ctc_from == "adapter" and loaded.model.adapter is not None
    # plot-alignment draws this model's plans with its own options (centred tokens, non-blank marginal)
    from data.store import read_manifest
    from models.tasks.alignment_plot import compute_alignment

    utt = read_manifest(tiny_prepared / "dev")[0].id
    data = compute_alignment(loaded, tiny_prepared, "dev", utt, ("wd", "fgw"))
    assert set(data.scores) == {"wd", "fgw"} and all(0 < s["entropy"] <= 1 for s in data.scores.values())
    m = data.struct_linguistic.shape[0]
    assert m == len(data.tokens) and data.plans["fgw"].shape[1] == m


@pytest.mark.slow
def test_pretrain_with_the_ctc_head_on_the_adapter_has_the_same_architecture(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    cfg = resolve_config("tiny", overrides=["train.max_utts=4", "train.epochs=1", "model.ctc_from=adapter",
                                             "gmot.mode=none"])  # fmt: skip
    train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    from models.engine.checkpoint import load_model

    loaded = load_model(tmp_path / "exp", device="cpu")
    assert loaded.model.ctc_head.in_features == 16  # the tiny PLM width


def test_alignment_warning_names_backwards_and_uniform_plans() -> None:
    assert "backwards" in diagnostics.alignment_warning({"align_lift": 2.0, "align_order": -0.6}, 0.0)
    assert "raise gmot.tot_weight" in diagnostics.alignment_warning(
        {"align_lift": 2.0, "align_order": -0.6}, 0.5
    )
    assert "align nothing" in diagnostics.alignment_warning({"align_lift": 1.02, "align_order": 0.1}, 0.0)
    assert diagnostics.alignment_warning({"align_lift": 2.5, "align_order": 0.9}, 0.5) is None
    assert diagnostics.alignment_warning({}, 0.0) is None


def test_checkpoint_configs_from_before_centring_load_with_it_off() -> None:
    assert GMOTConfig().centre is True and GMOTConfig().tot_weight == 0.5  # the study's defaults
    old = {k: v for k, v in GMOTConfig().to_dict().items() if k not in ("centre",)}
    assert GMOTConfig.from_dict(old).centre is False
    assert GMOTConfig.from_dict({**old, "centre": True}).centre is True


def test_configs_from_before_the_start_choice_keep_warm_projections() -> None:
    """Runs saved before `gmot.start` existed (the transfer study's) resume with the warm starts they used;
    new runs get the solver's default."""
    assert GMOTConfig().start == "auto"
    old = {k: v for k, v in GMOTConfig().to_dict().items() if k != "start"}
    assert GMOTConfig.from_dict(old).start == "warm"
    with pytest.raises(ValueError, match=r"gmot\.start"):
        GMOTConfig(start="hot")


def test_the_start_reaches_the_solver() -> None:
    """Warm and cold starts give different plans at a small budget, through the loss."""
    torch.manual_seed(0)
    h, z = torch.randn(2, 30, 16), torch.randn(2, 6, 16)
    a_len, b_len = torch.tensor([30, 25]), torch.tensor([6, 4])
    plans = {}
    for start in ("warm", "cold"):
        cfg = GMOTConfig(
            start=start, epsilon=0.01, inner_iter=3, centre=False, tot_weight=0.0, standardise=False
        )
        loss = GMOTLoss(cfg)
        plans[start] = loss(h, a_len, z, b_len)["plan"]
    assert not torch.allclose(plans["warm"], plans["cold"])
