#!/usr/bin/env bash
# One seed of the 6,000-update budget and its two-stage continuation (issue 22 items 1-2), sized to finish in
# one working session of the study's 2-core machine, then copied into the repository's archive:
#
#   bash recipes/transfer_study/budget_seed.sh SEED [WORK_DIR]      (from the repository root, venv active)
#
# 1. a git worktree at the runs' commit and the demo data (3,840 sentences), unless WORK_DIR has them;
# 2. the baseline and GM-OT (fgw-centred-tot) from scratch for 37 epochs (6,068 updates), side by side;
# 3. from that baseline's avg.pt (unless TWOSTAGE=0), 6 more epochs (984 updates) of three arms: the
#    continued baseline (the control), GM-OT with the transfer's weight ramped over one epoch (fgw-ramp)
#    and over three (fgw-ramp3);
# 4. the finished runs' result.json, metrics.jsonl and test decodes copied to results/budget/u6000 and
#    results/budget/twostage/seedSEED, with an ablation.json over every archived seed.
# Every step resumes: a run with a result.json is not trained again, a stopped one goes on from its last
# epoch checkpoint. The runs take about 105 minutes at 0.7 s a step (two runs side by side). What is planned
# and why (fgw-ramp3 runs beside fgw-ramp because a start checkpoint does not outlive the machine that
# made it): results/budget_notes.md. Commit the archive before the session ends; nothing else is kept.
set -euo pipefail

SEED=${1:?usage: budget_seed.sh SEED [WORK_DIR]}
WORK=$(realpath -m "${2:-budget_work}")
COMMIT=${COMMIT:-2ba2070}  # the archived budget runs' commit: a later one may move GM-OT's trajectory
EPOCHS=${EPOCHS:-37}             # from scratch: 37 x 164 = 6,068 updates
STAGE_EPOCHS=${STAGE_EPOCHS:-6}  # the two-stage continuation: 6 x 164 = 984 updates
TWOSTAGE=${TWOSTAGE:-1}          # 0: the from-scratch pair only (seeds 24-25, added for five seeds at 6,068)
EXTRA=${EXTRA:-}                 # more ablation.py options for every call (a smoke run: --dev-max-utts 20 ...)
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
archive=${ARCHIVE:-$repo/recipes/transfer_study/results/budget}

# shellcheck source=recipes/transfer_study/worktree.sh
source "$repo/recipes/transfer_study/worktree.sh"
study_worktree "$repo" "$WORK" "$COMMIT"  # WORK/src at COMMIT, PYTHONPATH, cd, $ablation

# OMP_NUM_THREADS unset for the preparation: the PLM cache depends on torch's thread count at rounding
# level, and the archive's was made with the default (docs/usage.md). Checked on 2026-12-04: data prepared
# so reproduces the archived 1,968-update runs' logged losses bit for bit.
prepared=1
for split in train dev test; do [ -f "$WORK/data/$split/prepare_report.json" ] || prepared=0; done
[ "$prepared" = 1 ] ||
  env -u OMP_NUM_THREADS python -m gmot_cli prepare demo "$WORK/data" --seed 0 --voices-per-sentence 2 --jobs 2

# the other seeds archived by earlier sessions come back into the work folder, so that the collect covers
# them; this seed's own runs do not (the archive has no checkpoints, and the two-stage start is its avg.pt),
# so on a machine without them they train again, bit for bit the archived runs
mkdir -p "$WORK/u6000/runs"
for run in "$archive"/u6000/runs/*-seed*; do
  [ "${run##*-seed}" = "$SEED" ] && continue
  if [ -d "$run" ] && [ ! -e "$WORK/u6000/runs/$(basename "$run")" ]; then cp -r "$run" "$WORK/u6000/runs/"; fi
done
# shellcheck disable=SC2206
scratch=(--from-scratch --epochs "$EPOCHS" --preset demo --jobs 2 --no-progress --runs baseline,fgw-centred-tot $EXTRA)
python "$ablation" "$WORK/data" "$WORK/u6000" "${scratch[@]}" --seeds "$SEED"
seeds=$(find "$WORK/u6000/runs" -maxdepth 2 -name result.json -path '*fgw-centred-tot-seed*' |
  sed 's/.*-seed\([0-9]*\)\/result.json/\1/' | sort -n | paste -sd, -)
python "$ablation" "$WORK/data" "$WORK/u6000" "${scratch[@]}" --seeds "$seeds" --collect

stage=$WORK/twostage/seed$SEED
if [ "$TWOSTAGE" = 1 ]; then
  python "$ablation" "$WORK/data" "$stage" --init-from "$WORK/u6000/runs/baseline-seed$SEED/avg.pt" \
    --epochs "$STAGE_EPOCHS" --preset demo --seeds "$SEED" --set train.lr=5e-4 --set train.warmup_steps=30 \
    --variant fgw-ramp=fgw-centred-tot:train.kt_warmup_steps=164 \
    --variant fgw-ramp3=fgw-centred-tot:train.kt_warmup_steps=492 \
    --runs baseline,fgw-ramp,fgw-ramp3 --jobs 2 --no-progress $EXTRA  # EXTRA: split into options on purpose
fi

# copy what a report needs (no checkpoints: 40 MB a run) into the repository
keep() {  # keep FROM_FOLDER TO_FOLDER: ablation.json, the test references and each run's small files
  mkdir -p "$2/runs"
  cp "$1/ablation.json" "$2/"
  cp "$WORK/data/corpus/test/text" "$2/test_references.txt"
  for run in "$1"/runs/*-seed*; do
    [ -f "$run/result.json" ] || continue
    mkdir -p "$2/runs/$(basename "$run")"
    cp -r "$run/result.json" "$run/metrics.jsonl" "$run/decode_test" "$2/runs/$(basename "$run")/"
  done
}
keep "$WORK/u6000" "$archive/u6000"
archived=u6000
if [ "$TWOSTAGE" = 1 ]; then
  keep "$stage" "$archive/twostage/seed$SEED"
  archived="u6000, twostage/seed$SEED"
fi
echo "archived seed $SEED under $archive ($archived): commit them before the session ends"
