#!/usr/bin/env bash
# The main job on the embedded demo corpus, end to end on a CPU: synthesise and prepare the corpus, then
# train two models from scratch at the same budget, side by side (one thread each): the conformer-CTC
# baseline and the same model with GM-OT knowledge transfer in the setting the transfer study selected
# (recipes/transfer_study/results/transfer_study.md: centred teacher tokens and the temporal-order prior);
# decode the held-out-voice test set greedily and with the train transcripts' 3-gram, score it, draw the
# transport plans, and print a summary table with the gain.
#
# Every stage is resumable: re-running skips what is finished. Sizes can be overridden from the environment.
set -euo pipefail

OUT=${OUT:-demo_run}                       # everything goes here
SEED=${SEED:-0}                            # corpus and training seed
TRAIN_SENTENCES=${TRAIN_SENTENCES-1000}    # train sentences (2 voices each); empty: all not held out
VOICES=${VOICES:-2}                        # training voices per sentence
PRESET=${PRESET:-demo}                     # model/training preset (tiny is for tests)
EPOCHS=${EPOCHS:-16}                       # epochs of both runs (16 x 1000 sentences: the study's 704 updates)
GMOT_SET=${GMOT_SET:-"--mode fgw --set gmot.centre=true --set gmot.tot_weight=0.5"}  # the transfer
JOBS=${JOBS:-2}                            # prepare worker processes
EXTRA=${EXTRA:-}                           # extra options for both runs, e.g. "--set train.lr=0.003"
LM_WEIGHTS=${LM_WEIGHTS:-"0.5 1.0 1.5 2.0"} # weights of the character 3-gram tried on dev, per run

DATA=$OUT/data
EXP=$OUT/exp
here=$(dirname "$0")
sentences=()
[ -n "$TRAIN_SENTENCES" ] && sentences=(--train-sentences "$TRAIN_SENTENCES")

echo "== 1/6 prepare: the embedded Mandarin corpus (espeak-ng) and the e5-small PLM cache"
gmot prepare demo "$DATA" --seed "$SEED" --voices-per-sentence "$VOICES" --jobs "$JOBS" "${sentences[@]}"

echo "== 2/6 train from scratch, side by side (1 thread each): the baseline and GM-OT ($GMOT_SET)"
mkdir -p "$EXP"
# shellcheck disable=SC2086
COLUMNS=200 OMP_NUM_THREADS=1 gmot pretrain "$DATA" "$EXP/baseline" --preset "$PRESET" --epochs "$EPOCHS" --seed "$SEED" \
  --no-progress $EXTRA > "$EXP/baseline.log" 2>&1 &
base_pid=$!
# shellcheck disable=SC2086
COLUMNS=200 OMP_NUM_THREADS=1 gmot distill "$DATA" "$EXP/gmot" --preset "$PRESET" --epochs "$EPOCHS" --seed "$SEED" \
  --no-progress $GMOT_SET $EXTRA > "$EXP/gmot.log" 2>&1 &
gmot_pid=$!
shown_base=0 shown_gmot=0
while kill -0 "$base_pid" 2> /dev/null || kill -0 "$gmot_pid" 2> /dev/null; do
  sleep 5
  for run in baseline gmot; do  # each epoch line as it appears, prefixed with its run
    var=shown_$([ $run = baseline ] && echo base || echo gmot)
    lines=$(grep -c "^epoch" "$EXP/$run.log" 2> /dev/null || true)
    if [ "${lines:-0}" -gt "${!var}" ]; then
      grep "^epoch" "$EXP/$run.log" | tail -n +"$((${!var} + 1))" | sed "s/^/   $run: /"
      printf -v "$var" '%s' "$lines"
    fi
  done
done
status=0
wait "$base_pid" || status=$?
wait "$gmot_pid" || status=$?
if [ $status -ne 0 ]; then
  echo "training failed; the logs:"; tail -n 20 "$EXP/baseline.log" "$EXP/gmot.log"; exit $status
fi
grep -h "^model:" "$EXP/baseline.log" "$EXP/gmot.log" | sed 's/^/   /'

echo "== 3/6 decode: the test split (voices never heard in training), no PLM: greedy CTC, then beam search"
echo "   with the train transcripts' character 3-gram (lang/char_3gram.arpa), its weight chosen on dev"
LM=$DATA/lang/char_3gram.arpa
decode() {  # decode RUN OUT_FOLDER [options]: skipped when OUT_FOLDER's result is newer than the model
  local run=$1 out=$2
  shift 2
  if [ "$out/rtf.json" -nt "$EXP/$run/avg.pt" ]; then return; fi
  gmot decode "$EXP/$run" "$DATA" --out "$out" "$@"
}
for run in baseline gmot; do
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

echo "== 4/6 score"
for run in baseline gmot; do
  for dec in decode_test decode_test_lm; do
    gmot score "$DATA/test" "$EXP/$run/$dec" --json > "$EXP/$run/$dec/score.json"
  done
  gmot score "$DATA/test" "$EXP/$run/decode_test_lm"
done

echo "== 5/6 plot-alignment: WD and FGW plans of the 3 worst test utterances, with their alignment scores"
gmot plot-alignment "$EXP/gmot" "$DATA" --split test --worst 3 --compare wd,fgw --out "$OUT/plots/worst.png"

echo "== 6/6 export: GM-OT as ONNX for sherpa-onnx, and sherpa-onnx on the test wavs against gmot's own decode"
gmot export "$EXP/gmot" "$OUT/onnx" --compare "$DATA/corpus/wav/test" \
  || echo "warning: the export or its sherpa-onnx comparison failed (see above); the results below stand"

python "$here/summary.py" "$OUT"
