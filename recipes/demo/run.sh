#!/usr/bin/env bash
# The main job on the embedded demo corpus, end to end on a CPU: synthesise and prepare the corpus, pretrain
# a conformer-CTC baseline, then from the same start train two runs at the same budget of updates: GM-OT
# (fgw) knowledge transfer and the baseline continued without transfer; decode the held-out-voice test set,
# score it, draw the transport plans, and print a summary table.
#
# Every stage is resumable: re-running skips what is finished. Sizes can be overridden from the environment.
set -euo pipefail

OUT=${OUT:-demo_run}                       # everything goes here
SEED=${SEED:-0}                            # corpus and training seed
TRAIN_SENTENCES=${TRAIN_SENTENCES:-}       # empty: all usable HSK sentences not held out for dev/test
VOICES=${VOICES:-2}                        # training voices per sentence
PRESET=${PRESET:-demo}                     # model/training preset (tiny is for tests)
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-6}
CONTINUE_EPOCHS=${CONTINUE_EPOCHS:-1}      # epochs of distill, and of the baseline continued without transfer
JOBS=${JOBS:-2}
EXTRA=${EXTRA:-}                           # extra options for pretrain and distill, e.g. "--set train.lr=0.003"

DATA=$OUT/data
EXP=$OUT/exp
sentences=()
[ -n "$TRAIN_SENTENCES" ] && sentences=(--train-sentences "$TRAIN_SENTENCES")

echo "== 1/6 prepare: the embedded Mandarin corpus (espeak-ng) and the e5-small PLM cache"
gmot prepare demo "$DATA" --seed "$SEED" --voices-per-sentence "$VOICES" --jobs "$JOBS" "${sentences[@]}"

echo "== 2/6 pretrain: the conformer-CTC baseline"
# shellcheck disable=SC2086
gmot pretrain "$DATA" "$EXP/pretrain" --preset "$PRESET" --epochs "$PRETRAIN_EPOCHS" --seed "$SEED" $EXTRA

echo "== 3/6 distill: GM-OT transfer from the pretrained model, and the no-transfer control"
# shellcheck disable=SC2086
gmot distill "$DATA" "$EXP/gmot" --init-from "$EXP/pretrain/avg.pt" --mode fgw \
  --preset "$PRESET" --epochs "$CONTINUE_EPOCHS" --seed "$SEED" $EXTRA
# shellcheck disable=SC2086
gmot pretrain "$DATA" "$EXP/baseline" --init-from "$EXP/pretrain/avg.pt" \
  --preset "$PRESET" --epochs "$CONTINUE_EPOCHS" --seed "$SEED" $EXTRA

echo "== 4/6 decode: the test split (voices never heard in training), greedy CTC, no PLM"
for run in baseline gmot; do
  gmot decode "$EXP/$run" "$DATA" --split test --out "$EXP/$run/decode_test"
done

echo "== 5/6 score"
for run in baseline gmot; do
  gmot score "$DATA/test" "$EXP/$run/decode_test" --json > "$EXP/$run/decode_test/score.json"
  gmot score "$DATA/test" "$EXP/$run/decode_test"
done

echo "== 6/6 plot-alignment: WD and FGW plans of the 3 worst test utterances"
gmot plot-alignment "$EXP/gmot" "$DATA" --split test --worst 3 --compare wd,fgw --out "$OUT/plots/worst.png"

python "$(dirname "$0")/summary.py" "$OUT"
