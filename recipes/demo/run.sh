#!/usr/bin/env bash
# The main job on the embedded demo corpus, end to end on a CPU: synthesise and prepare the corpus, then
# train two models from scratch at the same budget, side by side (one thread each): the conformer-CTC
# baseline and the same model with GM-OT knowledge transfer (centred teacher tokens and the temporal-order
# prior, today's defaults, spelt out; recipes/transfer_study/results/transfer_study.md chose them, and
# attribution.md and budget.md the size: all 3,840 train sentences, 4 epochs, 656 updates); decode the
# held-out-voice test set greedily and with the train transcripts' 3-gram, score it, draw the transport
# plans, export GM-OT as ONNX and check sherpa-onnx's transcripts against gmot's, and print a summary table
# with the gain.
#
# Re-running resumes: training and decoding skip what is finished; the plots and the export are redone.
# Sizes can be overridden from the environment.
set -euo pipefail

OUT=${OUT:-demo_run}                       # everything goes here
SEED=${SEED:-0}                            # corpus and training seed
TRAIN_SENTENCES=${TRAIN_SENTENCES-}        # train sentences (2 voices each); empty: all 3,840 not held out
VOICES=${VOICES:-2}                        # training voices per sentence
PRESET=${PRESET:-demo}                     # model/training preset (tiny is for tests)
EPOCHS=${EPOCHS:-4}                        # epochs of both runs (4 x 3,840 sentences: 656 updates, as in the study)
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

LM=$DATA/lang/char_3gram.arpa
decode() {  # decode RUN OUT_FOLDER [options]: skipped when OUT_FOLDER's result is newer than the model
  local run=$1 out=$2
  shift 2
  if [ "$out/rtf.json" -nt "$EXP/$run/avg.pt" ]; then return; fi
  gmot decode "$EXP/$run" "$DATA" --out "$out" "$@"
}
decode_and_score() {  # decode_and_score RUN: greedy and 3-gram decodes of test (the LM weight chosen on dev), scored
  local run=$1 dev_dirs=() w weight dec
  decode "$run" "$EXP/$run/decode_test" --split test
  for w in $LM_WEIGHTS; do
    decode "$run" "$EXP/$run/decode_dev_lm/w$w" --split dev --method beam --lm "$LM" --lm-weight "$w" \
      --no-progress > /dev/null
    dev_dirs+=("$EXP/$run/decode_dev_lm/w$w")
  done
  weight=$(python "$here/best_lm_weight.py" "${dev_dirs[@]}")
  echo "   $run: LM weight $weight (lowest dev CER of $LM_WEIGHTS)"
  decode "$run" "$EXP/$run/decode_test_lm" --split test --method beam --lm "$LM" --lm-weight "$weight"
  for dec in decode_test decode_test_lm; do  # written whole or not at all
    gmot score "$DATA/test" "$EXP/$run/$dec" --json > "$EXP/$run/$dec/score.json.tmp"
    mv "$EXP/$run/$dec/score.json.tmp" "$EXP/$run/$dec/score.json"
  done
  gmot score "$DATA/test" "$EXP/$run/decode_test_lm"
}

echo "== 2/6 train from scratch, side by side (1 thread each): the baseline and GM-OT ($GMOT_SET);"
echo "   the baseline, the faster of the two, is decoded and scored as soon as it has trained"
mkdir -p "$EXP"
export OMP_NUM_THREADS=1 COLUMNS=200  # every process below runs on one core; two run at a time
(
  # shellcheck disable=SC2086
  gmot pretrain "$DATA" "$EXP/baseline" --preset "$PRESET" --epochs "$EPOCHS" --seed "$SEED" \
    --no-progress $EXTRA > "$EXP/baseline.log" 2>&1 || exit 10
  decode_and_score baseline > "$EXP/baseline.decode.log" 2>&1  # (not in an || list, where set -e would not act)
) &
base_pid=$!
# shellcheck disable=SC2086
gmot distill "$DATA" "$EXP/gmot" --preset "$PRESET" --epochs "$EPOCHS" --seed "$SEED" \
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
base_status=0 gmot_status=0
wait "$base_pid" || base_status=$?
wait "$gmot_pid" || gmot_status=$?
if [ $base_status -eq 10 ] || [ $gmot_status -ne 0 ]; then  # 10: the baseline's training (its subshell above)
  echo "training failed; the logs:"; tail -n 20 "$EXP/baseline.log" "$EXP/gmot.log"; exit 1
fi
if [ $base_status -ne 0 ]; then
  echo "decoding the baseline failed; its log:"; tail -n 20 "$EXP/baseline.decode.log"; exit 1
fi
grep -h "^model:" "$EXP/baseline.log" "$EXP/gmot.log" | sed 's/^/   /'

# GM-OT's decodes beside its plots and export (one core each); their output is printed in stage order after
echo "   decoding GM-OT beside its transport plots and its export (one core each) ..."
decode_and_score gmot > "$EXP/gmot.decode.log" 2>&1 &
decode_pid=$!
(
  gmot plot-alignment "$EXP/gmot" "$DATA" --split test --worst 3 --compare wd,fgw --out "$OUT/plots/worst.png" \
    > "$OUT/plot.log" 2>&1 || exit 10
  gmot export "$EXP/gmot" "$OUT/onnx" --compare "$DATA/corpus/wav/test" > "$OUT/export.log" 2>&1 || exit 20
) &
side_pid=$!
decode_status=0 side_status=0
wait "$decode_pid" || decode_status=$?
wait "$side_pid" || side_status=$?

echo "== 3/6 decode and score: the test split (voices never heard in training), no PLM: greedy CTC, then beam"
echo "   search with the train transcripts' character 3-gram (lang/char_3gram.arpa), its weight chosen on dev"
cat "$EXP/baseline.decode.log" "$EXP/gmot.decode.log"
if [ $decode_status -ne 0 ]; then echo "decoding GM-OT failed (see above)"; exit 1; fi

echo "== 4/6 plot-alignment: WD and FGW plans of the 3 worst test utterances, with their alignment scores"
cat "$OUT/plot.log"
if [ $side_status -eq 10 ]; then echo "plot-alignment failed (see above)"; exit 1; fi

echo "== 5/6 export: GM-OT as ONNX for sherpa-onnx, and sherpa-onnx on the test wavs against gmot's own decode"
[ -f "$OUT/export.log" ] && cat "$OUT/export.log"
if [ $side_status -ne 0 ]; then
  echo "warning: the export or its sherpa-onnx comparison failed (see above); the results below stand"
fi

echo "== 6/6 summary"
python "$here/summary.py" "$OUT"
