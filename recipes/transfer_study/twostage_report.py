r"""The two-stage schedule: does the transfer help a trained model? Ablation folders started `--init-from`.

    python recipes/transfer_study/twostage_report.py --stage OUT_DIR [--stage OUT_DIR ...] \
        [--starts START_DIR] [--control baseline] [--notes NOTES.md] [--title TITLE] \
        [--out recipes/transfer_study/results/twostage.md] [--plot docs/twostage.png]

Each OUT_DIR is a `recipes/transfer_study/ablation.py` output folder whose runs continued one trained model
(`--init-from CKPT`; one folder per start, as `--init-from` takes one checkpoint, so usually one folder per
seed). The folders are pooled: an arm's seeds are all the seeds any folder ran it with. The start of each run
is the model it continued, read from the result.json beside its checkpoint (a run folder of an ablation: its
avg.pt's dev and test CER); with `--starts START_DIR` that run folder is looked up by name under
START_DIR/runs/ instead (an archived copy of the start's ablation folder).

The report gives, per seed, the start's and every arm's dev and test CER; every arm's paired gain over the
control (`--control`, the same extra updates without the transfer) by the study's decision rule; every arm
against its start (what the extra updates did at all); and the disturbance check fixed before the runs: a
transfer arm disturbs its start when its dev CER after the first epoch is more than DISTURB_POINTS above
the start's. The figure (`--plot`) shows dev CER per epoch from the start (update 0), per arm (mean over
seeds, each seed a thin line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # recipes/transfer_study
if str(HERE) not in sys.path:  # run as a script, sys.path[0] is HERE already; loaded by the tests it is not
    sys.path.insert(0, str(HERE))

from budget_report import epoch_dev_cer, interval_text  # noqa: E402
from transfer_report import BASELINE, _save_figure, beats, load, machine_line, paired  # noqa: E402

from data.store import write_text_atomic  # noqa: E402

DISTURB_POINTS = 1.0  # a transfer arm disturbs its start when its first-epoch dev CER is this far above it
START = "start"  # the pseudo-arm of the continued models themselves


@dataclass(frozen=True)
class StageRun:
    """One finished run of a two-stage folder: its arm, seed, CERs, updates, train time, its run folder and
    the start it continued (that run folder's name and its dev / test CER)."""

    arm: str
    seed: int
    dev_cer: float
    test_cer: float
    steps: int
    train_seconds: float | None
    run_dir: Path
    start_name: str
    start_dev: float
    start_test: float


@dataclass(frozen=True)
class Stage:
    """The pooled two-stage runs and, per folder, its command and machine."""

    runs: list[StageRun]
    folders: list[tuple[Path, dict[str, Any]]]

    def arms(self) -> list[str]:
        """The arms in the order the folders list them."""
        return list(dict.fromkeys(r.arm for r in self.runs))

    def row(self, arm: str) -> dict[str, Any]:
        """A summary row of `arm` (or START) as transfer_report's paired() and beats() read it."""
        if arm == START:
            starts = {r.seed: (r.start_dev, r.start_test) for r in self.runs}
            seeds = sorted(starts)
            devs = [starts[s][0] for s in seeds]
            tests = [starts[s][1] for s in seeds]
        else:
            mine = sorted((r for r in self.runs if r.arm == arm), key=lambda r: r.seed)
            seeds = [r.seed for r in mine]
            devs = [r.dev_cer for r in mine]
            tests = [r.test_cer for r in mine]
        return {
            "run": arm,
            "seeds": seeds,
            "dev_cer_per_seed": devs,
            "test_cer_per_seed": tests,
            "dev_cer_mean": statistics.fmean(devs),
            "test_cer_mean": statistics.fmean(tests),
        }


def start_result(init_checkpoint: str, starts: Path | None) -> tuple[str, dict[str, Any]]:
    """(the start's run-folder name, its result.json) for a run continued from `init_checkpoint`
    (RUN_DIR/avg.pt or another checkpoint of RUN_DIR); under `starts`/runs/ when given. SystemExit naming the
    file when it is missing."""
    run_dir = Path(init_checkpoint).parent
    if starts is not None:
        run_dir = starts / "runs" / run_dir.name
    path = run_dir / "result.json"
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found: the start {init_checkpoint} has no finished run beside it"
            + ("" if starts is not None else " (pass --starts with the start's ablation folder)")
        )
    return run_dir.name, json.loads(path.read_text(encoding="utf-8"))


def read_stage(folders: list[Path], starts: Path | None) -> Stage:
    """The finished runs of every folder, pooled. SystemExit naming the folder when a run did not continue a
    checkpoint, when a folder has no finished run, or when two folders ran the same arm and seed."""
    runs: list[StageRun] = []
    seen: dict[tuple[str, int], Path] = {}
    meta = []
    for folder in folders:
        data = load(folder)
        if not data.get("runs"):
            raise SystemExit(f"error: {folder}/ablation.json lists no finished run")
        meta.append((Path(folder), data))
        for r in data["runs"]:
            key = (r["run"], int(r["seed"]))
            if key in seen:
                raise SystemExit(f"error: {r['run']} seed {key[1]} is in both {seen[key]} and {folder}")
            seen[key] = Path(folder)
            if not r.get("init_checkpoint"):
                raise SystemExit(
                    f"error: {folder}: {r['run']} seed {key[1]} trained from scratch, not from a start"
                )
            name, start = start_result(r["init_checkpoint"], starts)
            runs.append(
                StageRun(
                    arm=r["run"],
                    seed=key[1],
                    dev_cer=float(r["dev_cer"]),
                    test_cer=float(r["test_cer"]),
                    steps=int(r["steps"]),
                    train_seconds=r.get("train_seconds"),
                    run_dir=Path(folder) / "runs" / f"{r['run']}-seed{key[1]}",
                    start_name=name,
                    start_dev=float(start["dev_cer"]),
                    start_test=float(start["test_cer"]),
                )
            )
    return Stage(runs, meta)


def first_epoch_dev(run: StageRun) -> float | None:
    """The run's dev CER after its first epoch (metrics.jsonl), None when it logged none."""
    curve = epoch_dev_cer(run.run_dir)
    return curve[0][1] if curve else None


def seed_table(stage: Stage) -> list[str]:
    """Markdown: per seed, the start (its run folder) and each arm's dev / test CER in %."""
    arms = stage.arms()
    head = "| seed | start | start dev / test | " + " | ".join(f"{a} dev / test" for a in arms) + " |"
    lines = [head, "|" + "---|" * (3 + len(arms))]
    by = {(r.arm, r.seed): r for r in stage.runs}
    for seed in sorted({r.seed for r in stage.runs}):
        any_run = next(r for r in stage.runs if r.seed == seed)
        cells = [
            f"{100 * by[a, seed].dev_cer:.2f} / {100 * by[a, seed].test_cer:.2f}" if (a, seed) in by else "-"
            for a in arms
        ]
        lines.append(
            f"| {seed} | {any_run.start_name} | {100 * any_run.start_dev:.2f} / "
            f"{100 * any_run.start_test:.2f} | " + " | ".join(cells) + " |"
        )
    return lines


def mean_table(stage: Stage) -> list[str]:
    """Markdown: the start and each arm over seeds: dev and test CER, mean [95 % t interval] in %."""
    lines = ["| model | seeds | dev CER % [95 % CI] | test CER % [95 % CI] |", "|---|---|---|---|"]
    for name in [START, *stage.arms()]:
        r = stage.row(name)
        lines.append(
            f"| {name} | {len(r['seeds'])} | {interval_text(r['dev_cer_per_seed'])} | "
            f"{interval_text(r['test_cer_per_seed'])} |"
        )
    return lines


def comparison_rows(stage: Stage, control: str) -> list[str]:
    """Markdown: every transfer arm against the control, then every arm against its start, each with the
    paired dev and test gains (points, 95 % t interval, p) and the decision rule's verdict."""
    lines = [
        "| arm | against | seeds | dev gain [95 % CI], p | test gain [95 % CI], p | better? |",
        "|---|---|---|---|---|---|",
    ]
    arms = stage.arms()
    pairs = [(a, control) for a in arms if a != control and control in arms]
    pairs += [(a, START) for a in arms]
    for arm, other in pairs:
        mine, theirs = stage.row(arm), stage.row(other)
        dev, test = paired(mine, theirs, "dev_cer"), paired(mine, theirs, "test_cer")
        ok, _ = beats(mine, theirs)
        verdict = "no decision" if dev is None else ("**yes**" if ok else "no")
        lines.append(
            f"| {arm} | {other} | {dev.n if dev else 0} | {dev.text() if dev else 'n/a'} | "
            f"{test.text() if test else 'n/a'} | {verdict} |"
        )
    return lines


def disturbance_rows(stage: Stage, control: str = BASELINE) -> tuple[list[str], bool]:
    """(Markdown: every run's dev CER after its first epoch against its start's, and whether a transfer arm
    (any arm but the control) rose more than DISTURB_POINTS above it; whether any transfer arm did).

    The column "beyond the control" (a transfer arm's rise less the same seed's control rise: what the
    transfer added to the restart of the learning rate; n/a where that seed has no control run) is shown
    for reading only; the rule is the planned one, on the rise itself."""
    lines = [
        "| arm | seed | start dev % | after epoch 1 % | change (points) | beyond the control | disturbed? |",
        "|---|---|---|---|---|---|---|",
    ]
    rises: dict[tuple[str, int], tuple[float, float]] = {}  # (arm, seed) -> (dev after epoch 1, rise)
    for r in stage.runs:
        first = first_epoch_dev(r)
        if first is not None:
            rises[r.arm, r.seed] = (first, 100 * (first - r.start_dev))
    any_disturbed = False
    for r in sorted(stage.runs, key=lambda r: (r.arm, r.seed)):
        if (r.arm, r.seed) not in rises:
            continue
        first, rise = rises[r.arm, r.seed]
        control_rise = rises.get((control, r.seed))
        if r.arm == control:
            verdict, beyond = "(control)", ""
        else:
            disturbed = rise > DISTURB_POINTS
            any_disturbed |= disturbed
            verdict = "**yes**" if disturbed else "no"
            beyond = "n/a" if control_rise is None else f"{rise - control_rise[1]:+.2f}"
        lines.append(
            f"| {r.arm} | {r.seed} | {100 * r.start_dev:.2f} | {100 * first:.2f} | {rise:+.2f} | {beyond} | "
            f"{verdict} |"
        )
    return lines, any_disturbed


def report(stage: Stage, notes: str, title: str, control: str = BASELINE) -> str:
    """The whole markdown report."""
    steps = sorted({r.steps for r in stage.runs})
    secs = [r.train_seconds for r in stage.runs if r.train_seconds is not None]
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    disturbance, disturbed = disturbance_rows(stage, control)
    lines += [
        f"Every arm continues its seed's start for {', '.join(map(str, steps))} more updates.",
        "CER: greedy CTC on the continued run's avg.pt (the start: its own avg.pt), mean over seeds with the",
        "95 % t interval of the mean. Gains are paired per seed: mean, 95 % interval with n - 1 degrees of",
        "freedom, two-sided p; an arm is better when the dev interval lies above 0 and the test gain is",
        "positive too.",
        "",
        "## CER",
        "",
        *mean_table(stage),
        "",
        *seed_table(stage),
        "",
        "## Paired gains",
        "",
        f"Against `{control}` (as many extra updates without the transfer), then every arm against the model",
        "it continued.",
        "",
        *comparison_rows(stage, control),
        "",
        "## Did the transfer disturb the start?",
        "",
        "Rule, fixed before the runs: a transfer arm disturbs its start when its dev CER after the first",
        f"epoch is more than {DISTURB_POINTS:g} point above the start's. "
        + ("At least one run did." if disturbed else "No transfer run did."),
        f"`{control}`'s own rise (the learning rate starts again) is the control's row;",
        '"beyond the control" is a transfer arm\'s rise less it, for reading only: not part of the rule.',
        "",
        *disturbance,
        "",
        "## Commands and machines",
        "",
    ]
    if secs:
        lines += [f"Train time of a run: {statistics.fmean(secs) / 60:.0f} min on average (as logged).", ""]
    for folder, data in stage.folders:
        lines += [f"{folder}:", "", "```", data["command"], "```", ""]
        lines += [f"Machine: {machine_line(data.get('machine', {}))}.", ""]
    return "\n".join(lines)


def plot_stage(stage: Stage, path: Path) -> None:
    """Dev CER per epoch from the start (update 0), per arm: each seed thin, the mean over seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    for k, arm in enumerate(stage.arms()):
        curves = []
        for r in (x for x in stage.runs if x.arm == arm):
            curve = dict([(0, r.start_dev), *epoch_dev_cer(r.run_dir)])
            curves.append(curve)
            xs = sorted(curve)
            ax.plot(xs, [100 * curve[x] for x in xs], color=f"C{k}", lw=0.6, alpha=0.5)
        common = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(
            common, [100 * statistics.fmean(c[x] for c in curves) for x in common],
            color=f"C{k}", lw=2, marker="o", label=f"{arm} (mean of {len(curves)})",
        )  # fmt: skip
    ax.set_xlabel("updates after the start")
    ax.set_ylabel("dev CER % per epoch (update 0: the start's avg.pt)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("gmot: the transfer added to a trained baseline (two-stage schedule)", fontsize=10)
    _save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the report (and the figure when asked); 0 on success."""
    p = argparse.ArgumentParser(
        prog="recipes/transfer_study/twostage_report.py", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--stage", type=Path, action="append", required=True, help="ablation folder started --init-from"
    )
    p.add_argument(
        "--starts", type=Path, help="the starts' ablation folder (default: beside each checkpoint)"
    )
    p.add_argument("--control", default=BASELINE, help="the arm without the transfer (default baseline)")
    p.add_argument("--notes", type=Path, help="markdown put at the top of the report")
    p.add_argument("--title", default="The two-stage schedule: the transfer added to a trained baseline")
    p.add_argument("--out", type=Path, default=HERE / "results" / "twostage.md")
    p.add_argument("--plot", type=Path, help="dev CER per epoch from the start (drawn only when asked)")
    a = p.parse_args(argv)
    stage = read_stage(a.stage, a.starts)
    if a.control not in stage.arms():
        print(
            f"warning: --control {a.control}: no folder ran it; only the starts are compared", file=sys.stderr
        )
    notes = a.notes.read_text(encoding="utf-8") if a.notes else ""
    write_text_atomic(a.out, report(stage, notes, a.title, a.control))
    print(f"wrote {a.out}")
    if a.plot is not None:
        plot_stage(stage, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
