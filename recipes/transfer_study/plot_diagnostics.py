"""The transfer's diagnostics over training, one line per run: what each run logged in its metrics.jsonl.

    python recipes/transfer_study/plot_diagnostics.py OUT.png RUN_DIR [RUN_DIR ...]

Panels: per step (the training log's windows), the CTC loss, the transfer term kt, the gradient ratio
||d(lambda kt)/dh|| / ||d ctc/dh|| and the plan entropy; per epoch, dev CER and the plan diagnostics
measured on dev (lift over a uniform plan, temporal order). A run without the transfer (the baseline) shows
in the CTC and dev CER panels only. Runs of one arm (the name before "-seed") share a colour, so seeds of an
arm read as a band. This is how to see whether the transfer's term keeps its scale once CTC is small, and
whether the plans stay aligned, over a long run (docs/transfer.md, "The diagnostics").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from models.engine import run_log

STEP_PANELS = (("ctc", "CTC loss"), ("kt", "transfer term kt"), ("grad_ratio", "gradient ratio"),
               ("plan_entropy", "plan entropy / uniform"))  # fmt: skip
EPOCH_PANELS = (("dev_cer", "dev CER %"), ("align_lift", "dev plan lift"), ("align_order", "dev plan order"))


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train windows, epoch records) of RUN_DIR/metrics.jsonl, each a list of dicts in step order; a line
    that is not JSON (a run killed while writing) is skipped. SystemExit naming the file if it is missing."""
    path = Path(run_dir) / run_log.METRICS
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl (is {run_dir} an experiment folder?)")
    records = run_log.read_metrics(run_dir)
    train = [r for r in records if r.get("event") == "train"]
    return train, [r for r in records if r.get("event") == "epoch"]


def arm_of(run_dir: Path) -> str:
    """The arm of a run folder named ARM-seedS (the whole name otherwise)."""
    name = Path(run_dir).name
    return name.rsplit("-seed", 1)[0] if "-seed" in name else name


PERCENT = {"dev_cer"}  # logged as a fraction, drawn in %


def plot(run_dirs: list[Path], out: Path, title: str = "") -> list[str]:
    """Draw the panels for `run_dirs` into `out` (written through a temporary file) under `title`; returns
    the arms in legend order."""
    arms = list(dict.fromkeys(arm_of(d) for d in run_dirs))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    panels = len(STEP_PANELS) + len(EPOCH_PANELS)
    fig, axes = plt.subplots(2, (panels + 1) // 2, figsize=(4.2 * ((panels + 1) // 2), 7.5), squeeze=False)
    flat = list(axes.flat)
    for run_dir in run_dirs:
        train, epochs = read_metrics(run_dir)
        colour = colours[arm_of(run_dir)]
        for ax, (key, _) in zip(flat, STEP_PANELS + EPOCH_PANELS, strict=False):
            rows = train if (key, _) in STEP_PANELS else epochs
            scale = 100.0 if key in PERCENT else 1.0
            points = [(r["step"], scale * r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), color=colour, alpha=0.7, lw=1,
                        marker="o" if rows is epochs else None, ms=3)  # fmt: skip
    for ax, (key, panel_title) in zip(flat, STEP_PANELS + EPOCH_PANELS, strict=False):
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("update")
        if key in ("ctc", "kt", "grad_ratio"):
            ax.set_yscale("log")
    for ax in flat[panels:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[a], label=a) for a in arms]
    legend_ax = flat[panels] if len(flat) > panels else flat[-1]
    legend_ax.legend(handles=handles, loc="center", fontsize=10, frameon=False,
                     title=f"{len(run_dirs)} runs: a line each, a colour an arm")  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return arms


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and draw; 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the figure to write (.png)")
    ap.add_argument("runs", type=Path, nargs="+", help="experiment folders (ARM-seedS from ablation.py)")
    ap.add_argument("--title", default="", help="a title over the panels (e.g. the budget and the seeds)")
    args = ap.parse_args(argv)
    arms = plot(args.runs, args.out, args.title)
    print(f"wrote {args.out}: {len(args.runs)} run(s) of {len(arms)} arm(s): {', '.join(arms)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
