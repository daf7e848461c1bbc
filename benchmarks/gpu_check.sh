#!/usr/bin/env bash
# The GPU check: one prepared script, at most about 8 minutes on one GPU, run from the repository root.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA and a Python that has torch/torchaudio
#   DEVICE=cpu bash benchmarks/gpu_check.sh # a dry run of the same steps on the CPU (checks the script)
#   STEPS=tests,bench_train bash benchmarks/gpu_check.sh   # only some steps
#
# Steps (each with its own time limit; a failed step does not stop the others):
#   1. the CUDA-marked tests (pytest -m cuda): solver and loss on the GPU against the CPU, precision, syncs;
#   2. benchmarks/bench_transport.py --quick on the device, against POT's batch solver on the same device;
#   3. benchmarks/bench_train.py --quick at the aishell1 preset: step time and the distill/pretrain ratio;
#   4. a tiny distill under torchrun (1 process), killed mid-run and resumed: it must finish;
#   5. gmot decode of the tiny model on the device;
# then one summary: each step's status and seconds, and where its output is ($OUT or /tmp/gmot_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-tests,bench_transport,bench_train,torchrun_kill_resume_decode}  # a subset: comma-separated
LOGS=${OUT:-/tmp/gmot_gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON DEVICE LOGS
declare -a SUMMARY=()

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)"
  timeout "$limit" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1  # bash -c: shell functions too
  local rc=$?
  local took=$((SECONDS - t0))
  tail -n 25 "$LOGS/$name.log"
  if [ $rc -eq 0 ]; then SUMMARY+=("PASS  $name  ${took} s"); else SUMMARY+=("FAIL  $name  ${took} s (exit $rc)"); fi
}

"$PYTHON" - <<'PY' > "$LOGS/environment.log" 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}",
          "bf16", torch.cuda.is_bf16_supported())
PY
cat "$LOGS/environment.log"

SELECT=(-m cuda)
[ "$DEVICE" = cpu ] && SELECT=(-m "not slow" -k "transport or precision")  # the dry run: a CPU stand-in
step tests 150 "$PYTHON" -m pytest -q "${SELECT[@]}" tests -p no:cacheprovider
step bench_transport 120 "$PYTHON" benchmarks/bench_transport.py --quick --device "$DEVICE"
step bench_train 120 "$PYTHON" benchmarks/bench_train.py --quick --device "$DEVICE" --presets aishell1

resume_check() {  # tiny data, distill under torchrun, SIGKILL after the first checkpoint, resume, decode
  local work=$LOGS/tiny
  rm -rf "$work" && mkdir -p "$work"
  "$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_prepared; from pathlib import Path; build_tiny_prepared(Path('$work/data'))" || return 1
  local cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m gmot_cli distill "$work/data" "$work/exp"
    --preset tiny --mode fgw --epochs 6 --device "$DEVICE" --no-progress --set train.max_utts=3 --set train.save_every_steps=2)
  "${cmd[@]}" > "$work/first.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do
    ls "$work/exp"/ckpt-*.pt > /dev/null 2>&1 && break
    sleep 0.5
  done
  pkill -KILL -P "$pid" 2> /dev/null; kill -KILL "$pid" 2> /dev/null; wait "$pid" 2> /dev/null
  ls "$work/exp"/ckpt-*.pt > /dev/null 2>&1 || { echo "no checkpoint before the kill"; cat "$work/first.log"; return 1; }
  echo "killed after $(ls "$work/exp"/ckpt-*.pt | wc -l) checkpoint(s); resuming"
  "${cmd[@]}" > "$work/second.log" 2>&1 || { cat "$work/second.log"; return 1; }
  cat "$work/second.log"
  grep -q "resuming from" "$work/second.log" || { echo "the second run did not resume"; return 1; }
  "$PYTHON" -m gmot_cli decode "$work/exp" "$work/data" --split test --device "$DEVICE" --no-progress --out "$work/decode" || return 1
  "$PYTHON" -c "import json; r = json.load(open('$work/decode/rtf.json')); print('decode', r['device'], 'rtf', r['rtf'], 'cer', r.get('cer'))"
}
export -f resume_check
step torchrun_kill_resume_decode 150 resume_check

echo
echo "== gpu_check summary ($DEVICE; logs in $LOGS)"
head -n 2 "$LOGS/environment.log"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "^\| |x POT|ratio|ms" "$LOGS/bench_transport.log" "$LOGS/bench_train.log" 2> /dev/null | tail -n 20
! printf '%s\n' "${SUMMARY[@]}" | grep -q '^FAIL'
