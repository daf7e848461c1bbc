r"""Does the transfer's gain last? CER against the training budget, from ablation folders of one budget each.

    python recipes/transfer_study/budget_report.py --budget OUT_DIR [--budget OUT_DIR ...] \
        [--arms baseline,fgw-centred-tot] [--notes NOTES.md] [--title TITLE] \
        [--out recipes/transfer_study/results/budget.md] [--plot docs/budget_curve.png] [--pair ARM=OTHER ...]

Each OUT_DIR is a `recipes/transfer_study/ablation.py` output folder whose runs all trained the same number
of updates (its budget: a whole run with its own warm-up and cosine decay, not a checkpoint of a longer
run). The report gives, per budget, each arm's dev and test CER (mean over seeds with its 95 % t interval),
each arm's paired gain over the baseline (transfer_report's statistics and decision rule), the train time
of a run, any `--pair ARM=OTHER` comparison (e.g. the real teacher against its shuffle control) in every
budget that ran both arms, and where every run stands against the stopping rule:

    a run has stopped improving when its dev CER fell by at most 0.5 points over the last quarter of its
    epochs (dev CER at the epoch before the last quarter minus dev CER at the last epoch).

The cosine schedule anneals in that last quarter, so a run can still gain there from the decay alone: the
rule says the budget is long enough for this schedule, not that more data would not help.

The figure (`--plot`) has three panels: test CER against updates, one line per arm (mean, 95 % t interval of
the mean); the paired gain over the baseline against updates (dev and test, 95 % t interval); and each
budget's dev CER per epoch (mean over seeds), which shows how far each run is from converging.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # recipes/transfer_study
if str(HERE) not in sys.path:  # run as a script, sys.path[0] is HERE already; loaded by the tests it is not
    sys.path.insert(0, str(HERE))

from transfer_report import (  # noqa: E402
    BASELINE,
    _save_figure,
    beats,
    load,
    machine_line,
    paired,
    parse_pairs,
)

from data.store import write_text_atomic  # noqa: E402
from models.engine.run_log import read_metrics  # noqa: E402

STOP_POINTS = 0.5  # the stopping rule's threshold: dev CER points gained over the last quarter of the epochs


@dataclass(frozen=True)
class Budget:
    """One budget: its updates per run, the ablation.json (summary restricted to the chosen arms) and the
    folder it came from."""

    updates: int
    data: dict[str, Any]
    folder: Path

    def rows(self) -> dict[str, dict[str, Any]]:
        """{arm: summary row} in the summary's order."""
        return {r["run"]: r for r in self.data["summary"]}


def read_budget(folder: Path, arms: list[str] | None) -> Budget:
    """The budget held in an ablation folder, its summary cut to `arms` (all when None). SystemExit naming
    the folder when it holds no finished run of those arms, or runs of different lengths."""
    data = load(folder)
    summary = [r for r in data["summary"] if arms is None or r["run"] in arms]
    steps = {int(s) for r in summary for s in r.get("steps", [])}
    if not steps:
        raise SystemExit(f"error: {folder} holds no finished run of {', '.join(arms or ['any arm'])}")
    if len(steps) > 1:
        raise SystemExit(f"error: {folder} mixes runs of {sorted(steps)} updates: one budget per folder")
    return Budget(steps.pop(), {**data, "summary": summary}, Path(folder))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95 % t interval with n - 1 degrees of freedom); half-width nan for n < 2."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def interval_text(values: list[float]) -> str:
    """ "46.33 [44.12, 48.54]" in % (the mean alone with one value)."""
    mean, half = mean_interval(values)
    if math.isnan(half):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"


def epoch_dev_cer(run_dir: Path) -> list[tuple[int, float]]:
    """[(step, dev CER)] of each epoch a run logged in RUN_DIR/metrics.jsonl, in order; [] when the file is
    missing. Lines that are not JSON (a run killed while writing) are skipped."""
    records = read_metrics(run_dir, "epoch")
    return [(int(r["step"]), float(r["dev_cer"])) for r in records if r.get("dev_cer") is not None]


@dataclass(frozen=True)
class Stopping:
    """A run against the stopping rule: its epochs, the dev CER before its last quarter and at its end, and
    whether it gained at most STOP_POINTS over that quarter."""

    epochs: int
    before: float
    end: float

    @property
    def gain_points(self) -> float:
        return 100 * (self.before - self.end)

    @property
    def stopped(self) -> bool:
        return self.gain_points <= STOP_POINTS


def stopping(curve: list[tuple[int, float]]) -> Stopping | None:
    """The rule applied to a run's per-epoch dev CER (`epoch_dev_cer`); None with fewer than 2 epochs."""
    if len(curve) < 2:
        return None
    quarter = max(1, math.ceil(len(curve) / 4))
    return Stopping(len(curve), curve[-1 - quarter][1], curve[-1][1])


def run_dir(budget: Budget, run: str, seed: int) -> Path:
    return budget.folder / "runs" / f"{run}-seed{seed}"


def cer_table(budgets: list[Budget]) -> list[str]:
    """Markdown: per budget and arm, seeds, dev and test CER (mean [95 % t interval]) and train time."""
    lines = [
        "| updates | arm | seeds | dev CER % [95 % CI] | test CER % [95 % CI] | train min / run |",
        "|---|---|---|---|---|---|",
    ]
    for b in budgets:
        for name, r in b.rows().items():
            secs = [
                x["train_seconds"]
                for x in b.data.get("runs", [])
                if x["run"] == name and "train_seconds" in x
            ]
            minutes = f"{statistics.fmean(secs) / 60:.0f}" if secs else "-"
            lines.append(
                f"| {b.updates} | {name} | {len(r['seeds'])} | {interval_text(r['dev_cer_per_seed'])} | "
                f"{interval_text(r['test_cer_per_seed'])} | {minutes} |"
            )
    return lines


def gain_table(budgets: list[Budget]) -> list[str]:
    """Markdown: per budget, every arm's paired gain over the baseline (points, 95 % t interval, p) and the
    decision rule's verdict."""
    lines = [
        "| updates | arm | seeds | dev gain [95 % CI], p | test gain [95 % CI], p | better? |",
        "|---|---|---|---|---|---|",
    ]
    for b in budgets:
        rows = b.rows()
        base = rows.get(BASELINE)
        for name, r in rows.items():
            if name == BASELINE or base is None:
                continue
            dev, test = paired(r, base, "dev_cer"), paired(r, base, "test_cer")
            ok, _ = beats(r, base)
            verdict = "no decision" if dev is None else ("**yes**" if ok else "no")
            lines.append(
                f"| {b.updates} | {name} | {dev.n if dev else 0} | {dev.text() if dev else 'n/a'} | "
                f"{test.text() if test else 'n/a'} | {verdict} |"
            )
    return lines


def pair_table(budgets: list[Budget], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown: per budget, each (arm, other) pair's paired gain where that budget ran both arms (e.g. the
    real teacher against its shuffle control), with the decision rule's verdict."""
    lines = [
        "| updates | arm | against | seeds | dev gain [95 % CI], p | test gain [95 % CI], p | better? |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in budgets:
        rows = b.rows()
        for arm, other in pairs:
            if arm not in rows or other not in rows:
                continue
            dev = paired(rows[arm], rows[other], "dev_cer")
            test = paired(rows[arm], rows[other], "test_cer")
            ok, _ = beats(rows[arm], rows[other])
            verdict = "no decision" if dev is None else ("**yes**" if ok else "no")
            lines.append(
                f"| {b.updates} | {arm} | {other} | {dev.n if dev else 0} | {dev.text() if dev else 'n/a'} | "
                f"{test.text() if test else 'n/a'} | {verdict} |"
            )
    return lines


def stopping_table(budgets: list[Budget]) -> list[str]:
    """Markdown: every run against the stopping rule."""
    lines = [
        f"| updates | arm | seed | epochs | dev CER % before the last quarter -> end | gained (points) | "
        f"stopped (<= {STOP_POINTS})? |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in budgets:
        for name, r in b.rows().items():
            for seed in r["seeds"]:
                s = stopping(epoch_dev_cer(run_dir(b, name, seed)))
                if s is None:
                    continue
                lines.append(
                    f"| {b.updates} | {name} | {seed} | {s.epochs} | "
                    f"{100 * s.before:.2f} -> {100 * s.end:.2f} | {s.gain_points:+.2f} | "
                    f"{'yes' if s.stopped else 'no'} |"
                )
    return lines


def mean_epoch_curve(budget: Budget, name: str) -> list[tuple[int, float]]:
    """[(step, dev CER mean over the arm's seeds)] at the steps every seed logged."""
    curves = [dict(epoch_dev_cer(run_dir(budget, name, s))) for s in budget.rows()[name]["seeds"]]
    curves = [c for c in curves if c]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, statistics.fmean(c[s] for c in curves)) for s in steps]


def plot_budget(budgets: list[Budget], path: Path) -> None:
    """The three-panel figure described in the module docstring."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(name for b in budgets for name in b.rows()))
    colour = {name: f"C{k}" for k, name in enumerate(arms)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    xs_all = sorted(b.updates for b in budgets)
    for k, name in enumerate(arms):
        pts = [
            (b.updates, *mean_interval(b.rows()[name]["test_cer_per_seed"]))
            for b in budgets
            if name in b.rows()
        ]
        if not pts:
            continue
        xs, ys, hs = zip(*sorted(pts), strict=True)
        shift = 1 + 0.02 * (k - (len(arms) - 1) / 2)
        axes[0].errorbar(
            [x * shift for x in xs], [100 * y for y in ys],
            yerr=[0 if math.isnan(h) else 100 * h for h in hs],
            marker="o", capsize=3, color=colour[name], label=name,
        )  # fmt: skip
    axes[0].set_ylabel("test CER % (greedy; mean, 95 % t interval)")
    for k, name in enumerate(a for a in arms if a != BASELINE):
        for key, marker, dx in (("dev_cer", "s", -0.015), ("test_cer", "o", 0.015)):
            pts = []
            for b in budgets:
                rows = b.rows()
                x = paired(rows[name], rows[BASELINE], key) if name in rows and BASELINE in rows else None
                if x is not None:
                    pts.append((b.updates, x))
            if not pts:
                continue
            shift = 1 + dx + 0.03 * k
            axes[1].errorbar(
                [u * shift for u, _ in pts], [100 * x.mean for _, x in pts],
                yerr=[[100 * (x.mean - x.lo) for _, x in pts], [100 * (x.hi - x.mean) for _, x in pts]],
                marker=marker, capsize=3, color=colour[name], ls="-" if key == "test_cer" else ":",
                label=f"{name} ({'dev' if key == 'dev_cer' else 'test'})",
            )  # fmt: skip
    axes[1].axhline(0.0, color="grey", lw=1)
    axes[1].set_ylabel("CER gain over the baseline, points (paired, 95 % t)")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel("updates (each budget a whole run with its own schedule)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    styles = ["-", "--", ":", "-."]
    for j, b in enumerate(sorted(budgets, key=lambda b: b.updates)):
        for name in b.rows():
            curve = mean_epoch_curve(b, name)
            if curve:
                axes[2].plot(
                    [s for s, _ in curve], [100 * c for _, c in curve], color=colour[name],
                    ls=styles[j % len(styles)], label=f"{name}, {b.updates}-update run",
                )  # fmt: skip
    axes[2].set_xlabel("update")
    axes[2].set_ylabel("dev CER % per epoch (mean over seeds)")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    cpu = budgets[0].data.get("machine", {}).get("cpu")
    fig.suptitle(
        "gmot: the transfer's gain against the training budget (demo corpus, from scratch"
        + (f", {cpu})" if cpu else ")"),
        fontsize=10,
    )
    _save_figure(fig, path)


def report(budgets: list[Budget], notes: str, title: str, pairs: Sequence[tuple[str, str]] = ()) -> str:
    """The whole markdown report (`pairs`: extra (arm, other) comparisons, see `pair_table`)."""
    budgets = sorted(budgets, key=lambda b: b.updates)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [
        "Each budget is a whole run from scratch with its own warm-up and cosine decay. CER: greedy CTC",
        "on avg.pt (no PLM, no LM), mean over seeds with the 95 % t interval of the mean. Gains are paired",
        "per seed (transfer_report.py): mean, 95 % interval with n - 1 degrees of freedom, two-sided p; the",
        "arm is better when the dev interval lies above 0 and the test gain is positive too.",
        "",
        "## CER per budget",
        "",
        *cer_table(budgets),
        "",
        "## Gain over the baseline",
        "",
        *gain_table(budgets),
        "",
    ]
    if pairs:
        lines += ["## Other paired comparisons", "", *pair_table(budgets, pairs), ""]
    lines += [
        "## Stopping rule",
        "",
        f"A run has stopped improving when its dev CER fell by at most {STOP_POINTS} points over the last",
        "quarter of its epochs. The cosine decay anneals in that quarter, so this says the budget is long",
        "enough for the schedule, not that the model could not learn more from more data.",
        "",
        *stopping_table(budgets),
        "",
        "## Commands and machines",
        "",
    ]
    for b in budgets:
        lines += [f"{b.updates} updates ({b.folder}):", "", "```", b.data["command"], "```", ""]
        lines += [f"Machine: {machine_line(b.data.get('machine', {}))}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the report (and the figure when asked); 0 on success."""
    p = argparse.ArgumentParser(
        prog="recipes/transfer_study/budget_report.py", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--budget", type=Path, action="append", required=True, help="ablation folder of one budget"
    )
    p.add_argument("--arms", help="comma-separated arms to report (default: every arm of every folder)")
    p.add_argument("--notes", type=Path, help="markdown put at the top of the report")
    p.add_argument("--title", default="Does it last? The gain against the training budget")
    p.add_argument("--out", type=Path, default=HERE / "results" / "budget.md")
    p.add_argument("--plot", type=Path, help="the three-panel figure (drawn only when asked)")
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="ARM=OTHER",
        help="compare ARM against OTHER too, per budget (repeatable; e.g. the real teacher and its control)",
    )
    a = p.parse_args(argv)
    pairs = parse_pairs(a.pair, p)
    arms = [x for x in a.arms.split(",") if x] if a.arms else None
    budgets = [read_budget(folder, arms) for folder in a.budget]
    if len({b.updates for b in budgets}) < len(budgets):
        p.error("two --budget folders hold the same number of updates")
    notes = a.notes.read_text(encoding="utf-8") if a.notes else ""
    for arm, other in pairs:  # a misspelt arm would otherwise leave its rows out silently
        if not any({arm, other} <= set(b.rows()) for b in budgets):
            print(f"warning: --pair {arm}={other}: no --budget folder ran both arms", file=sys.stderr)
    write_text_atomic(a.out, report(budgets, notes, a.title, pairs))
    print(f"wrote {a.out}")
    if a.plot is not None:
        plot_budget(budgets, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
