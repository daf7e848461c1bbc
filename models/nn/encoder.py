"""Conformer-CTC acoustic encoder: conv2d subsampling (x4 or x8), sinusoidal positions, conformer blocks, CTC
head and an optional adapter into the PLM's width for knowledge transfer.

The conformer blocks are `torchaudio.models.conformer.ConformerLayer` modules (their parameters and layout),
but this module runs their forward pass itself for two reasons:

- an intermediate block's output is needed for the adapter (`ModelConfig.adapter_layer`);
- torchaudio's convolution module does not mask padding, so in a padded batch the depthwise convolution
  of the last valid frames would read the (non-zero) values computed at padded frames. Here the input of
  the depthwise convolution is zeroed at padded frames, so a valid frame's output is the same whether the
  utterance is alone or in a padded batch (exactly so in eval mode; in training mode BatchNorm statistics
  are batch statistics, as in every conformer with BatchNorm).

Positional information: torchaudio's conformer has none (plain multi-head attention), so absolute
sinusoidal positions (Vaswani et al. 2017) are added after the subsampling, scaled as in ESPnet/WeNet
(x * sqrt(d_model) + PE). They are computed on the fly for any length.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchaudio.models.conformer import ConformerLayer

SUBSAMPLING_CONVS: dict[int, int] = {4: 2, 8: 3}
"""Number of 3x3 stride-2 convolutions of each supported subsampling factor."""


def min_input_frames(subsampling: int = 4) -> int:
    """The shortest input (10 ms frames) leaving one frame after the front end: 7 for x4, 15 for x8."""
    return 2 ** (SUBSAMPLING_CONVS[subsampling] + 1) - 1


KERNEL_OPTIONS = ("cpu_attention",)
"""ModelConfig fields that choose how the model is computed, not what it is: a checkpoint made under another
value (or before the field existed) loads and resumes."""


@dataclass
class ModelConfig:
    """Hyper-parameters of `ConformerCTC` (saved as a dict under config["model"] in every checkpoint)."""

    input_dim: int = 80
    """Acoustic feature dimension (80-dim Kaldi fbank after global CMVN)."""
    d_model: int = 256
    """Width of the conformer (attention dimension); also the width of `hidden`."""
    num_heads: int = 4
    """Attention heads per conformer block; must divide d_model."""
    ffn_dim: int = 2048
    """Hidden width of each of the two macaron feed-forward modules of a block."""
    num_layers: int = 12
    """Number of conformer blocks."""
    conv_kernel: int = 15
    """Kernel size of the depthwise convolution in each block (odd)."""
    dropout: float = 0.1
    """Dropout in the blocks, after the positional encoding and before the CTC head (an adapter on the last
    block shares the CTC head's draw; one on an earlier block reads that block unchanged)."""
    subsampling_channels: int = 256
    """Channels of the stride-2 3x3 Conv2d layers of the subsampling front end."""
    subsampling: int = 4
    """Time reduction of the front end: 4 (two stride-2 convolutions, 40 ms frames) or 8 (three, 80 ms frames;
    about half the encoder cost, enough frames for Mandarin characters at normal speaking rates)."""
    adapter_layer: int = -1
    """Which conformer block's output feeds the adapter and is returned as `hidden`: a Python index into
    the blocks (0 = first block, -1 = last, -2 = second to last ...)."""
    adapter: Literal["linear", "mlp"] = "linear"
    """Adapter from d_model to the PLM width: "linear" (one Linear) or "mlp" (Linear, GELU, Linear)."""
    adapter_hidden: int = 512
    """Hidden width of the "mlp" adapter (unused by "linear")."""
    ctc_from: Literal["encoder", "adapter"] = "encoder"
    """What the CTC head reads: "encoder", the last block's output (the adapter serves only the transfer
    loss and is dropped at decode time), or "adapter", the adapted features in the PLM's width, the space the
    transfer shapes (arXiv 2309.13650). "adapter" needs the adapter on the last block and keeps it at decode
    time: one extra (d_model x PLM width) matrix product per frame, and a CTC head of PLM width."""
    cpu_attention: Literal["math", "auto"] = "math"
    """Which kernel computes self-attention on a CPU: "math" (matrix products and a softmax) or "auto"
    (torch's choice, its flash-attention kernel). At these models' short subsampled sequences "math" is
    faster: the demo model's forward and backward on a 12,000-frame batch took 380 ms against 495 ms (bf16,
    1 thread, an Intel Xeon). The two round differently (differences near the last bit of bf16); "auto"
    reproduces, on a CPU that computes in bf16, runs made before this option existed. GPUs always use
    torch's choice."""

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.conv_kernel % 2 != 1:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        if not -self.num_layers <= self.adapter_layer < self.num_layers:
            raise ValueError(
                f"adapter_layer {self.adapter_layer} is out of range for {self.num_layers} conformer blocks "
                f"(use 0..{self.num_layers - 1} or -1..-{self.num_layers})"
            )
        if self.adapter not in ("linear", "mlp"):
            raise ValueError(f"adapter must be 'linear' or 'mlp', got {self.adapter!r}")
        if self.cpu_attention not in ("math", "auto"):
            raise ValueError(f"cpu_attention must be 'math' or 'auto', got {self.cpu_attention!r}")
        if self.ctc_from not in ("encoder", "adapter"):
            raise ValueError(f"ctc_from must be 'encoder' or 'adapter', got {self.ctc_from!r}")
        if self.ctc_from == "adapter" and self.adapter_layer % self.num_layers != self.num_layers - 1:
            raise ValueError(
                f"ctc_from 'adapter' needs the adapter on the last block (adapter_layer -1), got "
                f"adapter_layer {self.adapter_layer}"
            )
        if self.subsampling not in SUBSAMPLING_CONVS:
            raise ValueError(f"subsampling must be 4 or 8, got {self.subsampling}")
        if self.input_dim < min_input_frames(self.subsampling):
            raise ValueError(
                f"input_dim must be at least {min_input_frames(self.subsampling)} for the "
                f"x{self.subsampling} subsampling, got {self.input_dim}"
            )

    @property
    def min_input_frames(self) -> int:
        """The shortest input (in 10 ms frames) that leaves one output frame after the subsampling."""
        return min_input_frames(self.subsampling)

    @property
    def adapter_block(self) -> int:
        """The non-negative index of the block feeding the adapter."""
        return self.adapter_layer % self.num_layers

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (weights_only-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict of fields; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # About 3 M parameters with a ~1,800-character vocabulary; trains in minutes on 2 CPU cores. x8
    # subsampling: on the demo corpus an epoch took 153 s instead of 216-224 s (1 thread, same shared
    # machine), with a lower dev CER at each epoch compared (x8 0.917 / 0.628 vs x4 0.926 / 0.645).
    # No dropout: in 12-14 CPU epochs the model underfits for most of the run, and dropout's random masks
    # cost about a quarter of a bf16 training step on the CPU (dev CER per epoch was no worse without it).
    "demo": ModelConfig(
        d_model=144, num_heads=4, ffn_dim=576, num_layers=6, conv_kernel=15, dropout=0.0,
        subsampling_channels=64, subsampling=8, adapter_hidden=256,
    ),
    # Close to the AISHELL-1 conformer-CTC of the paper line (docs/design.md section 3).
    "aishell1": ModelConfig(
        d_model=256, num_heads=4, ffn_dim=2048, num_layers=12, conv_kernel=15, dropout=0.1,
        subsampling_channels=256, adapter_hidden=512,
    ),
    # For tests only: a few tens of thousands of parameters.
    "tiny": ModelConfig(
        d_model=32, num_heads=2, ffn_dim=64, num_layers=2, conv_kernel=3, dropout=0.0,
        subsampling_channels=8, adapter_hidden=32,
    ),
}  # fmt: skip


def subsampled_lengths(lengths: Tensor, subsampling: int = 4) -> Tensor:
    """Exact output lengths of the front end (3x3 stride-2 convolutions, no padding), each T -> (T - 1) // 2.

    lengths (B,) int -> (B,) int; x4: T -> ((T - 1) // 2 - 1) // 2.
    """
    for _ in range(SUBSAMPLING_CONVS[subsampling]):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor")
    return lengths


MIN_INPUT_FRAMES = min_input_frames(4)
"""The shortest input (in 10 ms frames) that leaves one frame after the x4 subsampling."""


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True at valid positions."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sinusoidal position table (length, dim): sin on even, cos on odd channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


def _channels_last(weight: Tensor) -> Tensor:
    """A conv weight (C_out, C_in, kH, kW) with channels-last strides, its gradient in the weight's own
    layout. With one input channel both layouts hold the same memory, and only the strides tell oneDNN which
    to use: a strided view sets them without a copy (a copy's gradient would come back in the copy's strides,
    which DDP's gradient buckets warn about)."""
    if weight.shape[1] == 1:
        kh, kw = weight.shape[2:]
        return weight.as_strided(weight.shape, (kh * kw, 1, kw, 1))
    return weight.contiguous(memory_format=torch.channels_last)


class Conv2dSubsampling(nn.Module):
    """3x3 stride-2 Conv2d + ReLU (two for x4, three for x8), then a Linear to d_model:
    (B, T, F) -> (B, T', d_model).

    The convolutions run with a channels-last copy of their weights, so their outputs are channels-last too:
    on a CPU, oneDNN then runs them without converting every activation between layouts, which took the demo
    model's forward and backward on a 12,000-frame batch from about 585 to 500 ms (bf16, 1 thread, an Intel
    Xeon). The parameters themselves and their gradients keep the default layout (checkpoints, optimiser
    state and gradient norms are as before). In bf16 the outputs and gradients are bitwise those of the
    default layout (tested; a demo epoch's weights are equal); in fp32 oneDNN sums in another order
    (differences near 1e-7).
    """

    def __init__(self, input_dim: int, channels: int, d_model: int, subsampling: int = 4) -> None:
        super().__init__()
        self.subsampling = subsampling
        layers: list[nn.Module] = []
        freq = input_dim
        for i in range(SUBSAMPLING_CONVS[subsampling]):
            layers += [nn.Conv2d(1 if i == 0 else channels, channels, 3, stride=2), nn.ReLU()]
            freq = (freq - 1) // 2
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, F), lengths (B,) -> ((B, T', d_model), (B,) output lengths)."""
        y = x.unsqueeze(1)
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d):
                y = F.conv2d(y, _channels_last(layer.weight), layer.bias, layer.stride)
            else:
                y = layer(y)  # (B, C, T', F'), channels-last
        b, c, t, f = y.shape
        y = self.out(y.transpose(1, 2).reshape(b, t, c * f))
        return y, subsampled_lengths(lengths, self.subsampling)


def _conv_module_forward(module: nn.Module, x: Tensor, pad: Tensor) -> Tensor:
    """torchaudio's _ConvolutionModule with the depthwise input zeroed at padded frames.

    x (B, T, D), pad (B, T, 1) bool True at padding -> (B, T, D).
    """
    seq = module.sequential
    y = module.layer_norm(x).transpose(1, 2)  # (B, D, T)
    y = seq[1](seq[0](y))  # pointwise conv, GLU
    y = y.masked_fill(pad.transpose(1, 2), 0.0)
    for sub in list(seq)[2:]:  # depthwise conv, norm, SiLU, pointwise conv, dropout
        y = sub(y)
    return y.transpose(1, 2)


def _block_forward(layer: ConformerLayer, x: Tensor, key_padding_mask: Tensor, pad: Tensor) -> Tensor:
    """One conformer block, batch first: x (B, T, D) -> (B, T, D) (same order as torchaudio's layer)."""
    x = x + 0.5 * layer.ffn1(x)
    if layer.convolution_first:
        x = x + _conv_module_forward(layer.conv_module, x, pad)
    y = layer.self_attn_layer_norm(x).transpose(0, 1)  # (T, B, D)
    y, _ = layer.self_attn(y, y, y, key_padding_mask=key_padding_mask, need_weights=False)
    x = x + layer.self_attn_dropout(y.transpose(0, 1))
    if not layer.convolution_first:
        x = x + _conv_module_forward(layer.conv_module, x, pad)
    x = x + 0.5 * layer.ffn2(x)
    return layer.final_layer_norm(x)


class ConformerCTC(nn.Module):
    """Conformer encoder with a CTC head over `vocab_size` units and, when `plm_width` is given, an adapter
    from block `cfg.adapter_layer` into the PLM's width (used only by the knowledge-transfer loss).

    `check_lengths` (default True): `forward` refuses inputs shorter than cfg.min_input_frames, which reads
    the lengths on the host (a device synchronisation on a GPU); the training engine, whose batches hold
    no such inputs, turns it off.
    """

    check_lengths: bool = True

    def __init__(self, cfg: ModelConfig, vocab_size: int, plm_width: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.plm_width = plm_width
        self.subsampling = Conv2dSubsampling(
            cfg.input_dim, cfg.subsampling_channels, cfg.d_model, cfg.subsampling
        )
        self.pos_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.conv_kernel, dropout=cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.head_dropout = nn.Dropout(cfg.dropout)
        if cfg.ctc_from == "adapter" and plm_width is None:
            raise ValueError("model.ctc_from 'adapter' needs the PLM width (prepared data with a PLM cache)")
        self.ctc_head = nn.Linear(cfg.d_model if cfg.ctc_from == "encoder" else plm_width, vocab_size)
        self.adapter: nn.Module | None = None
        if plm_width is not None:
            if cfg.adapter == "linear":
                self.adapter = nn.Linear(cfg.d_model, plm_width)
            else:
                hid = cfg.adapter_hidden
                self.adapter = nn.Sequential(
                    nn.Linear(cfg.d_model, hid), nn.GELU(), nn.Linear(hid, plm_width)
                )

    def forward(self, feats: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """feats (B, T, input_dim) after CMVN, lengths (B,) int ->
        {"log_probs": (B, T', V) float32 log-softmax, "lengths": (B,) int64 valid output frames,
         "hidden": (B, T', d_model) output of block cfg.adapter_layer (0 at padded frames),
         "adapted": (B, T', plm_width) adapter output (only when the model has an adapter)}.
        T' = subsampled_lengths(T, cfg.subsampling). Every length must be >= cfg.min_input_frames.
        """
        if feats.dim() != 3 or feats.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"feats must be (B, T, {self.cfg.input_dim}), got {tuple(feats.shape)}")
        shortest = self.cfg.min_input_frames
        if feats.shape[1] < shortest or (self.check_lengths and bool((lengths < shortest).any())):
            raise ValueError(
                f"every utterance needs at least {shortest} frames for the x{self.cfg.subsampling} "
                f"subsampling; got lengths {lengths.tolist()} with padded length {feats.shape[1]}"
            )
        return self.forward_unchecked(feats, lengths)

    def forward_unchecked(self, feats: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """`forward` without its input checks (which read tensor values on the host): the graph that ONNX
        export traces. Inputs shorter than cfg.min_input_frames give undefined outputs here."""
        x, out_lengths = self.subsampling(feats, lengths)
        out_lengths = out_lengths.to(torch.long)
        t = x.shape[1]
        valid = lengths_to_mask(out_lengths, t)  # (B, T')
        pad = ~valid
        pad3 = pad.unsqueeze(-1)
        x = x * math.sqrt(self.cfg.d_model) + sinusoidal_positions(t, self.cfg.d_model, x.device, x.dtype)
        x = self.pos_dropout(x).masked_fill(pad3, 0.0)
        hidden = x
        math_kernel = self.cfg.cpu_attention == "math" and x.device.type == "cpu"
        with sdpa_kernel([SDPBackend.MATH]) if math_kernel else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                x = _block_forward(layer, x, pad, pad3).masked_fill(pad3, 0.0)
                if i == self.cfg.adapter_block:
                    hidden = x
        # One dropout draw, the one the baseline makes: the adapter reads the CTC head's dropped input when it
        # sits on the last block, and an intermediate block's output as it is, so that adding the adapter
        # changes no random draw of the model without it (a transfer of weight 0 is then the baseline).
        dropped = self.head_dropout(x)
        adapted = None
        if self.adapter is not None:
            last = self.cfg.adapter_block == self.cfg.num_layers - 1
            adapted = self.adapter(dropped if last else hidden).masked_fill(pad3, 0.0)
        if self.cfg.ctc_from == "adapter":
            assert adapted is not None
            logits = self.ctc_head(adapted)
        else:
            logits = self.ctc_head(dropped)
        out = {
            "log_probs": torch.log_softmax(logits.float(), dim=-1),
            "lengths": out_lengths,
            "hidden": hidden,
        }
        if adapted is not None:
            out["adapted"] = adapted
        return out


def build_model(
    cfg: ModelConfig | dict[str, Any], vocab_size: int, plm_width: int | None = None
) -> ConformerCTC:
    """Build a ConformerCTC from a ModelConfig or a dict of its fields."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return ConformerCTC(cfg, vocab_size, plm_width)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
