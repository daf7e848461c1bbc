"""Pictures of what the transport did for one utterance: the GM-OT plan between encoder frames and PLM tokens,
the acoustic / linguistic structure matrices, and the CTC forced alignment of the reference drawn over it.

`compute_alignment` gathers the numbers (model forward, PLM cache of the split, GMOTLoss plans for the asked
modes, structure matrices, torchaudio's CTC forced alignment); `draw_alignment` turns them into a matplotlib
figure (Agg backend, PNG / SVG / PDF by the file extension). PLM features are read from the split's PLM cache
and standardised with lang/plm.json exactly as in training (GMOTLoss does it).

Token labels need a font with CJK glyphs: `find_cjk_font` looks for a known one among the fonts matplotlib
sees (Debian: fonts-wqy-zenhei or fonts-noto-cjk). Without one, labels with characters the default font
lacks become their token index ("#3"), so the figure is still drawn and readable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data.store import ManifestEntry, PLMInfo, SplitReader, read_plm_info
from data.vocab import Vocabulary
from models.engine import diagnostics
from models.engine.checkpoint import LoadedModel
from models.nn.ctc import greedy_ctc
from models.tasks.decoding import padded_batch

if TYPE_CHECKING:  # matplotlib and the transfer's config are imported where they are used
    from matplotlib.figure import Figure

    from models.nn.transfer_loss import GMOTConfig

CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "AR PL UKai CN",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
)
PLAN_MODES = ("wd", "fgw")
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


class AlignmentPlotError(Exception):
    """Input that cannot be plotted (unknown utterance, no PLM cache, model without adapter ...)."""


@dataclass
class AlignmentData:
    """Everything drawn for one utterance. N encoder frames (after x4 subsampling), M PLM tokens.

    plans: mode name ("wd" / "fgw") -> (N, M) plan; alphas: mode -> alpha used; struct_acoustic (N, N) and
    struct_linguistic (M, M): the structure matrices of the checkpoint's gmot config; char_spans: per
    reference character (char, first frame, end frame exclusive) from CTC forced alignment, or None when the
    reference does not fit in N frames.
    """

    utt_id: str
    reference: str
    hypothesis: str
    tokens: list[str]
    plans: dict[str, np.ndarray]
    alphas: dict[str, float]
    struct_acoustic: np.ndarray
    struct_linguistic: np.ndarray
    structure: str
    frame_shift_s: float
    char_spans: list[tuple[str, int, int]] | None = None
    notes: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """mode -> models.engine.diagnostics.score_plan of its plan (alignment lift, mass in span, order,
    entropy)."""

    @property
    def cer(self) -> float:
        """Character error rate of the greedy hypothesis against the reference (fraction)."""
        from data.scoring import score_transcripts

        return score_transcripts({"u": self.reference}, {"u": self.hypothesis}).rate


def _find_record(reader: SplitReader, utt_id: str) -> ManifestEntry:
    for record in reader.records:
        if record.id == utt_id:
            return record
    ids = [r.id for r in reader.records]
    close = [i for i in ids if utt_id in i or i in utt_id][:5]
    shown = ", ".join((close or ids)[:5])
    raise AlignmentPlotError(
        f"utterance {utt_id!r} is not in {reader.split_dir} ({len(ids)} utterances; for example {shown})"
    )


def _checkpoint_plm_info(loaded: LoadedModel) -> PLMInfo | None:
    """The plm.json the checkpoint's config carries under "plm", if any (None when it has none)."""
    raw = loaded.config.get("plm") if isinstance(loaded.config, dict) else None
    return PLMInfo.from_json(raw, f"checkpoint {loaded.path}: plm") if raw else None


def gmot_config_of(loaded: LoadedModel) -> GMOTConfig:
    """The checkpoint's GMOTConfig (config["gmot"]), defaults where the checkpoint has none."""
    from models.nn.transfer_loss import GMOTConfig

    raw = loaded.config.get("gmot") if isinstance(loaded.config, dict) else None
    try:
        return GMOTConfig.from_dict(dict(raw)) if isinstance(raw, dict) else GMOTConfig()
    except (TypeError, ValueError) as err:
        raise AlignmentPlotError(f"checkpoint {loaded.path} has an invalid gmot config: {err}") from None


def compute_alignment(
    loaded: LoadedModel, data_dir: Path, split: str, utt_id: str, modes: tuple[str, ...] = ("fgw",)
) -> AlignmentData:
    """Run the model on one utterance of DATA_DIR/split and compute the transport plans of `modes`.

    "wd" is GMOTLoss at alpha 0 (Sinkhorn), "fgw" GMOTLoss at the checkpoint's alpha (0.5 when the
    checkpoint was not distilled with fgw); other settings (epsilon, iterations, structure) are the
    checkpoint's. Raises AlignmentPlotError for an unknown id, a split without PLM cache or a model without
    an adapter; data.store.StoreError when the split is not prepared.
    """
    from models.nn.transfer_loss import GMOTLoss
    from models.ot import graphs

    for mode in modes:
        if mode not in PLAN_MODES:
            raise AlignmentPlotError(f"unknown plan {mode!r}; choose from {', '.join(PLAN_MODES)}")
    split_dir = Path(data_dir) / split
    reader = SplitReader(split_dir)
    record = _find_record(reader, utt_id)
    plm_raw = reader.plm_features(record)
    if plm_raw is None or record.plm is None or not record.plm.num_tokens:
        raise AlignmentPlotError(
            f"{split_dir} has no PLM cache for {utt_id!r}; prepare it with a PLM teacher (gmot prepare)"
        )
    model = loaded.model
    if getattr(model, "adapter", None) is None:
        raise AlignmentPlotError(
            f"checkpoint {loaded.path} has no adapter into the PLM width (a pretrain model?); "
            "plot the plans of a model trained with gmot distill"
        )
    base = gmot_config_of(loaded)
    plm_info = read_plm_info(Path(data_dir) / "lang") or _checkpoint_plm_info(loaded)
    device = loaded.cmvn_mean.device
    with torch.inference_mode():
        feats, lengths = padded_batch([reader.features(record)], loaded.cmvn_mean, loaded.cmvn_std, device)
        out = model(feats, lengths)
    adapted = out["adapted"].float()
    n_frames = int(out["lengths"][0])
    plm = torch.from_numpy(plm_raw)[None].to(device)
    plm_len = torch.tensor([plm.shape[1]], device=device)
    if plm.shape[-1] != adapted.shape[-1]:
        raise AlignmentPlotError(
            f"the PLM cache of {split_dir} has width {plm.shape[-1]} but the model's adapter gives "
            f"{adapted.shape[-1]}: was the model trained with another PLM?"
        )

    plans, alphas = {}, {}
    for mode in modes:
        alpha = 0.0 if mode == "wd" else base.alpha
        cfg = replace(base, mode=mode)  # mode "wd" runs Sinkhorn, i.e. alpha 0
        loss = GMOTLoss.from_plm_info(cfg, plm_info).to(device)
        with torch.inference_mode():
            res = loss(adapted, out["lengths"], plm, plm_len, blank_prob=out["log_probs"][..., 0].exp())
        plans[mode] = res["plan"][0, :n_frames].cpu().numpy()
        alphas[mode] = alpha

    loss = GMOTLoss.from_plm_info(base, plm_info).to(device)
    a_mask = torch.ones(1, n_frames, dtype=torch.bool, device=device)
    b_mask = torch.ones(1, plm.shape[1], dtype=torch.bool, device=device)
    z = loss.teacher_features(plm, b_mask)  # standardised and, with gmot.centre, centred: as in training
    with torch.inference_mode():
        d_a = graphs.structure_matrix(adapted[:, :n_frames], a_mask, base.structure, base.hybrid_mix)
        d_l = graphs.structure_matrix(z.float(), b_mask, base.structure, base.hybrid_mix)

    vocab = Vocabulary(loaded.vocab)
    reference = record.text
    log_probs = out["log_probs"][0, :n_frames]
    hyp_ids = greedy_ctc(out["log_probs"], out["lengths"])[0]
    frames = diagnostics.ctc_char_spans(log_probs, vocab.encode(reference))
    spans = None if frames is None else [(ch, s0, s1) for ch, (s0, s1) in zip(reference, frames, strict=True)]
    notes = []
    if spans is None:
        notes.append(
            f"reference ({len(reference)} chars) does not fit in {n_frames} frames: no CTC alignment"
        )
    token_spans = None
    if frames is not None and len(frames) == len(reference):
        plm_tokens = list(record.plm.tokens)
        ranges = diagnostics.token_char_ranges(plm_tokens, reference)
        token_spans = diagnostics.token_frame_spans(ranges, frames)
    scores = {mode: diagnostics.score_plan(plan, token_spans) for mode, plan in plans.items()}
    from data.features import FRAME_SHIFT_S

    return AlignmentData(
        utt_id=utt_id,
        reference=reference,
        hypothesis=vocab.decode(hyp_ids),
        tokens=list(record.plm.tokens) or [f"#{j}" for j in range(plm.shape[1])],
        plans=plans,
        alphas=alphas,
        struct_acoustic=d_a[0].cpu().numpy(),
        struct_linguistic=d_l[0].cpu().numpy(),
        structure=base.structure,
        frame_shift_s=FRAME_SHIFT_S * model.cfg.subsampling,
        char_spans=spans,
        notes=notes,
        scores=scores,
    )


def find_cjk_font() -> str | None:
    """Name of a font matplotlib can use for CJK text (first of CJK_FONT_NAMES it finds), or None."""
    from matplotlib import font_manager

    available = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONT_NAMES:
        if name in available:
            return name
    return None


def _needs_cjk(text: str) -> bool:
    return any(ord(ch) >= 0x2E80 for ch in text)


def display_tokens(tokens: list[str], cjk_font: str | None) -> list[str]:
    """Token strings for tick labels: SentencePiece's word marker removed; without a CJK font, tokens with
    CJK characters become their index ("#3") so no glyph is missing."""
    out = []
    for j, tok in enumerate(tokens):
        shown = tok.replace("\u2581", "").strip() or "\u2423"  # an empty piece: open-box space sign
        out.append(f"#{j}" if cjk_font is None and _needs_cjk(shown) else shown)
    return out


def _safe_text(text: str, cjk_font: str | None) -> str:
    if cjk_font is not None:
        return text
    return "".join("\u25a1" if ord(ch) >= 0x2E80 else ch for ch in text)


def draw_alignment(data: AlignmentData, cjk_font: str | None = "auto") -> Figure:
    """Draw `data` and return the matplotlib Figure (not saved).

    Layout: one heatmap per plan (x: encoder frames with seconds, y: PLM tokens), all on one colour scale
    with one colour bar; white boxes mark, for each PLM token that spells reference characters, the frames
    CTC forced alignment gives those characters, and a strip under each plan shows the reference characters
    at their frames; the acoustic (N x N) and linguistic (M x M) structure matrices sit in a side column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches
    from matplotlib.ticker import MaxNLocator

    # a CJK font with only one weight makes matplotlib log a "Failed to find font weight" line per label
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

    font = find_cjk_font() if cjk_font == "auto" else cjk_font
    rc = {"font.family": ["DejaVu Sans", font] if font else ["DejaVu Sans"], "font.size": 9}
    modes = list(data.plans)
    n, m = next(iter(data.plans.values())).shape
    labels = display_tokens(data.tokens, font)
    ranges = diagnostics.token_char_ranges(data.tokens, data.reference)
    vmax = max(float(p.max()) for p in data.plans.values()) or 1.0
    names = {"wd": "WD plan (alpha = 0)", "fgw": "FGW plan (alpha = {a:g})"}

    with plt.rc_context(rc):
        plan_w = max(5.0, min(8.0, 3.0 + 0.05 * n))
        height = max(5.2, min(10.0, 2.6 + 0.28 * m))
        fig = plt.figure(figsize=(plan_w * len(modes) + 4.6, height + 0.6), layout="constrained")
        outer = fig.add_gridspec(1, len(modes) + 1, width_ratios=[plan_w] * len(modes) + [4.0])
        image = None
        first_ax = None
        plan_axes = []
        for k, mode in enumerate(modes):
            cell = outer[0, k].subgridspec(2, 1, height_ratios=[height - 0.7, 0.7], hspace=0.02)
            ax = fig.add_subplot(cell[0], sharey=first_ax)
            strip = fig.add_subplot(cell[1], sharex=ax)
            first_ax = first_ax or ax
            plan_axes += [ax, strip]
            image = ax.imshow(
                data.plans[mode].T, aspect="auto", origin="upper", cmap="magma", vmin=0.0, vmax=vmax,
                interpolation="nearest", extent=(-0.5, n - 0.5, m - 0.5, -0.5),
            )  # fmt: skip
            ax.set_title(names[mode].format(a=data.alphas[mode]), fontsize=11)
            ax.set_yticks(range(m))
            ax.set_yticklabels(labels, fontsize=10 if m <= 30 else 7)
            if k == 0:
                ax.set_ylabel("PLM token")
            else:
                ax.tick_params(labelleft=False)
            ax.tick_params(labelbottom=False)
            if data.char_spans:
                for (i0, i1), j in ((r, j) for j, r in enumerate(ranges) if r is not None):
                    if i1 > len(data.char_spans):
                        continue
                    start, end = data.char_spans[i0][1], data.char_spans[i1 - 1][2]
                    ax.add_patch(
                        patches.Rectangle(
                            (start - 0.5, j - 0.5), end - start, 1.0, fill=False, edgecolor="#7fffd4", lw=1.3,
                            ls="--",
                        )
                    )  # fmt: skip
            _draw_char_strip(strip, data, n, font)
            strip.xaxis.set_major_locator(MaxNLocator(integer=True))
            strip.set_xlabel(f"encoder frame ({1000 * data.frame_shift_s:.0f} ms each)")
        cbar = fig.colorbar(image, ax=plan_axes[-2:], location="right", shrink=0.8, pad=0.01, aspect=30)
        cbar.set_label("transport mass $T_{ij}$")

        side = outer[0, len(modes)].subgridspec(2, 1, height_ratios=[1.0, 1.0])
        ax_a = fig.add_subplot(side[0])
        im_a = ax_a.imshow(data.struct_acoustic, cmap="viridis", interpolation="nearest")
        ax_a.set_title(f"acoustic structure $D^A$ ({data.structure})", fontsize=10)
        ax_a.set_xlabel("frame")
        ax_a.set_ylabel("frame")
        ax_a.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax_a.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        fig.colorbar(im_a, ax=ax_a, shrink=0.85)
        ax_l = fig.add_subplot(side[1])
        im_l = ax_l.imshow(data.struct_linguistic, cmap="viridis", interpolation="nearest")
        ax_l.set_title(f"linguistic structure $D^L$ ({data.structure})", fontsize=10)
        tick_size = 9 if m <= 20 else 6
        ax_l.set_xticks(range(m))
        ax_l.set_xticklabels(labels, rotation=90, fontsize=tick_size)
        ax_l.set_yticks(range(m))
        ax_l.set_yticklabels(labels, fontsize=tick_size)
        fig.colorbar(im_l, ax=ax_l, shrink=0.85)

        cer = data.cer
        title = (
            f"{data.utt_id}    REF: {_safe_text(data.reference, font)}    "
            f"HYP (greedy): {_safe_text(data.hypothesis, font) or '(empty)'}    CER {100 * cer:.1f} %"
        )
        if data.notes:
            title += "\n" + "; ".join(data.notes)
        fig.suptitle(title, fontsize=11)
    return fig


def _draw_char_strip(ax, data: AlignmentData, n: int, font: str | None) -> None:
    """Reference characters at the frames CTC forced alignment gives them (alternating shades)."""
    ax.set_yticks([])
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylabel("CTC", rotation=0, ha="right", va="center")
    if not data.char_spans:
        ax.text(n / 2, 0.5, "no forced alignment", ha="center", va="center", color="grey")
        return
    size = 11 if len(data.char_spans) <= 30 else 8
    for k, (ch, start, end) in enumerate(data.char_spans):
        ax.axvspan(start - 0.5, end - 0.5, color="#d0e4f5" if k % 2 == 0 else "#f5e0c0", lw=0)
        ax.text((start + end - 1) / 2, 0.5, _safe_text(ch, font), ha="center", va="center", fontsize=size)


def save_figure(fig: Figure, path: Path) -> Path:
    """Save a figure atomically; the format follows the extension (.png at 150 dpi, .svg, .pdf)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise AlignmentPlotError(f"{path}: the figure must end in {', '.join(FIGURE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + suffix)
    fig.savefig(tmp, dpi=150, format=suffix[1:])
    plt.close(fig)
    tmp.replace(path)
    return path


def worst_utterances(hyps: dict[str, str], refs: dict[str, str], k: int) -> list[tuple[str, float]]:
    """The k utterance ids with the highest CER (ties: longer reference first) with their CER."""
    from data.scoring import score_transcripts

    result = score_transcripts(refs, hyps)
    ranked = sorted(
        result.utterances, key=lambda u: (-(u.errors / u.ref_len if u.ref_len else math.inf), -u.ref_len)
    )
    return [(u.id, u.errors / u.ref_len if u.ref_len else math.inf) for u in ranked[:k]]
