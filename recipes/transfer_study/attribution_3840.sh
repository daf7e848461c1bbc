#!/usr/bin/env bash
# Re-creates the attribution study at all 3,840 train sentences (results/attribution/3840) in one command:
# a git worktree at the commit the runs were made from, the demo data with the real and an untrained
# e5-small teacher, every arm x seed (resumable: a re-run trains only what is missing), then the report.
#
#   bash recipes/transfer_study/attribution_3840.sh [WORK_DIR]      (from the repository root, venv active)
#
# Checked on 2026-12-03 up to its first prepare: the real-teacher data folder equals the study's file for
# file (8,223 of 8,250 files byte-identical; the other 27 name the folder's own path: the wav.scp lists and
# the part files' fingerprints, which hash the audio paths). Each run took 10-20 min (baseline fastest) on
# the study's 2-core Xeon (family 6 model 167), two 1-thread runs at a time: the seven arms x five seeds take
# about 5 hours. Extra arms: VARIANTS="--variant NAME=BASE:key=value ..." ARMS=NAME,... (e.g. the stronger
# transfer of the "what it takes" runs: fgw-kt2=fgw-centred-tot:train.kt_weight=2).
set -euo pipefail

WORK=$(realpath -m "${1:-attribution_3840}")
COMMIT=${COMMIT:-2ba2070}   # the archived runs' commit: a later one may move GM-OT's trajectory
SEEDS=${SEEDS:-11,12,13,14,15}
ARMS=${ARMS:-baseline,fgw-centred-tot,fgw-shuffle,fgw-random,fgw-random-units,fgw-untrained,wd-centred-tot}
VARIANTS=${VARIANTS:-}

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
# shellcheck source=recipes/transfer_study/worktree.sh
source "$repo/recipes/transfer_study/worktree.sh"
study_worktree "$repo" "$WORK" "$COMMIT"  # WORK/src at COMMIT, PYTHONPATH, cd, $ablation

# Leave OMP_NUM_THREADS unset here: the PLM cache depends on torch's thread count at rounding level, and
# the archive's was made with the default (2 on the study's machine); see docs/usage.md.
python -m gmot_cli prepare demo "$WORK/data" --seed 0 --voices-per-sentence 2 --jobs 2
python -m gmot_cli prepare demo "$WORK/data-untrained" --seed 0 --voices-per-sentence 2 --jobs 2 \
  --plm untrained:e5-small

common=("$WORK/data" "$WORK/runs3840" --from-scratch --epochs 4 --preset demo --seeds "$SEEDS"
  --untrained-data "$WORK/data-untrained" --jobs 2 --no-progress --report "$WORK/ablation.md")
# shellcheck disable=SC2086
python "$ablation" "${common[@]}" $VARIANTS --runs "$ARMS"  # trains what is missing, then collects all
echo "runs and ablation.json in $WORK/runs3840; the study's report from them:"
echo "  python $repo/recipes/transfer_study/transfer_report.py --title \"Is it the language model?\"" \
  "--curve 3840=$WORK/runs3840 --reference fgw-centred-tot --out report.md"
