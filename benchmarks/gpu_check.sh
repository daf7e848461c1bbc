#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one GPU (the step limits add up to 470 s), from anywhere.
#
#   bash benchmarks/gpu_check.sh                    # on a CUDA machine, a Python with gmot's dependencies
#   DEVICE=cpu bash benchmarks/gpu_check.sh         # a dry run of the same steps on the CPU (limits x3)
#   STEPS=tests,bench_train bash benchmarks/gpu_check.sh            # only some steps (comma-separated)
#   PYTHON=~/.cache/gmot/venv-.../bin/python OUT=/tmp/check bash benchmarks/gpu_check.sh
#
# Steps, each with its time limit; a failed step does not stop the others:
#   environment      Python, torch, CUDA, NCCL and the GPU;
#   tests            the CUDA legs of tests/test_cuda.py (only that file): the solver and the transfer loss
#                    against the CPU, the precision, a tiny distill, a CPU checkpoint resumed on the GPU, the
#                    online teacher, beam decode as on the CPU;
#   bench_transport  the solver against POT's batch solver on the GPU (--quick);
#   bench_train      the aishell1 preset on 40,000-frame batches: step time, distill/pretrain (target
#                    <= 1.05x) and peak memory;
#   syncs            host synchronisations over ten Trainer steps, counted with
#                    torch.cuda.set_sync_debug_mode("warn") (target <= 2 per step);
#   fp16             a tiny distill in fp16 with the GradScaler forced on (a bf16 GPU never runs it
#                    otherwise);
#   ddp_resume       torchrun with one rank (an NCCL group, DDP, barriers, broadcasts): a tiny distill killed
#                    (SIGKILL) after a mid-epoch checkpoint and resumed ends with the weights of an
#                    uninterrupted run (both under torchrun); then beam decode of it on the GPU.
# It ends with one Markdown table: each step, PASS or FAIL, its seconds and its figure; the logs are in
# $OUT (default /tmp/gmot_gpu_check). Exit status 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-environment,tests,bench_transport,bench_train,syncs,fp16,ddp_resume}
LOGS=${OUT:-/tmp/gmot_gpu_check}
SCALE=1
[ "$DEVICE" = cpu ] && SCALE=3  # the limits are the GPU's; a dry run on a CPU gets three times as long
WORK=$LOGS/work                  # data and experiment folders: new every time (old checkpoints would resume)
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON DEVICE LOGS WORK
export COLUMNS=200  # rich wraps lines at 80 columns in a log; the checks grep whole lines
declare -a ROWS=()
FAILED=0 LIMITS=0

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit into $LOGS/NAME.log; add a table row
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  LIMITS=$((LIMITS + limit))
  echo "== $name (limit $limit s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1  # bash -c: shell functions too
  local rc=$? took=$((SECONDS - t0)) result=PASS fig
  tail -n 12 "$LOGS/$name.log"
  fig=$(grep -a '^figure: ' "$LOGS/$name.log" | tail -n 1 | cut -c 9-)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result=FAIL fig="timed out after $limit s${fig:+; $fig}"
  elif [ $rc -ne 0 ]; then
    result=FAIL fig="exit $rc${fig:+; $fig}"
  fi
  [ $result = FAIL ] && FAILED=1
  ROWS+=("| $name | $result | $took | ${fig:-see $name.log} |")
}

tiny_data() { "$PYTHON" benchmarks/gpu_check.py tiny-data "$WORK/data" > /dev/null; }

run_tests() {
  local select=(-m cuda)
  [ "$DEVICE" = cpu ] && select=(-m "not cuda")  # the dry run: the same tests' CPU legs
  "$PYTHON" -m pytest -q -rA -p no:cacheprovider "${select[@]}" tests/test_cuda.py
  local rc=$?
  echo "figure: $(grep -aE '(passed|failed|error).* in [0-9.]+s' "$LOGS/tests.log" | tail -n 1 | tr -d '=')"
  return $rc
}

bench_transport() {
  "$PYTHON" benchmarks/bench_transport.py --quick --device "$DEVICE" --repeats 3 --loop-repeats 1 --no-ott
  local rc=$?
  "$PYTHON" benchmarks/gpu_check.py transport-figure "$LOGS/bench_transport.log"
  return $rc
}

bench_train() {
  "$PYTHON" benchmarks/bench_train.py --quick --device "$DEVICE" --presets aishell1
  local rc=$?
  echo "figure: $(grep -a '^aishell1: ' "$LOGS/bench_train.log" | tail -n 1)"
  return $rc
}

syncs() {
  tiny_data && "$PYTHON" benchmarks/gpu_check.py syncs "$WORK/data" "$WORK/syncs" --device "$DEVICE"
}

fp16() { tiny_data && "$PYTHON" benchmarks/gpu_check.py fp16 "$WORK/data" "$WORK/fp16" --device "$DEVICE"; }

ddp_resume() {
  trap 'kill $(jobs -p) 2> /dev/null' EXIT  # runs left behind by a failure end with the step
  tiny_data || return 1
  local backend=nccl
  [ "$DEVICE" = cpu ] && backend=gloo
  # 4 batches an epoch, a checkpoint after every step: the kill comes after step 5, mid-epoch 2
  local args=(distill "$WORK/data" EXP --preset tiny --mode fgw --epochs 2 --device "$DEVICE" --no-progress
    --set train.max_utts=3 --set train.save_every_steps=1 --set model.dropout=0.1)
  local torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1)
  # two uninterrupted runs: how far apart identical runs end is the tolerance of the resumed one
  "${torchrun[@]}" -m gmot_cli "${args[@]/#EXP/$WORK/straight}" > "$WORK/straight.log" 2>&1 &
  local straight=$!
  "${torchrun[@]}" -m gmot_cli "${args[@]/#EXP/$WORK/again}" > "$WORK/again.log" 2>&1 &
  local again=$!
  "${torchrun[@]}" benchmarks/gpu_check.py run-killed 5 "${args[@]/#EXP/$WORK/resumed}" \
    > "$WORK/killed.log" 2>&1
  echo "the killed run's torchrun exited with status $?"
  wait "$straight" || { echo "the uninterrupted run failed:"; tail -n 40 "$WORK/straight.log"; return 1; }
  wait "$again" || { echo "the second uninterrupted run failed:"; tail -n 40 "$WORK/again.log"; return 1; }
  "$PYTHON" benchmarks/gpu_check.py killed-state "$WORK/resumed" --step 5 \
    || { tail -n 40 "$WORK/killed.log"; return 1; }
  "${torchrun[@]}" -m gmot_cli "${args[@]/#EXP/$WORK/resumed}" > "$WORK/resumed.log" 2>&1 \
    || { tail -n 40 "$WORK/resumed.log"; return 1; }
  grep -a -e "resuming from" -e "process(es)" "$WORK/resumed.log"
  grep -aq "1 process(es) in a $backend group" "$WORK/resumed.log" || { echo "no $backend group"; return 1; }
  local same
  same=$("$PYTHON" benchmarks/gpu_check.py compare "$WORK/straight" "$WORK/resumed" --again "$WORK/again")
  local rc=$?
  echo "$same"
  [ $rc -eq 0 ] || return 1
  "$PYTHON" -m gmot_cli decode "$WORK/resumed" "$WORK/data" --split test --method beam --device "$DEVICE" \
    --no-progress --out "$WORK/decode" || return 1
  "$PYTHON" - "$WORK/decode/rtf.json" "${same#figure: }" <<'PY'
import json, sys
r = json.load(open(sys.argv[1], encoding="utf-8"))
print(f"figure: {sys.argv[2]}; beam decode on {r['device']}: RTF {r['rtf']:.4f}, CER {100 * r['cer']:.1f} %")
PY
}
export -f tiny_data run_tests bench_transport bench_train syncs fp16 ddp_resume

step environment 20 "$PYTHON" benchmarks/gpu_check.py environment
step tests 110 run_tests
if [ -f "$LOGS/tests.log" ] && case ",$STEPS," in *",tests,"*) true ;; *) false ;; esac; then
  while read -r outcome id _; do  # one row per test, from pytest -rA's summary
    [ "$outcome" = PASSED ] && outcome=PASS || outcome=FAIL
    ROWS+=("| tests: ${id#*::} | $outcome | | |")
  done < <(grep -aE '^(PASSED|FAILED|ERROR) tests/' "$LOGS/tests.log")
fi
step bench_transport 60 bench_transport
step bench_train 70 bench_train
step syncs 40 syncs
step fp16 40 fp16
step ddp_resume 130 ddp_resume

echo
echo "== gpu_check on $DEVICE: $(grep -a '^figure: ' "$LOGS/environment.log" 2> /dev/null | cut -c 9-)"
echo "   logs in $LOGS; the steps' limits add up to $LIMITS s; took $SECONDS s"
echo
echo "| step | result | seconds | figure |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
