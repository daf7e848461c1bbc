#!/usr/bin/env bash
# The demo's two runs (the baseline and GM-OT) side by side at 1 thread each, against one after the other at
# 2 threads: which finishes both sooner on this machine, end to end (start-up, training, dev evaluation).
#
#   bash benchmarks/bench_side_by_side.sh DATA_DIR [EPOCHS] [OUT_DIR]
#
# DATA_DIR is a prepared folder (e.g. demo_run/data from `make demo`); EPOCHS defaults to 2; the runs go to
# OUT_DIR (default /tmp/gmot_side_by_side, emptied first). Run it with nothing else on the machine: it is a
# timing. `gmot` must be on PATH (the venv of `make venv`). Prints the two wall times, their ratio and each
# run's per-epoch train and data-loading seconds (from metrics.jsonl).
set -euo pipefail
DATA=${1:?usage: bench_side_by_side.sh DATA_DIR [EPOCHS] [OUT_DIR]}
EPOCHS=${2:-2}
OUT=${3:-/tmp/gmot_side_by_side}
[ -f "$DATA/train/manifest.jsonl" ] || { echo "error: $DATA/train/manifest.jsonl not found: prepare DATA_DIR first" >&2; exit 2; }
command -v gmot > /dev/null || { echo "error: gmot is not on PATH (activate the venv of 'make venv')" >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"
common=(--preset demo --epochs "$EPOCHS" --seed 0 --no-progress)
gmot_set=(--mode fgw --set gmot.centre=true --set gmot.tot_weight=0.5)
run() {  # run THREADS NAME pretrain|distill [options]
  local threads=$1 name=$2 cmd=$3
  shift 3
  COLUMNS=200 OMP_NUM_THREADS=$threads gmot "$cmd" "$DATA" "$OUT/$name" "${common[@]}" "$@" > "$OUT/$name.log" 2>&1
}
t0=$(date +%s.%N)
run 1 side-baseline pretrain &
run 1 side-gmot distill "${gmot_set[@]}" &
wait
t1=$(date +%s.%N)
run 2 seq-baseline pretrain
run 2 seq-gmot distill "${gmot_set[@]}"
t2=$(date +%s.%N)
python3 - "$OUT" "$t0" "$t1" "$t2" << 'EOF'
import json, sys
from pathlib import Path

out, t0, t1, t2 = Path(sys.argv[1]), *map(float, sys.argv[2:])
side, seq = t1 - t0, t2 - t1
print(f"side by side, 1 thread each: {side:.1f} s; one after the other, 2 threads each: {seq:.1f} s; "
      f"side by side is {seq / side:.2f}x as fast")
for run in ("side-baseline", "side-gmot", "seq-baseline", "seq-gmot"):
    epochs = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e.get("event") == "epoch"]
    train = ", ".join(f"{e['train_seconds']:.1f}" for e in epochs)
    data = ", ".join(f"{e['data_seconds']:.2f}" for e in epochs)
    print(f"  {run}: train s per epoch {train}; waiting for batches {data}")
EOF
