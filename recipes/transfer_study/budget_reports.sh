#!/usr/bin/env bash
# The budget study's reports and figures (issue 22), from the archive under results/ alone (no checkpoints):
#
#   bash recipes/transfer_study/budget_reports.sh      (from anywhere in the repository, venv active)
#
# - results/budget.md and docs/budget_curve.png: CER against the budget (656, 1,968 and 6,068 updates), the
#   paired gains, the real teacher against its shuffle control, the stopping rule; top: results/budget_notes.md;
# - results/twostage.md and docs/twostage.png: the two-stage continuation of every archived seed; top:
#   results/twostage_notes.md;
# - docs/budget_diagnostics.png (the 1,968-update runs) and docs/budget_diagnostics_u6000.png (the
#   6,068-update runs): the transfer's logged diagnostics over training.
# REPORTS=DIR and FIGURES=DIR write elsewhere (a preview that leaves the committed files alone).
set -euo pipefail

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$repo"
study=recipes/transfer_study
archive=$study/results
reports=${REPORTS:-$archive}
figures=${FIGURES:-docs}
mkdir -p "$reports" "$figures"

python "$study/budget_report.py" --budget "$archive/attribution/3840" --budget "$archive/budget/u2000" \
  --budget "$archive/budget/u6000" --arms baseline,fgw-centred-tot,fgw-shuffle --pair fgw-centred-tot=fgw-shuffle \
  --notes "$archive/budget_notes.md" --out "$reports/budget.md" --plot "$figures/budget_curve.png"

stages=()
for folder in "$archive"/budget/twostage/seed*; do stages+=(--stage "$folder"); done
python "$study/twostage_report.py" "${stages[@]}" --starts "$archive/budget/u6000" \
  --notes "$archive/twostage_notes.md" --out "$reports/twostage.md" --plot "$figures/twostage.png"

seeds_in() {  # seeds_in RUNS_DIR: the seeds of its baseline runs, "21, 22, 23"
  find "$1" -maxdepth 1 -name 'baseline-seed*' | sed 's/.*seed//' | sort -n | paste -sd, - | sed 's/,/, /g'
}
title="The transfer's diagnostics over training"
python "$study/plot_diagnostics.py" "$figures/budget_diagnostics.png" "$archive"/budget/u2000/runs/* \
  --title "$title: 1,968 updates from scratch, seeds $(seeds_in "$archive/budget/u2000/runs")"
python "$study/plot_diagnostics.py" "$figures/budget_diagnostics_u6000.png" "$archive"/budget/u6000/runs/* \
  --title "$title: 6,068 updates from scratch, seeds $(seeds_in "$archive/budget/u6000/runs")"
