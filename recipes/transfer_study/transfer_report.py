r"""The transfer study's report: paired statistics, tables and figures from the ablation runs that make it up.

    python recipes/transfer_study/transfer_report.py [--notes NOTES.md] [--screen OUT_DIR] \
        --curve 500=OUT_DIR --curve 1000=OUT_DIR ... [--reference ARM] [--pair ARM=OTHER ...] \
        [--out recipes/transfer_study/results/transfer_study.md] [--plot docs/learning_curve.png] \
        [--gains-plot FILE] [--title TITLE]

Each OUT_DIR is a finished (or partly finished) `recipes/transfer_study/ablation.py` output folder: its
ablation.json holds every run, its command and the machine. `--screen` is a one-seed screen of the options;
each `--curve N=DIR` is a confirmation at N train sentences. The report lists, for every arm, dev and test CER
mean +- sample std over seeds and the transfer diagnostics (plan alignment lift, order, entropy, gradient
ratio), then the paired comparisons: every arm against the baseline and, with `--reference ARM`, every other
arm against the reference (e.g. the real teacher against each knowledge control), and each `--pair ARM=OTHER`
(e.g. a stronger transfer against its own shuffle control).

Statistics. Runs of one seed share their initial weights, data order and augmentation draws, so arms are
compared by the per-seed differences d_s = CER(other) - CER(arm) over the seeds both ran (positive = the arm
is better): their mean, the 95 % confidence interval mean +- t(0.975, n - 1) * sd / sqrt(n) with n - 1
degrees of freedom, and the two-sided p-value of the paired t-test. The decision rule, fixed before the
runs: an arm beats the other when the dev interval lies above 0 and the mean test difference is positive
too. With 3 seeds t(0.975, 2) = 4.30, with 5 seeds t(0.975, 4) = 2.78.
The learning-curve plot (`--plot`, with two or more sizes) shows test CER against train sentences with
+-1 std bars; `--gains-plot` shows each arm's paired dev and test gain over the baseline with its 95 %
interval, one panel per size.
`--notes` puts a hand-written markdown file (the decision, what each measurement ruled out) at the top.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.store import write_text_atomic

HERE = Path(__file__).resolve().parent  # recipes/transfer_study
BASELINE = "baseline"
REFERENCES = "test_references.txt"  # the test split's transcripts, archived beside a study's runs


def load(out_dir: Path) -> dict[str, Any]:
    """ablation.json of an ablation output folder; SystemExit(2) naming the file when it is missing."""
    path = Path(out_dir) / "ablation.json"
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found: run recipes/transfer_study/ablation.py into {out_dir} first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def mean_pm(mean: float | None, std: float | None) -> str:
    """ "12.34 +- 0.56" in %, or the mean alone with one seed."""
    return pct(mean) if std is None else f"{pct(mean)} +- {pct(std)}"


def _per_seed(row: dict[str, Any], key: str) -> dict[int, float]:
    """{seed: CER} of `key` ("dev_cer" / "test_cer") for one summary row."""
    return dict(zip(row["seeds"], row.get(f"{key}_per_seed") or [], strict=False))


@dataclass(frozen=True)
class Paired:
    """Paired comparison over n common seeds of d_s = CER(other) - CER(arm) (positive: the arm is better):
    mean, sample sd, the 95 % t interval (lo, hi) with n - 1 degrees of freedom, and the two-sided p-value."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    p: float

    def text(self) -> str:
        """ "+3.12 [+0.99, +5.25] p 0.012" in points of CER."""
        return f"{100 * self.mean:+.2f} [{100 * self.lo:+.2f}, {100 * self.hi:+.2f}] p {_p_text(self.p)}"


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def paired(arm: dict[str, Any], other: dict[str, Any], key: str) -> Paired | None:
    """The paired comparison of `arm` against `other` on `key` ("dev_cer" / "test_cer"), or None with fewer
    than 2 common seeds. A zero spread gives a zero-width interval and p 0 (or 1 when the mean is 0)."""
    from scipy import stats

    mine, theirs = _per_seed(arm, key), _per_seed(other, key)
    diffs = [theirs[s] - mine[s] for s in mine if s in theirs]
    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = 1.0 if mean == 0 else 0.0  # no spread: certain either way
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return Paired(n, mean, sd, mean - half, mean + half, p)


def beats(arm: dict[str, Any], other: dict[str, Any]) -> tuple[bool, str]:
    """The decision rule: the 95 % t interval of the paired dev gain above 0, and a positive test gain.
    (verdict, what it rests on)."""
    dev = paired(arm, other, "dev_cer")
    if dev is None:
        return False, "fewer than 2 common seeds: no decision"
    test = paired(arm, other, "test_cer")
    test_text = test.text() if test is not None else "n/a"
    test_gain = test.mean if test is not None else other["test_cer_mean"] - arm["test_cer_mean"]
    what = f"dev {dev.text()}; test {test_text} (n = {dev.n})"
    return dev.lo > 0 and test_gain > 0, what


def table(data: dict[str, Any]) -> list[str]:
    """Markdown table of one ablation.json's summary: CER per arm and the transfer diagnostics."""
    lines = [
        "| arm | what | seeds | dev CER % | test CER % | lift | order | H | grad | updates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["summary"]:
        lines.append(
            f"| {r['run']} | {r['description']} | {len(r['seeds'])} | "
            f"{mean_pm(r['dev_cer_mean'], r.get('dev_cer_std'))} | "
            f"{mean_pm(r['test_cer_mean'], r['test_cer_std'])} | {num(r.get('align_lift'), '.2f')} | "
            f"{num(r.get('align_order'), '+.2f')} | {num(r.get('align_entropy'), '.2f')} | "
            f"{num(r.get('grad_ratio'), '.3f')} | {'/'.join(str(s) for s in r['steps'])} |"
        )
    return lines


def comparisons(
    data: dict[str, Any], reference: str | None, extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[dict, dict]]:
    """The (arm, other) pairs to test: every arm against the baseline, then every arm other than the
    baseline and the reference against the reference (when both ran), then the `extra` (arm, other) name
    pairs whose two arms both ran (e.g. a variant against its own control), each pair once."""
    rows = {r["run"]: r for r in data["summary"]}
    pairs = [(r, rows[BASELINE]) for name, r in rows.items() if name != BASELINE and BASELINE in rows]
    if reference in rows:
        pairs += [(rows[reference], r) for name, r in rows.items() if name not in (BASELINE, reference)]
    seen = {(a["run"], b["run"]) for a, b in pairs}
    for arm, other in extra:
        if arm in rows and other in rows and (arm, other) not in seen:
            pairs.append((rows[arm], rows[other]))
            seen.add((arm, other))
    return pairs


def comparison_table(
    data: dict[str, Any], reference: str | None, extra: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """Markdown table of the paired comparisons (`comparisons`; gain = CER(other) - CER(arm), points,
    95 % t interval)."""
    lines = [
        "| arm | against | seeds | dev gain [95 % CI] | dev p | test gain [95 % CI] | test p | better? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, other in comparisons(data, reference, extra):
        dev, test = paired(arm, other, "dev_cer"), paired(arm, other, "test_cer")
        ok, _ = beats(arm, other)

        def cell(x: Paired | None) -> tuple[str, str]:
            if x is None:
                return "n/a", "n/a"
            return f"{100 * x.mean:+.2f} [{100 * x.lo:+.2f}, {100 * x.hi:+.2f}]", _p_text(x.p)

        dev_cell, dev_p = cell(dev)
        test_cell, test_p = cell(test)
        n = dev.n if dev is not None else 0
        verdict = "**yes**" if ok else ("no decision" if dev is None else "no")
        lines.append(
            f"| {arm['run']} | {other['run']} | {n} | {dev_cell} | {dev_p} | {test_cell} | {test_p} | "
            f"{verdict} |"
        )
    return lines


def error_kinds(folder: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each arm's test errors by kind (data.homophones.KINDS, as fractions of the reference characters) per
    seed, from the runs' decode_test/text under `folder`; rows shaped like the summary's
    ({"run", "seeds", "<kind>_per_seed"}), so `paired` compares them. The references are `folder`'s
    test_references.txt (a Kaldi text file archived with the runs) when it exists, else the prepared test
    split of the run's data folder. Runs without a decode or references are left out."""
    from data.homophones import KINDS, homophone_breakdown
    from data.scoring import read_transcripts, score_transcripts

    rows: dict[str, dict[str, Any]] = {}
    archived = Path(folder) / REFERENCES
    if not archived.is_file():
        archived = None
    refs_cache: dict[Path, dict[str, str]] = {}
    for run in data.get("runs", []):
        hyp = Path(folder) / "runs" / f"{run['run']}-seed{run['seed']}" / "decode_test" / "text"
        references = archived or Path(run.get("data_dir") or data.get("data_dir", "")) / "test"
        if not hyp.is_file() or not (references.is_file() or (references / "manifest.jsonl").is_file()):
            continue
        if references not in refs_cache:
            refs_cache[references] = read_transcripts(references)
        hyps = read_transcripts(hyp)
        refs = {k: v for k, v in refs_cache[references].items() if k in hyps}
        kinds = homophone_breakdown(score_transcripts(refs, hyps, "char"))
        row = rows.setdefault(run["run"], {"run": run["run"], "seeds": []})
        row["seeds"].append(run["seed"])
        for kind in KINDS:
            row.setdefault(f"{kind}_per_seed", []).append(kinds.rate(kind))
    return list(rows.values())


def error_kind_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: per arm, each kind's share of the reference characters (mean over seeds, %), and the
    paired gain over the baseline of the three kinds of substitution with 95 % t intervals."""
    from data.homophones import KINDS

    base = next((r for r in rows if r["run"] == BASELINE), None)
    subs = ("homophone", "tone", "other_sub")
    head = "| arm | seeds | " + " | ".join(f"{k} %" for k in KINDS) + " | "
    head += " | ".join(f"{k} gain [95 % CI]" for k in subs) + " |"
    lines = [head, "|" + "---|" * (2 + len(KINDS) + len(subs))]
    for r in rows:
        means = [100 * statistics.fmean(r[f"{k}_per_seed"]) for k in KINDS]
        gains = []
        for k in subs:
            x = paired(r, base, k) if base is not None and r is not base else None
            gains.append("-" if x is None else f"{100 * x.mean:+.2f} [{100 * x.lo:+.2f}, {100 * x.hi:+.2f}]")
        lines.append(
            f"| {r['run']} | {len(r['seeds'])} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + " | "
            + " | ".join(gains)
            + " |"
        )
    return lines


def _save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to `path` as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming an ablation.json's machine: CPU, cores, torch, how the runs were spread."""
    keys = ("cpu", "cores", "torch", "jobs")
    return ", ".join(f"{k} {machine[k]}" for k in keys if machine.get(k) is not None)


def plot_gains(curves: dict[int, dict[str, Any]], path: Path) -> None:
    """Each arm's paired dev and test gain over the baseline (points of CER) with its 95 % t interval,
    one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(curves)
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(6.4 * len(sizes), 3.6), layout="constrained", squeeze=False
    )
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = {r["run"]: r for r in curves[size]["summary"]}
        base = rows.get(BASELINE)
        arms = [name for name in rows if name != BASELINE]
        labels = []
        for k, name in enumerate(arms):
            seeds = 0
            for dy, key, colour in ((-0.15, "dev_cer", "tab:blue"), (0.15, "test_cer", "tab:orange")):
                x = paired(rows[name], base, key) if base is not None else None
                if x is None:
                    continue
                seeds = x.n
                ax.errorbar(
                    100 * x.mean,
                    k + dy,
                    xerr=[[100 * (x.mean - x.lo)], [100 * (x.hi - x.mean)]],
                    fmt="o",
                    color=colour,
                    capsize=3,
                    label=("dev" if key == "dev_cer" else "test") if k == 0 else None,
                )
            labels.append(f"{name}\n({seeds} seeds)")
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_yticks(range(len(arms)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("CER gain over the baseline, points (paired mean, 95 % t interval)")
        steps = sorted({int(s) for r in rows.values() for s in r.get("steps", [])})
        updates = f"{steps[0]} updates" if len(steps) == 1 else "equal updates"
        cpu = curves[size].get("machine", {}).get("cpu")
        ax.set_title(
            f"{size} train sentences, from scratch, {updates}" + (f" ({cpu})" if cpu else ""), fontsize=9
        )
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8)
    _save_figure(fig, path)


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
    _save_figure(fig, path)


def report(
    notes: str,
    screens: list[dict[str, Any]],
    curves: dict[int, dict[str, Any]],
    reference: str | None = None,
    title: str = "Transfer study",
    pairs: Sequence[tuple[str, str]] = (),
) -> str:
    """The whole markdown report (`pairs`: extra (arm, other) comparisons, see `comparisons`)."""
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [
        "Columns: CER mean +- sample std over seeds (greedy CTC, no PLM, no LM); lift = dev plan mass inside",
        "each PLM token's CTC forced-alignment span over a uniform plan's (1 = aligns nothing); order =",
        "Spearman of a token's index against its plan-weighted mean frame (+1 forward, -1 backwards);",
        "H = plan entropy over the uniform plan's; grad = ||d(lambda kt)/dh|| / ||d ctc/dh|| at the block",
        "feeding the adapter. Diagnostics are the last epoch's, averaged over seeds.",
        "",
        "Paired comparisons: gain = CER(against) - CER(arm) per seed, in points (positive: the arm is",
        "better); its mean, the 95 % interval mean +- t(0.975, n - 1) sd / sqrt(n), and the two-sided p of",
        "the paired t-test. Rule, fixed before the runs: the arm is better when the dev interval lies above",
        "0 and the test gain is positive too.",
        "",
    ]
    machine = None
    for k, screen in enumerate(screens):
        heading = "## Screen (one seed)" if k == 0 else f"## Screen, continued ({screen['data_dir']})"
        lines += [heading, "", *table(screen), ""]
        lines += ["Command:", "", "```", screen["command"], "```", ""]
        machine = machine or screen["machine"]
    for size, data in sorted(curves.items()):
        lines += [f"## {size} train sentences", "", *table(data), ""]
        lines += ["Paired comparisons:", "", *comparison_table(data, reference, pairs), ""]
        kinds = error_kinds(Path(data["_folder"]), data) if "_folder" in data else []
        if kinds:
            lines += [
                "Test errors by kind (data.homophones: homophone = same pinyin and tone as the reference",
                "character in its sentence, which only context tells apart; tone = same syllable, another",
                "tone), in % of the reference characters, and the paired gain over the baseline:",
                "",
                *error_kind_table(kinds),
                "",
            ]
        lines += ["Command:", "", "```", data["command"], "```", ""]
        if len({json.dumps(d["machine"], sort_keys=True) for d in curves.values()}) > 1:
            lines += [f"Machine of these runs: {machine_line(data['machine'])}.", ""]
        machine = machine or data["machine"]
    if machine and len({json.dumps(d["machine"], sort_keys=True) for d in curves.values()}) <= 1:
        lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()] + [""]
    return "\n".join(lines)


def parse_pairs(items: Sequence[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """`--pair ARM=OTHER` values -> [(arm, other), ...]; a malformed one is a usage error (exit 2)."""
    pairs = []
    for item in items:
        arm, eq, other = item.partition("=")
        if not eq or not arm or not other:
            parser.error(f"--pair expects ARM=OTHER, got {item!r}")
        pairs.append((arm, other))
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the report (and the plot when there are curve points); 0 on success."""
    p = argparse.ArgumentParser(
        prog="recipes/transfer_study/transfer_report.py", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--screen",
        type=Path,
        action="append",
        default=[],
        help="ablation folder of a one-seed screen (repeatable)",
    )
    p.add_argument("--curve", action="append", default=[], help="N=OUT_DIR: the runs at N train sentences")
    p.add_argument("--notes", type=Path, help="markdown put at the top of the report")
    p.add_argument("--out", type=Path, default=HERE / "results" / "transfer_study.md")
    p.add_argument("--plot", type=Path, help="learning curve (2+ sizes; drawn only when asked)")
    p.add_argument("--gains-plot", type=Path, help="paired gains over the baseline with 95 %% intervals")
    p.add_argument("--reference", help="compare every other arm against this one too (e.g. the real teacher)")
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="ARM=OTHER",
        help="compare ARM against OTHER too (repeatable; e.g. a variant against its own control)",
    )
    p.add_argument("--title", default="Transfer study", help="the report's heading")
    a = p.parse_args(argv)
    pairs = parse_pairs(a.pair, p)
    curves: dict[int, dict[str, Any]] = {}
    for item in a.curve:
        size, eq, folder = item.partition("=")
        if not eq or not size.isdigit():
            p.error(f"--curve expects N=OUT_DIR, got {item!r}")
        curves[int(size)] = {**load(Path(folder)), "_folder": folder}
    for arm, other in pairs:  # a misspelt arm would otherwise leave its comparison out silently
        if not any({arm, other} <= {r["run"] for r in d["summary"]} for d in curves.values()):
            print(f"warning: --pair {arm}={other}: no --curve folder ran both arms", file=sys.stderr)
    screens = [load(folder) for folder in a.screen]
    notes = a.notes.read_text(encoding="utf-8") if a.notes else ""
    write_text_atomic(a.out, report(notes, screens, curves, a.reference, a.title, pairs))
    print(f"wrote {a.out}")
    if len(curves) >= 2 and a.plot is not None:
        plot_curve(curves, a.plot)
        print(f"wrote {a.plot}")
    if curves and a.gains_plot is not None:
        plot_gains(curves, a.gains_plot)
        print(f"wrote {a.gains_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
