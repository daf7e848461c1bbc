#!/usr/bin/env bash
# AISHELL-1 recipe: prepare -> pretrain (conformer-CTC baseline) -> distill (GM-OT) -> decode -> score -> plots.
#
# Run from the repository root with the gmot virtual environment on PATH (`make venv`), e.g.
#   CORPUS=/data/aishell NGPU=1 bash recipes/aishell1/run.sh
#   CORPUS=/data/aishell NGPU=4 bash recipes/aishell1/run.sh            # torchrun, DDP on 4 GPUs
#   STAGE=4 bash recipes/aishell1/run.sh                                 # only decode, score and plot again
# Every variable below can be set in the environment. Every stage can be re-run: training resumes from its
# newest checkpoint, and `gmot prepare` rewrites its folder.
set -euo pipefail

CORPUS=${CORPUS:-/data/aishell}              # folder holding data_aishell/ (wav/{train,dev,test}/S*/*.wav, transcript/)
OUT=${OUT:-exp/aishell1}                     # everything this recipe writes goes under here
PLM=${PLM:-bert-base-chinese}                # teacher: a hub id already in your Hugging Face cache, or a local folder
JOBS=${JOBS:-8}                              # feature-extraction processes of `gmot prepare`
NGPU=${NGPU:-1}                              # 0: CPU only (tests), 1: one GPU, N > 1: torchrun with N processes
PRESET=${PRESET:-aishell1}                   # model / training preset (tiny is for tests)
CONFIG=${CONFIG:-recipes/aishell1/conf.yaml} # YAML merged over the preset
EPOCHS=${EPOCHS:-80}                         # pretrain epochs
DISTILL_EPOCHS=${DISTILL_EPOCHS:-40}         # GM-OT epochs, starting from the averaged pretrain model
BEAM=${BEAM:-10}                             # beam width of the beam-search decode
STAGE=${STAGE:-1}                            # first stage to run (1..6)
STOP_STAGE=${STOP_STAGE:-6}                  # last stage to run
if [ "$NGPU" -gt 0 ]; then DEVICE=${DEVICE:-cuda}; else DEVICE=${DEVICE:-cpu}; fi
# Under torchrun each optimiser step takes one batch per GPU, so an epoch has NGPU times fewer steps: the
# warm-up of conf.yaml (25,000 steps on one GPU) is divided by NGPU to cover the same share of training.
if [ "$NGPU" -gt 1 ]; then WARMUP=${WARMUP:-$((25000 / NGPU))}; fi

DATA=$OUT/data
PRE=$OUT/pretrain
GMOT=$OUT/gmot_fgw

stage() { [ "$STAGE" -le "$1" ] && [ "$STOP_STAGE" -ge "$1" ]; }
banner() { echo; echo "=== stage $1: $2 ($(date '+%F %T'))"; }

if [ ! -f "$CONFIG" ]; then
  echo "error: config $CONFIG not found (run from the repository root, or set CONFIG=...)" >&2
  exit 2
fi

if stage 1; then
  banner 1 "prepare: fbank shards, CMVN, vocabulary and the $PLM token-feature cache"
  gmot prepare aishell1 "$CORPUS" "$DATA" --plm "$PLM" --jobs "$JOBS"
fi

if stage 2; then
  banner 2 "pretrain: conformer-CTC without transfer (the baseline), $EPOCHS epochs ($NGPU GPU(s), device $DEVICE)"
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NGPU" -m gmot_cli pretrain "$DATA" "$PRE" --preset "$PRESET" --config "$CONFIG" --epochs "$EPOCHS" --device "$DEVICE" --set train.warmup_steps="$WARMUP"
  else
    gmot pretrain "$DATA" "$PRE" --preset "$PRESET" --config "$CONFIG" --epochs "$EPOCHS" --device "$DEVICE"
  fi
fi

if stage 3; then
  banner 3 "distill: GM-OT (fused Gromov-Wasserstein) from $PRE/avg.pt, $DISTILL_EPOCHS epochs"
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NGPU" -m gmot_cli distill "$DATA" "$GMOT" --preset "$PRESET" --config "$CONFIG" --init-from "$PRE/avg.pt" --mode fgw --epochs "$DISTILL_EPOCHS" --device "$DEVICE" --set train.warmup_steps="$WARMUP"
  else
    gmot distill "$DATA" "$GMOT" --preset "$PRESET" --config "$CONFIG" --init-from "$PRE/avg.pt" --mode fgw --epochs "$DISTILL_EPOCHS" --device "$DEVICE"
  fi
fi

if stage 4; then
  banner 4 "decode dev and test: greedy CTC (baseline and GM-OT), beam search K=$BEAM (GM-OT)"
  for split in dev test; do
    gmot decode "$PRE" "$DATA" --split "$split" --method greedy --device "$DEVICE" --out "$PRE/decode_${split}_greedy"
    gmot decode "$GMOT" "$DATA" --split "$split" --method greedy --device "$DEVICE" --out "$GMOT/decode_${split}_greedy"
    gmot decode "$GMOT" "$DATA" --split "$split" --method beam --beam-size "$BEAM" --device "$DEVICE" --out "$GMOT/decode_${split}_beam"
  done
fi

if stage 5; then
  banner 5 "score: CER against the references"
  for dec in "$PRE"/decode_{dev,test}_greedy "$GMOT"/decode_{dev,test}_{greedy,beam}; do
    split=${dec##*/decode_}; split=${split%%_*}
    gmot score "$DATA/$split" "$dec" --details "$dec/per_utt.txt" > "$dec/score.txt"
    echo "$dec: $(grep -m 1 '%CER' "$dec/score.txt")"
  done
fi

if stage 6; then
  banner 6 "plot-alignment: transport plans of the 3 worst test utterances (WD vs GM-OT)"
  gmot plot-alignment "$GMOT" "$DATA" --split test --worst 3 --compare wd,fgw --device "$DEVICE" --out "$GMOT/alignments/worst.png"
fi

# The result table: CER (%) from each score.txt. The published figures are greedy CTC without an LM.
cer() { if [ -f "$1/score.txt" ]; then grep -o '%CER [0-9.]*' "$1/score.txt" | head -n 1 | cut -d' ' -f2; else echo "-"; fi; }
echo
printf '%-36s %8s %8s\n' "AISHELL-1 CER (%)" "dev" "test"
printf '%-36s %8s %8s\n' "conformer-CTC baseline, greedy" "$(cer "$PRE/decode_dev_greedy")" "$(cer "$PRE/decode_test_greedy")"
printf '%-36s %8s %8s\n' "GM-OT (fgw), greedy" "$(cer "$GMOT/decode_dev_greedy")" "$(cer "$GMOT/decode_test_greedy")"
printf '%-36s %8s %8s\n' "GM-OT (fgw), beam $BEAM" "$(cer "$GMOT/decode_dev_beam")" "$(cer "$GMOT/decode_test_beam")"
printf '%-36s %8s %8s\n' "published conformer-CTC (greedy)" "5.53" "6.05"
printf '%-36s %8s %8s\n' "published WD-OT transfer" "3.96" "4.27"
printf '%-36s %8s %8s\n' "published hier. Sinkhorn attention" "3.64" "3.94"
echo "alignment plots: $GMOT/alignments/"
