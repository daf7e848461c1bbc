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
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-14}
CONTINUE_EPOCHS=${CONTINUE_EPOCHS:-1}      # epochs of distill, and of the baseline continued without transfer
# the continuation fine-tunes the converged pretrained model: a short warm-up to a low peak, cosine decay
CONTINUE_SET=${CONTINUE_SET:-"--set train.lr=0.0005 --set train.warmup_steps=30"}
JOBS=${JOBS:-2}
EXTRA=${EXTRA:-}                           # extra options for pretrain and distill, e.g. "--set train.lr=0.003"
LM_WEIGHTS=${LM_WEIGHTS:-"0.5 1.0 1.5 2.0"} # weights of the character 3-gram tried on dev, per run

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
  --preset "$PRESET" --epochs "$CONTINUE_EPOCHS" --seed "$SEED" $CONTINUE_SET $EXTRA
# shellcheck disable=SC2086
gmot pretrain "$DATA" "$EXP/baseline" --init-from "$EXP/pretrain/avg.pt" \
  --preset "$PRESET" --epochs "$CONTINUE_EPOCHS" --seed "$SEED" $CONTINUE_SET $EXTRA

echo "== 4/6 decode: the test split (voices never heard in training), no PLM: greedy CTC, then beam search"
echo "   with the train transcripts' character 3-gram (lang/char_3gram.arpa), its weight chosen on dev"
LM=$DATA/lang/char_3gram.arpa
here=$(dirname "$0")
decode() {  # decode RUN OUT_FOLDER [options]: skipped when OUT_FOLDER's result is newer than the model
  local run=$1 out=$2
  shift 2
  if [ "$out/rtf.json" -nt "$EXP/$run/avg.pt" ]; then return; fi
  gmot decode "$EXP/$run" "$DATA" --out "$out" "$@"
}
for run in pretrain baseline gmot; do  # pretrain: the common start, for reference
  decode "$run" "$EXP/$run/decode_test" --split test
  dev_dirs=()
  for w in $LM_WEIGHTS; do
    decode "$run" "$EXP/$run/decode_dev_lm/w$w" --split dev --method beam --lm "$LM" --lm-weight "$w" \
      --no-progress > /dev/null
    dev_dirs+=("$EXP/$run/decode_dev_lm/w$w")
  done
  weight=$(python "$here/best_lm_weight.py" "${dev_dirs[@]}")
  echo "   $run: LM weight $weight (lowest dev CER of $LM_WEIGHTS)"
  decode "$run" "$EXP/$run/decode_test_lm" --split test --method beam --lm "$LM" --lm-weight "$weight"
done

echo "== 5/6 score"
for run in pretrain baseline gmot; do
  for dec in decode_test decode_test_lm; do
    gmot score "$DATA/test" "$EXP/$run/$dec" --json > "$EXP/$run/$dec/score.json"
  done
  gmot score "$DATA/test" "$EXP/$run/decode_test_lm"
done

echo "== 6/6 plot-alignment: WD and FGW plans of the 3 worst test utterances"
gmot plot-alignment "$EXP/gmot" "$DATA" --split test --worst 3 --compare wd,fgw --out "$OUT/plots/worst.png"

python "$here/summary.py" "$OUT"
