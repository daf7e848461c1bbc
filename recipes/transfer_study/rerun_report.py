r"""Does a run come out the same when it is run again? The same arm and seed from two ablation folders
(another machine, another day, another commit), paired seed by seed.

    python recipes/transfer_study/rerun_report.py --before OLD_DIR --after NEW_DIR [--arms A,B] \
        [--title TITLE] [--out FILE]

Both folders are `recipes/transfer_study/ablation.py` output folders (their ablation.json). For every arm that
both ran, on the seeds both ran: each seed's dev and test CER before and after, and the paired difference
d_s = CER(before) - CER(after) in points (positive: the rerun is better) with its mean, 95 % t interval
(n - 1 degrees of freedom) and two-sided p, the statistics of transfer_report.py. The spread of d_s is
what the rerun alone does to one run's CER: the size of difference between two arms that a comparison
across the two folders cannot tell from noise. Writes markdown (stdout without --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # recipes/transfer_study
if str(HERE) not in sys.path:  # run as a script, sys.path[0] is HERE already; loaded by the tests it is not
    sys.path.insert(0, str(HERE))

from transfer_report import _per_seed, load, machine_line, paired, pct  # noqa: E402

from data.store import write_text_atomic  # noqa: E402

KEYS = (("dev_cer", "dev"), ("test_cer", "test"))


def common_arms(before: dict[str, Any], after: dict[str, Any], arms: list[str] | None) -> list[str]:
    """The arms both folders' summaries hold, in the rerun's order (only `arms` when given); SystemExit(2)
    naming a requested arm that one folder lacks, or when the folders share none."""
    old = {r["run"] for r in before["summary"]}
    new = [r["run"] for r in after["summary"]]
    if arms:
        missing = [a for a in arms if a not in old or a not in new]
        if missing:
            raise SystemExit(f"error: --arms {','.join(missing)}: not run in both folders")
        return arms
    shared = [a for a in new if a in old]
    if not shared:
        raise SystemExit("error: the two folders share no arm")
    return shared


def rerun_rows(before: dict[str, Any], after: dict[str, Any], arms: list[str]) -> list[str]:
    """Markdown: per arm and common seed, the CERs before and after; then per arm the paired difference."""
    old = {r["run"]: r for r in before["summary"]}
    new = {r["run"]: r for r in after["summary"]}
    lines = [
        "| arm | seed | dev before | dev after | test before | test after |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        dev_o, dev_n = _per_seed(old[arm], "dev_cer"), _per_seed(new[arm], "dev_cer")
        test_o, test_n = _per_seed(old[arm], "test_cer"), _per_seed(new[arm], "test_cer")
        for seed in sorted(set(test_o) & set(test_n)):
            lines.append(
                f"| {arm} | {seed} | {pct(dev_o.get(seed))} | {pct(dev_n.get(seed))} | "
                f"{pct(test_o[seed])} | {pct(test_n[seed])} |"
            )
    lines += [
        "",
        "| arm | seeds | dev: before - after [95 % CI] p | test: before - after [95 % CI] p | largest |d| |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        cells, diffs = [], []
        for key, _ in KEYS:
            d = paired(new[arm], old[arm], key)
            cells.append("n/a (fewer than 2 seeds)" if d is None else d.text())
            o, w = _per_seed(old[arm], key), _per_seed(new[arm], key)
            diffs += [abs(o[s] - w[s]) for s in o if s in w]
        n = len(set(_per_seed(old[arm], "test_cer")) & set(_per_seed(new[arm], "test_cer")))
        largest = f"{100 * max(diffs):.2f}" if diffs else "-"
        lines.append(f"| {arm} | {n} | {cells[0]} | {cells[1]} | {largest} |")
    return lines


def report(before: dict[str, Any], after: dict[str, Any], arms: list[str], title: str) -> str:
    """The whole markdown report: both folders' commands and machines, the per-seed table, the differences."""
    lines = [f"# {title}", ""]
    for name, data in (("Before", before), ("After", after)):
        lines += [f"{name}: `{data['command']}`", f"({data.get('date', 'date not recorded')}; "
                  f"{machine_line(data['machine'])}).", ""]  # fmt: skip
    lines += [
        "CER in % (greedy CTC on avg.pt); d = CER(before) - CER(after) per seed, in points, with the 95 % t",
        "interval of its mean (n - 1 degrees of freedom) and the two-sided p of the paired t-test.",
        "",
        *rerun_rows(before, after, arms),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the report; 0 on success, 2 on a missing folder or arm."""
    p = argparse.ArgumentParser(
        prog="recipes/transfer_study/rerun_report.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--before", type=Path, required=True, help="the first ablation folder")
    p.add_argument("--after", type=Path, required=True, help="the folder that ran the same arms again")
    p.add_argument("--arms", help="comma-separated arms to compare (default: every arm both ran)")
    p.add_argument("--title", default="The same runs, run again")
    p.add_argument("--out", type=Path, help="markdown file (default: stdout)")
    a = p.parse_args(argv)
    before, after = load(a.before), load(a.after)
    arms = common_arms(before, after, a.arms.split(",") if a.arms else None)
    text = report(before, after, arms, a.title)
    if a.out is None:
        print(text)
    else:
        write_text_atomic(a.out, text)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
