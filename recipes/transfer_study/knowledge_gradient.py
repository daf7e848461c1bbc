r"""How much of the transfer's gradient depends on the utterance's own sentence?

    python recipes/transfer_study/knowledge_gradient.py EXP DATA [--batches 8] [--seed S] [--epoch 1] \
        [--controls shuffle,random_units] [--mode fgw] [--set gmot.centre=true ...] [--json OUT.json] \
        [--threads 1]

EXP is a `gmot distill` / `gmot pretrain` experiment folder (its avg.pt, else its newest ckpt-*.pt; or a
checkpoint file), DATA the prepared folder it trained on (train/ split, PLM feature cache). The study behind
it found that giving each training utterance another sentence's teacher features (`gmot.teacher=shuffle`,
data.teacher_controls) gains as much CER as the real teacher; this script measures, on a trained model, the
part of the transfer's gradient that is specific to the sentence.

What it does: the model is loaded on the CPU in eval mode (no dropout) and K training batches are formed
exactly as the trainer forms them (models.engine.training.Trainer's `_load_data`: the same utterances left
out, the same duration buckets, the batch order of epoch `--epoch` shuffled from `--seed`, by default the
run's train.seed), without SpecAugment or frequency warping. For each batch the encoder output that feeds
the adapter, `out["hidden"]` (B, N, d_model) (the tensor at which training measures `grad_ratio`,
models.engine.diagnostics.gradient_ratio_tensor), gets the gradients

- g_ctc  = d ctc / d hidden (ctc as the trainer computes it: per-utterance CTC summed over the batch's
  alignable utterances, divided by their number);
- g_real = d kt / d hidden with each utterance's own teacher features;
- g_c    = d kt / d hidden with the features of control c for the same utterances, the control applied by
  the Trainer's own code (`_apply_teacher_control`, as `gmot.teacher=c` would in training): "shuffle"
  (another sentence's features, the seeded cycle of data.teacher_controls.shuffle_sources with the run's
  train.seed), "random" (fixed Gaussian vectors with the teacher's statistics), "random_units" (one fixed
  N(0, 1) vector per character; measured only when gmot.random_width equals the adapter's width), or
  "real" (the real features again: a check, every difference is then exactly 0).

kt is the transfer loss built as the trainer builds it (models.nn.transfer_loss.GMOTLoss from the run's
gmot section; a random_units control gets its own copy with gmot.standardise off, as training does). A
model trained without transfer (gmot.mode none) has no transfer to measure: give `--mode fgw` (and any
`--set gmot.KEY=VALUE`, the `gmot distill` defaults otherwise); a checkpoint without an adapter (a pretrain
run) then gets a fresh one drawn from train.seed, the adapter `gmot distill --init-from` would start from.

The numbers, per batch and averaged over the batches (all norms over the whole batch's (B, N, d) tensor,
padded frames 0):

- ratio = ||g_real|| / ||g_ctc||: the transfer's gradient strength against CTC's, unweighted; training logs
  kt_weight times this (`grad_ratio`, under bf16 and SpecAugment), so it should resemble the log's
  grad_ratio / kt_weight (the log's mean over the last epoch is printed beside it);
- ratio_c = ||g_c|| / ||g_ctc||: the same with the control's features;
- cos = cos(g_real, g_c): 1 when the control pulls the encoder exactly as the real teacher does, about 0
  for unrelated gradients;
- share = ||g_real - g_c|| / ||g_real||: the sentence-specific share of the transfer's gradient, the part
  of the real teacher's pull that the control does not reproduce. 0 = nothing in the gradient depends on
  the sentence; about 1.41 (sqrt 2) for an unrelated gradient of the same norm; it can exceed that when the
  control's gradient is larger or points away;
- kt and kt_c: the transfer loss with the real and the control features (a model that learnt its sentences'
  features has kt < kt_c);
- utt_cos, utt_share: cos and share per utterance (its own (N, d) slice of the gradients: kt is a mean of
  per-utterance terms, each depending on its own utterance only), averaged over the batch's utterances
  whose real gradient is not 0, so that long or badly fitted utterances do not dominate.

`--json FILE` writes the settings, the per-batch numbers and their means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from data.loader import SpeechDataset, collate
from data.store import write_text_atomic
from models.engine.checkpoint import (
    CheckpointError,
    init_from_checkpoint,
    load_checkpoint,
    model_config_of,
    plm_width_of,
    resolve_checkpoint,
)
from models.engine.config import (
    ConfigError,
    ExperimentConfig,
    merge_dict,
    parse_override,
    set_value,
    validate,
)
from models.engine.outcome import TrainingSetupError
from models.engine.run_log import read_metrics
from models.engine.training import Trainer
from models.nn.ctc import ctc_batch_loss
from models.nn.transfer_loss import GMOTConfig, GMOTLoss

CONTROLS = ("real", "shuffle", "random", "random_units")
"""The teacher controls that can be compared with the real teacher (gmot.teacher values)."""
DEFAULT_CONTROLS = ("shuffle", "random_units")


@dataclass
class Teacher:
    """One teacher of the comparison: its train dataset (items' "plm" are its features) and its loss."""

    name: str
    dataset: SpeechDataset
    loss: GMOTLoss


@dataclass
class Setup:
    """The loaded model, the real teacher, the controls that can be measured (and why others cannot), the
    batches (lists of train-set indices) and the resolved configuration."""

    model: nn.Module
    real: Teacher
    controls: list[Teacher]
    skipped: dict[str, str]
    batches: list[list[int]]
    cfg: ExperimentConfig
    checkpoint: Path
    trained_teacher: str
    trained_mode: str
    adapter: str


def experiment_config(
    state: dict[str, Any], path: Path, overrides: list[str], mode: str | None
) -> tuple[ExperimentConfig, str, str]:
    """The configuration of the checkpoint `state` (read from `path`) with `--mode` and `--set` applied ->
    (config with gmot.teacher "real", the teacher the run trained with, the mode it trained with).

    The model section is the checkpoint's (models.engine.checkpoint.model_config_of), the gmot section is read
    by GMOTConfig.from_dict (so a checkpoint saved before an option existed loads with the value it trained
    with), the rest merged over the defaults. Raises ConfigError on an unknown key or a bad value."""
    saved = state.get("config") or {}
    cfg = ExperimentConfig()
    rest = {k: v for k, v in saved.items() if k not in ("model", "gmot")}
    merge_dict(cfg, rest)
    cfg.model = model_config_of(state, path)
    try:
        cfg.gmot = GMOTConfig.from_dict(dict(saved.get("gmot") or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: gmot section: {err}") from None
    trained_teacher, trained_mode = cfg.gmot.teacher, cfg.gmot.mode
    if mode is not None:
        set_value(cfg, "gmot.mode", mode)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)
    set_value(cfg, "gmot.teacher", "real")
    validate(cfg)
    if cfg.gmot.mode == "none":
        raise ConfigError(
            f"{path} trained without transfer (gmot.mode none): give --mode fgw (or wd) and any "
            "--set gmot.KEY=VALUE to measure the transfer it would get"
        )
    return cfg, trained_teacher, trained_mode


def _trainer(data: Path, cfg: ExperimentConfig, teacher: str, workdir: Path, console: Console) -> Trainer:
    """A Trainer of `cfg` with gmot.teacher=`teacher`, its data loaded and its state built (`Trainer.load`);
    nothing is written (`workdir` is never created)."""
    cfg = dataclasses.replace(cfg, gmot=dataclasses.replace(cfg.gmot, teacher=teacher))
    trainer = Trainer(data, workdir / teacher, cfg, device="cpu", console=console, progress=False)
    trainer.load()
    return trainer


def setup(
    exp: Path,
    data: Path,
    controls: list[str],
    *,
    batches: int = 8,
    seed: int | None = None,
    epoch: int = 1,
    overrides: list[str] | None = None,
    mode: str | None = None,
    console: Console | None = None,
) -> Setup:
    """Load the model of `exp` and build the real teacher, the `controls` and the first `batches` batches of
    epoch `epoch` (order shuffled from `seed`, default the run's train.seed) as the trainer would.

    Raises CheckpointError, ConfigError or TrainingSetupError (their messages name the file or option)."""
    console = console or Console(stderr=True)
    quiet = Console(stderr=True, quiet=True)
    path = resolve_checkpoint(exp)
    state = load_checkpoint(path)
    cfg, trained_teacher, trained_mode = experiment_config(state, path, overrides or [], mode)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "unused"
        base = _trainer(data, cfg, "real", workdir, console)
        model = base.model
        init_from_checkpoint(model, path, base.vocab, base.frontend)  # the adapter too, when it has one
        model.eval()
        assert base.kt_loss is not None and base.plm_width is not None
        real = Teacher("real", base.train_set, base.kt_loss)
        kept: list[Teacher] = []
        skipped: dict[str, str] = {}
        for name in controls:
            if name == "random_units" and base.cfg.gmot.random_width != base.plm_width:
                skipped[name] = (
                    f"gmot.random_width {base.cfg.gmot.random_width} is not the adapter's width "
                    f"{base.plm_width}"
                )
                continue
            other = _trainer(data, base.cfg, name, workdir, quiet)
            if other.sampler.batches != base.sampler.batches:  # the same utterances left out, same buckets
                skipped[name] = "its batches differ from the real teacher's"
                continue
            assert other.kt_loss is not None
            # a "real" control is the real teacher built again: every difference must come out exactly 0
            key = "real (again)" if name == "real" else name
            kept.append(Teacher(key, other.train_set, other.kt_loss))
    sampler = base.sampler
    if seed is not None:
        sampler.seed = seed
    sampler.set_epoch(epoch)
    chosen = list(sampler)[:batches]
    return Setup(
        model, real, kept, skipped, chosen, base.cfg, path, trained_teacher, trained_mode,
        "trained" if plm_width_of(state) is not None else "fresh",
    )  # fmt: skip


def teacher_batch(dataset: SpeechDataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    """The teacher features of train-set `indices` from `dataset`: (B, M, D) float32 zero-padded and (B,)
    token counts."""
    feats = [dataset[i]["plm"] for i in indices]
    if any(f is None for f in feats):
        raise ValueError("a train utterance has no teacher features")
    lens = torch.tensor([len(f) for f in feats], dtype=torch.long)
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lens


def hidden_gradients(
    model: nn.Module, batch: dict[str, Any], teachers: dict[str, tuple[GMOTLoss, Tensor, Tensor]]
) -> tuple[Tensor, dict[str, Tensor], dict[str, float], float, Tensor]:
    """Gradients at the encoder output `out["hidden"]` of one batch, as the training step computes its loss.

    batch: a `data.loader.collate` batch (feats (B, T, F), feat_lens (B,), tokens (B, L), token_lens (B,));
    teachers: {name: (kt loss, plm (B, M, D) raw teacher features, plm_lens (B,))}.
    Returns (g_ctc (B, N, d), {name: g_kt (B, N, d)}, {name: kt value}, ctc value, lengths (B,) valid
    frames); a kt with no gradient at hidden gives zeros."""
    out = model(batch["feats"], batch["feat_lens"])
    hidden = out["hidden"]
    tokens, token_lens = batch["tokens"], batch["token_lens"]
    ctc, _ = ctc_batch_loss(out, tokens, token_lens)
    g_ctc = torch.autograd.grad(ctc, hidden, retain_graph=True)[0]
    grads: dict[str, Tensor] = {}
    values: dict[str, float] = {}
    blank = out["log_probs"][..., 0].exp()
    for name, (loss, plm, plm_lens) in teachers.items():
        kt = loss(out["adapted"].float(), out["lengths"], plm, plm_lens, blank_prob=blank)["kt"]
        g = None
        if kt.requires_grad:
            g = torch.autograd.grad(kt, hidden, retain_graph=True, allow_unused=True)[0]
        grads[name] = torch.zeros_like(hidden) if g is None else g
        values[name] = float(kt.detach())
    grads = {k: v.detach() for k, v in grads.items()}
    return g_ctc.detach(), grads, values, float(ctc.detach()), out["lengths"]


def _cos(a: Tensor, b: Tensor) -> float:
    """Cosine of two flattened tensors (float64), clamped to [-1, 1]; nan when either is 0."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return float((a @ b / (na * nb)).clamp(-1.0, 1.0))


def _share(real: Tensor, other: Tensor) -> float:
    """||real - other|| / ||real|| (float64); nan when real is 0."""
    real, other = real.double(), other.double()
    n = real.norm()
    return math.nan if n == 0 else float((real - other).norm() / n)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def compare(g_ctc: Tensor, g_real: Tensor, g_other: Tensor) -> dict[str, float]:
    """The numbers of one batch for one control: g_ctc, g_real, g_other (B, N, d) gradients at hidden ->
    {"ratio": ||g_real||/||g_ctc||, "ratio_control": ||g_other||/||g_ctc||, "cos": cos(g_real, g_other),
    "share": ||g_real - g_other||/||g_real||, "utt_cos", "utt_share": their means over the utterances whose
    real gradient is not 0}; nan where a denominator is 0."""
    den = float(g_ctc.double().norm())
    utt_cos, utt_share = [], []
    for b in range(g_real.shape[0]):
        if float(g_real[b].double().norm()) > 0:
            utt_cos.append(_cos(g_real[b], g_other[b]))
            utt_share.append(_share(g_real[b], g_other[b]))
    return {
        "ratio": float(g_real.double().norm()) / den if den > 0 else math.nan,
        "ratio_control": float(g_other.double().norm()) / den if den > 0 else math.nan,
        "cos": _cos(g_real, g_other),
        "share": _share(g_real, g_other),
        "utt_cos": _nanmean(utt_cos),
        "utt_share": _nanmean(utt_share),
    }


def measure(s: Setup, progress: Console | None = None) -> list[dict[str, Any]]:
    """One record per batch of `s.batches`: {"batch", "utterances", "frames", "ctc", "kt": {teacher: value},
    "ratio": ||g_real||/||g_ctc||, "controls": {control: `compare` numbers}}."""
    records = []
    for k, indices in enumerate(s.batches):
        batch = collate([s.real.dataset[i] for i in indices])
        teachers = {t.name: (t.loss, *teacher_batch(t.dataset, indices)) for t in [s.real, *s.controls]}
        g_ctc, grads, kts, ctc, lengths = hidden_gradients(s.model, batch, teachers)
        den = float(g_ctc.double().norm())
        records.append({
            "batch": k, "utterances": len(indices), "frames": int(lengths.sum()), "ctc": ctc, "kt": kts,
            "ratio": float(grads["real"].double().norm()) / den if den > 0 else math.nan,
            "controls": {t.name: compare(g_ctc, grads["real"], grads[t.name]) for t in s.controls},
        })  # fmt: skip
        if progress is not None:
            progress.print(f"batch {k + 1}/{len(s.batches)}: {len(indices)} utterances", style="dim")
    return records


def means(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The means over the batches of every number of `measure`'s records (nan ones left out)."""
    out: dict[str, Any] = {
        "ctc": _nanmean([r["ctc"] for r in records]),
        "ratio": _nanmean([r["ratio"] for r in records]),
        "kt": {n: _nanmean([r["kt"][n] for r in records]) for n in (records[0]["kt"] if records else {})},
        "controls": {},
    }
    for name in records[0]["controls"] if records else {}:
        out["controls"][name] = {
            key: _nanmean([r["controls"][name][key] for r in records]) for key in records[0]["controls"][name]
        }
    return out


def logged_grad_ratio(exp: Path) -> float | None:
    """The mean `grad_ratio` of the training log's windows (EXP/metrics.jsonl "train" records) in its last
    epoch, or None when there is none."""
    rows = [r for r in read_metrics(exp, "train") if isinstance(r.get("grad_ratio"), (int, float))]
    if not rows:
        return None
    last = max(int(r.get("epoch", 0)) for r in rows)
    return _nanmean([float(r["grad_ratio"]) for r in rows if int(r.get("epoch", 0)) == last])


def _f(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def tables(records: list[dict[str, Any]], mean: dict[str, Any]) -> tuple[Table, Table]:
    """(per batch and control, means per control) as rich tables."""
    per = Table(title="per batch")
    for col in ("batch", "control", "utts", "kt real", "kt control", "ratio", "ratio control", "cos", "share",
                "utt cos", "utt share"):  # fmt: skip
        per.add_column(col, justify="left" if col == "control" else "right")
    for r in records:
        for name, c in r["controls"].items():
            per.add_row(
                str(r["batch"]), name, str(r["utterances"]), _f(r["kt"]["real"]), _f(r["kt"][name]),
                _f(c["ratio"], ".4f"), _f(c["ratio_control"], ".4f"), _f(c["cos"]), _f(c["share"]),
                _f(c["utt_cos"]), _f(c["utt_share"]),
            )  # fmt: skip
    summary = Table(title=f"means over {len(records)} batches")
    for col in ("control", "kt real", "kt control", "ratio", "ratio control", "cos", "share", "utt cos",
                "utt share"):  # fmt: skip
        summary.add_column(col, justify="left" if col == "control" else "right")
    for name, c in mean["controls"].items():
        summary.add_row(
            name, _f(mean["kt"]["real"]), _f(mean["kt"][name]), _f(c["ratio"], ".4f"),
            _f(c["ratio_control"], ".4f"), _f(c["cos"]), _f(c["share"]), _f(c["utt_cos"]), _f(c["utt_share"]),
        )  # fmt: skip
    return per, summary


def _json_safe(x: Any) -> Any:
    """nan and inf -> None, recursively (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (argparse exits 2 on a bad option)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exp", type=Path, help="experiment folder (avg.pt or ckpt-*.pt) or a checkpoint file")
    p.add_argument("data", type=Path, help="the prepared data folder it trained on (train/ split, PLM cache)")
    p.add_argument("--batches", type=int, default=8, help="how many training batches (default 8)")
    p.add_argument("--seed", type=int, default=None, help="batch order seed (default: the run's train.seed)")
    p.add_argument("--epoch", type=int, default=1, help="whose batch order (default 1, the first epoch)")
    p.add_argument(
        "--controls",
        default=",".join(DEFAULT_CONTROLS),
        help=f"comma-separated, of {', '.join(CONTROLS)} (default {','.join(DEFAULT_CONTROLS)})",
    )
    p.add_argument(
        "--mode",
        choices=("wd", "fgw"),
        default=None,
        help="gmot.mode to measure (needed for a run trained without transfer)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set gmot.tot_weight=0.5 (repeatable)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--batches must be at least 1")
    args.controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    unknown = [c for c in args.controls if c not in CONTROLS]
    if unknown or not args.controls:
        p.error(f"--controls takes {', '.join(CONTROLS)}; got {args.controls}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; 0 on success, 2 when the experiment, data or options cannot be used."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # a file or a pipe: wide enough for the tables
        out = Console(width=140)
    try:
        s = setup(
            args.exp, args.data, args.controls, batches=args.batches, seed=args.seed, epoch=args.epoch,
            overrides=args.overrides, mode=args.mode, console=err,
        )  # fmt: skip
    except (CheckpointError, ConfigError, TrainingSetupError) as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    for name, why in s.skipped.items():
        err.print(f"[yellow]note:[/] control {name} not measured: {why}")
    if not s.controls:
        err.print("[red]error:[/] no control left to compare with")
        return 2
    records = measure(s, progress=err)
    mean = means(records)
    kt_weight = float(s.cfg.train.kt_weight)
    logged = logged_grad_ratio(args.exp) if Path(args.exp).is_dir() else None
    per, summary = tables(records, mean)
    out.print(per)
    out.print(summary)
    line = (
        f"{s.checkpoint} (trained with gmot.mode={s.trained_mode}, teacher={s.trained_teacher}; "
        f"adapter {s.adapter}): ratio {_f(mean['ratio'], '.4f')}, x kt_weight {kt_weight:g} = "
        f"{_f(mean['ratio'] * kt_weight, '.4f')}"
    )
    if logged is not None:
        line += f"; the training log's grad_ratio (last epoch mean) {_f(logged, '.4f')}"
        line += f", / kt_weight = {_f(logged / kt_weight, '.4f')}" if kt_weight > 0 else ""
    out.print(line, markup=False, highlight=False)
    if args.json is not None:
        report = {
            "exp": str(args.exp), "checkpoint": str(s.checkpoint), "data": str(args.data),
            "trained_mode": s.trained_mode, "trained_teacher": s.trained_teacher, "adapter": s.adapter,
            "gmot": s.cfg.gmot.to_dict(), "kt_weight": kt_weight, "train_seed": s.cfg.train.seed,
            "seed": s.cfg.train.seed if args.seed is None else args.seed, "epoch": args.epoch,
            "controls": [t.name for t in s.controls], "skipped_controls": s.skipped,
            "logged_grad_ratio": logged, "batches": records, "mean": mean,
        }  # fmt: skip
        write_text_atomic(args.json, json.dumps(_json_safe(report), indent=1) + "\n")
        err.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
