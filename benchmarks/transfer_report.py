"""The transfer study's report: tables and the learning curve from the ablation runs that make it up.

    python benchmarks/transfer_report.py [--notes NOTES.md] [--screen OUT_DIR] \
        --curve 500=OUT_DIR --curve 1000=OUT_DIR ... \
        [--out benchmarks/results/transfer_study.md] [--plot docs/learning_curve.png]

Each OUT_DIR is a finished (or partly finished) `benchmarks/ablation.py` output folder: its ablation.json
holds every run, its command and the machine. `--screen` is the one-seed screen of the options; each
`--curve N=DIR` is the confirmation at N train sentences. The report lists, for every arm, dev and test CER
mean +- sample std over seeds, the transfer diagnostics (plan alignment lift, order, entropy, gradient
ratio), the command that produced it, and the decision rule: an arm beats the baseline when its mean dev
gain is more than two standard errors and its test CER is lower too. Runs of one seed share their initial
weights, data order and augmentation draws, so the standard error is that of the per-seed differences (the
unpaired one is shown beside it). The plot shows test CER against train sentences, one line per arm, with
+-1 std bars.
`--notes` puts a hand-written markdown file (the decision, what each measurement ruled out) at the top.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.store import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "baseline"


def load(out_dir: Path) -> dict[str, Any]:
    """ablation.json of an ablation output folder; SystemExit(2) naming the file when it is missing."""
    path = Path(out_dir) / "ablation.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run benchmarks/ablation.py into {out_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def mean_pm(mean: float | None, std: float | None) -> str:
    """ "12.34 +- 0.56" in %, or the mean alone with one seed."""
    return pct(mean) if std is None else f"{pct(mean)} +- {pct(std)}"


def _paired(row: dict[str, Any], base: dict[str, Any], key: str) -> list[float] | None:
    """Per-seed differences baseline - arm of `key` ("dev_cer" / "test_cer") over the seeds both ran."""
    mine = dict(zip(row["seeds"], row.get(f"{key}_per_seed") or [], strict=False))
    theirs = dict(zip(base["seeds"], base.get(f"{key}_per_seed") or [], strict=False))
    common = [s for s in mine if s in theirs]
    return [theirs[s] - mine[s] for s in common] if len(common) >= 2 else None


def beats_baseline(row: dict[str, Any], base: dict[str, Any]) -> tuple[bool, str]:
    """The decision rule: the mean dev gain over the baseline above two standard errors, and a test gain.

    Runs of the same seed share their initial weights, data order and augmentation draws, so the standard
    error is that of the per-seed differences (paired); the unpaired one, sqrt(s_a^2 / n_a + s_b^2 / n_b),
    is shown beside it. (verdict, reason)."""
    diffs = _paired(row, base, "dev_cer")
    if diffs is None:
        return False, "fewer than 2 common seeds: no decision"
    gain = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    unpaired = math.sqrt(
        statistics.variance(row["dev_cer_per_seed"]) / len(row["dev_cer_per_seed"])
        + statistics.variance(base["dev_cer_per_seed"]) / len(base["dev_cer_per_seed"])
    )
    test = _paired(row, base, "test_cer") or [base["test_cer_mean"] - row["test_cer_mean"]]
    test_gain = statistics.fmean(test)
    what = (
        f"dev gain {100 * gain:+.2f}, SE {100 * se:.2f} paired ({100 * unpaired:.2f} unpaired), "
        f"test gain {100 * test_gain:+.2f}"
    )
    return gain > 2 * se and test_gain > 0, what


def table(data: dict[str, Any], with_decision: bool) -> list[str]:
    """Markdown table of one ablation.json's summary."""
    rows = data["summary"]
    base = next((r for r in rows if r["run"] == BASELINE), None)
    head = "| arm | what | seeds | dev CER % | test CER % | lift | order | H | grad | updates |"
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    if with_decision:
        head += " beats baseline? |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['run']} | {r['description']} | {len(r['seeds'])} | "
            f"{mean_pm(r['dev_cer_mean'], r.get('dev_cer_std'))} | "
            f"{mean_pm(r['test_cer_mean'], r['test_cer_std'])} | {num(r.get('align_lift'), '.2f')} | "
            f"{num(r.get('align_order'), '+.2f')} | {num(r.get('align_entropy'), '.2f')} | "
            f"{num(r.get('grad_ratio'), '.3f')} | {'/'.join(str(s) for s in r['steps'])} |"
        )
        if with_decision:
            if base is None or r is base:
                line += " - |"
            else:
                ok, why = beats_baseline(r, base)
                line += f" {'**yes**' if ok else 'no'}: {why} |"
        lines.append(line)
    return lines


def plot_curve(curves: dict[int, dict[str, Any]], path: Path) -> None:
    """Test CER against train sentences, one line per arm (mean over seeds, +-1 sample std bars)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list[tuple[int, float, float]]] = {}
    for size, data in sorted(curves.items()):
        for r in data["summary"]:
            arms.setdefault(r["run"], []).append(
                (size, 100 * r["test_cer_mean"], 100 * (r["test_cer_std"] or 0.0))
            )
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for k, (name, points) in enumerate(arms.items()):
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(
            [x * (1 + 0.02 * (k - len(arms) / 2)) for x in xs], ys, yerr=es, marker="o", capsize=3, label=name
        )
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted(curves), [str(s) for s in sorted(curves)])
    ax.set_xlabel("train sentences (2 voices each)")
    ax.set_ylabel("test CER % (greedy, held-out voices)")
    ax.set_title(
        "gmot transfer study: demo corpus, from scratch, equal updates (mean +- std, 3 seeds)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(notes: str, screens: list[dict[str, Any]], curves: dict[int, dict[str, Any]]) -> str:
    """The whole markdown report."""
    lines = ["# Transfer study", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [
        "Columns: CER mean +- sample std over seeds (greedy CTC, no PLM, no LM); lift = dev plan mass inside",
        "each PLM token's CTC forced-alignment span over a uniform plan's (1 = aligns nothing); order =",
        "Spearman of a token's index against its plan-weighted mean frame (+1 forward, -1 backwards);",
        "H = plan entropy over the uniform plan's; grad = ||d(lambda kt)/dh|| / ||d ctc/dh|| at the block",
        "feeding the adapter. Diagnostics are the last epoch's, averaged over seeds.",
        "",
    ]
    machine = None
    for k, screen in enumerate(screens):
        title = "## Screen (one seed)" if k == 0 else f"## Screen, continued ({screen['data_dir']})"
        lines += [title, "", *table(screen, with_decision=False), ""]
        lines += ["Command:", "", "```", screen["command"], "```", ""]
        machine = machine or screen["machine"]
    for size, data in sorted(curves.items()):
        lines += [f"## {size} train sentences", "", *table(data, with_decision=True), ""]
        lines += ["Command:", "", "```", data["command"], "```", ""]
        machine = machine or data["machine"]
    if machine:
        lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the report (and the plot when there are curve points); 0 on success."""
    p = argparse.ArgumentParser(prog="benchmarks/transfer_report.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--screen",
        type=Path,
        action="append",
        default=[],
        help="ablation folder of a one-seed screen (repeatable)",
    )
    p.add_argument("--curve", action="append", default=[], help="N=OUT_DIR: the runs at N train sentences")
    p.add_argument("--notes", type=Path, help="markdown put at the top of the report")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "transfer_study.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "learning_curve.png")
    a = p.parse_args(argv)
    curves: dict[int, dict[str, Any]] = {}
    for item in a.curve:
        size, eq, folder = item.partition("=")
        if not eq or not size.isdigit():
            p.error(f"--curve expects N=OUT_DIR, got {item!r}")
        curves[int(size)] = load(Path(folder))
    screens = [load(folder) for folder in a.screen]
    notes = a.notes.read_text(encoding="utf-8") if a.notes else ""
    write_text_atomic(a.out, report(notes, screens, curves))
    print(f"wrote {a.out}")
    if curves:
        plot_curve(curves, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
