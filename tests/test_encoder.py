"""ConformerCTC: output shapes and lengths, padding invariance, presets, adapter layer selection."""

import pytest
import torch

from models.nn.encoder import (
    MIN_INPUT_FRAMES,
    PRESETS,
    ConformerCTC,
    Conv2dSubsampling,
    ModelConfig,
    count_parameters,
    subsampled_lengths,
)

torch.set_num_threads(1)


def _tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**PRESETS["tiny"].to_dict(), **overrides})


def test_subsampled_lengths_match_the_convolutions() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, stride=2), torch.nn.Conv2d(1, 1, 3, stride=2))
    for t in range(MIN_INPUT_FRAMES, 60):
        out = conv(torch.zeros(1, 1, t, 80)).shape[2]
        assert int(subsampled_lengths(torch.tensor([t]))[0]) == out


def test_shapes_and_lengths_of_a_ragged_batch() -> None:
    torch.manual_seed(0)
    model = ConformerCTC(_tiny(), vocab_size=23, plm_width=16).eval()
    lengths = torch.tensor([61, 40, 7])
    out = model(torch.randn(3, 61, 80), lengths)
    assert out["lengths"].tolist() == [14, 9, 1]
    assert out["log_probs"].shape == (3, 14, 23)
    assert out["hidden"].shape == (3, 14, 32)
    assert out["adapted"].shape == (3, 14, 16)
    assert torch.allclose(out["log_probs"].exp().sum(-1), torch.ones(3, 14), atol=1e-5)
    # padded frames of hidden / adapted are exactly zero
    assert out["hidden"][1, 9:].abs().max() == 0 and out["adapted"][2, 1:].abs().max() == 0
    assert "adapted" not in ConformerCTC(_tiny(), vocab_size=23)(torch.randn(1, 20, 80), torch.tensor([20]))


def test_padding_does_not_change_valid_outputs() -> None:
    torch.manual_seed(1)
    model = ConformerCTC(_tiny(conv_kernel=5, num_layers=3), vocab_size=11, plm_width=8).eval()
    lengths = torch.tensor([80, 45, 23])
    feats = torch.randn(3, 80, 80)
    batch = model(feats, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model(feats[i : i + 1, :n], lengths[i : i + 1])
        m = int(alone["lengths"][0])
        assert m == int(batch["lengths"][i])
        for key in ("log_probs", "hidden", "adapted"):
            assert torch.allclose(alone[key][0], batch[key][i, :m], atol=1e-5), (key, i)
    # garbage written into the padding must not matter either
    noisy = feats.clone()
    noisy[1, 45:] = 1e3
    assert torch.allclose(model(noisy, lengths)["log_probs"][1, :9], batch["log_probs"][1, :9], atol=1e-5)


def test_too_short_input_is_a_clear_error() -> None:
    model = ConformerCTC(_tiny(), vocab_size=5)
    with pytest.raises(ValueError, match="at least 7 frames"):
        model(torch.randn(2, 20, 80), torch.tensor([20, 6]))


def test_demo_preset_has_a_few_million_parameters() -> None:
    n = count_parameters(ConformerCTC(PRESETS["demo"], vocab_size=1800, plm_width=384))
    assert 2_000_000 <= n <= 5_000_000
    a = PRESETS["aishell1"]
    assert (a.num_layers, a.d_model, a.num_heads, a.ffn_dim, a.conv_kernel) == (12, 256, 4, 2048, 15)
    assert count_parameters(ConformerCTC(PRESETS["tiny"], vocab_size=30)) < 200_000


def test_adapter_layer_selects_the_block_output() -> None:
    torch.manual_seed(2)
    feats, lengths = torch.randn(2, 40, 80), torch.tensor([40, 30])
    last = ConformerCTC(_tiny(num_layers=3, adapter_layer=-1), 9, plm_width=8).eval()
    first = ConformerCTC(_tiny(num_layers=3, adapter_layer=0), 9, plm_width=8).eval()
    first.load_state_dict(last.state_dict())
    out_last, out_first = last(feats, lengths), first(feats, lengths)
    assert torch.equal(out_last["log_probs"], out_first["log_probs"])  # the CTC path is unchanged
    assert not torch.allclose(out_last["hidden"], out_first["hidden"])
    # a negative index names the same block as its positive twin
    also_first = ConformerCTC(_tiny(num_layers=3, adapter_layer=-3), 9, plm_width=8).eval()
    also_first.load_state_dict(last.state_dict())
    assert torch.equal(also_first(feats, lengths)["hidden"], out_first["hidden"])
    # the adapter gets gradient only through the chosen block
    out = first(feats, lengths)
    out["adapted"].sum().backward()
    assert first.layers[2].ffn1.sequential[1].weight.grad is None
    assert first.layers[0].ffn1.sequential[1].weight.grad is not None


def test_mlp_adapter_and_config_validation() -> None:
    model = ConformerCTC(_tiny(adapter="mlp", adapter_hidden=24), 9, plm_width=12)
    assert model(torch.randn(1, 30, 80), torch.tensor([30]))["adapted"].shape == (1, 6, 12)
    with pytest.raises(ValueError, match="adapter_layer 2 is out of range"):
        _tiny(adapter_layer=2)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"d_model": 64, "n_layers": 3})
    assert ModelConfig.from_dict(PRESETS["demo"].to_dict()) == PRESETS["demo"]


def test_x8_subsampling_lengths_minimum_and_model_output() -> None:
    conv = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, stride=2) for _ in range(3)])
    for t in range(15, 90):
        assert int(subsampled_lengths(torch.tensor([t]), 8)[0]) == conv(torch.zeros(1, 1, t, 80)).shape[2]
    cfg = _tiny(subsampling=8)
    assert cfg.min_input_frames == 15 and _tiny().min_input_frames == MIN_INPUT_FRAMES == 7
    model = ConformerCTC(cfg, vocab_size=11).eval()
    out = model(torch.randn(2, 83, 80), torch.tensor([83, 15]))
    assert out["lengths"].tolist() == [9, 1] and out["log_probs"].shape == (2, 9, 11)
    with pytest.raises(ValueError, match="at least 15 frames for the x8"):
        model(torch.randn(1, 14, 80), torch.tensor([14]))
    with pytest.raises(ValueError, match="subsampling must be 4 or 8"):
        _tiny(subsampling=6)


@pytest.mark.parametrize("bf16", [False, True])
def test_channels_last_subsampling_computes_what_the_default_layout_does(bf16: bool) -> None:
    from models.engine.precision import cpu_has_native_bf16

    if bf16 and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16, where the bitwise claim is made")
    torch.manual_seed(0)
    sub = Conv2dSubsampling(80, 16, 32, 8)
    x, lengths = torch.randn(3, 120, 80), torch.tensor([120, 100, 64])

    def default_layout(x: torch.Tensor) -> torch.Tensor:  # the plain modules, every tensor NCHW
        y = sub.conv(x.unsqueeze(1))
        b, c, t, f = y.shape
        return sub.out(y.transpose(1, 2).reshape(b, t, c * f))

    outs, grads = [], []
    for forward in (lambda x: sub(x, lengths)[0], default_layout):
        sub.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward(x)
        y.float().square().sum().backward()
        outs.append(y.detach().float())
        grads.append([p.grad.clone() for p in sub.parameters()])
    # the parameters' gradients keep the parameters' strides (the 1-channel weight included, where both
    # layouts hold the same memory): their norms sum in the same order, DDP's buckets take them as they are
    assert all(p.grad.stride() == p.stride() for p in sub.parameters())
    if bf16:  # oneDNN's bf16 kernels sum in the same order in both layouts
        assert torch.equal(outs[0], outs[1])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cpu_attention_math_kernel_is_used_and_computes_what_torchs_choice_does() -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    feats, lengths = torch.randn(3, 200, 80), torch.tensor([200, 150, 90])
    outputs, flash_calls = {}, {}
    for kernel in ("math", "auto"):
        torch.manual_seed(1)
        model = ConformerCTC(_tiny(cpu_attention=kernel), 20).eval()
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            outputs[kernel] = model(feats, lengths)["log_probs"]
        flash_calls[kernel] = sum(e.count for e in prof.key_averages() if "flash_attention" in e.key)
    assert flash_calls["math"] == 0 and flash_calls["auto"] > 0
    torch.testing.assert_close(outputs["math"], outputs["auto"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cpu_attention must be"):
        _tiny(cpu_attention="fast")
