#!/usr/bin/env bash
# AISHELL-1 recipe: prepare -> pretrain a conformer-CTC baseline -> from its averaged model, train GM-OT
# (fgw transfer from bert-base-chinese) and, as the control, the baseline continued without transfer for the
# same epochs -> decode dev/test -> score -> transport-plan plots -> a CER table beside the published figures.
#
# Run from the repository root with the gmot virtual environment on PATH (`make venv`), e.g.
#   CORPUS=/data/aishell NGPU=1 bash recipes/aishell1/run.sh
#   CORPUS=/data/aishell NGPU=4 bash recipes/aishell1/run.sh            # torchrun, DDP on 4 GPUs
#   STAGE=5 bash recipes/aishell1/run.sh                                 # only decode, score and plot again
# Every variable below can be set in the environment. Every stage can be re-run: training resumes from its
# newest checkpoint, and `gmot prepare` skips the shards it already wrote.
set -euo pipefail

CORPUS=${CORPUS:-/data/aishell}              # folder holding data_aishell/ (wav/{train,dev,test}/S*/*.wav, transcript/)
OUT=${OUT:-exp/aishell1}                     # everything this recipe writes goes under here
PLM=${PLM:-bert-base-chinese}                # teacher: a hub id already in your Hugging Face cache, or a local folder
JOBS=${JOBS:-8}                              # feature-extraction processes of `gmot prepare`
NGPU=${NGPU:-1}                              # 0: CPU only (tests), 1: one GPU, N > 1: torchrun with N processes
PRESET=${PRESET:-aishell1}                   # model / training preset (tiny is for tests)
CONFIG=${CONFIG:-recipes/aishell1/conf.yaml} # YAML merged over the preset
EPOCHS=${EPOCHS:-80}                         # pretrain epochs
DISTILL_EPOCHS=${DISTILL_EPOCHS:-40}         # epochs from the averaged pretrain model: GM-OT, and the control
BEAM=${BEAM:-10}                             # beam width of the beam-search decode
SPEED_PERTURB=${SPEED_PERTURB-0.9,1.0,1.1}   # train speed factors (Kaldi / ESPnet / WeNet's setting); empty: none
SPLITS=${SPLITS:-dev test}                   # splits to decode and score
STAGE=${STAGE:-1}                            # first stage to run (1..7)
STOP_STAGE=${STOP_STAGE:-7}                  # last stage to run
if [ "$NGPU" -gt 0 ]; then DEVICE=${DEVICE:-cuda}; else DEVICE=${DEVICE:-cpu}; fi
# Under torchrun each optimiser step takes one batch per GPU, so an epoch has NGPU times fewer steps: the
# warm-up of conf.yaml (25,000 steps on one GPU) is divided by NGPU to cover the same share of training.
if [ "$NGPU" -gt 1 ]; then WARMUP=${WARMUP:-$((25000 / NGPU))}; fi

DATA=$OUT/data
PRE=$OUT/pretrain     # stage 2: the conformer-CTC baseline
GMOT=$OUT/gmot_fgw    # stage 3: GM-OT, initialised from $PRE/avg.pt
CONT=$OUT/baseline    # stage 4: the control, $PRE/avg.pt continued without transfer, same epochs as GM-OT

stage() { [ "$STAGE" -le "$1" ] && [ "$STOP_STAGE" -ge "$1" ]; }
banner() { echo; echo "=== stage $1: $2 ($(date '+%F %T'))"; }

if [ ! -f "$CONFIG" ]; then
  echo "error: config $CONFIG not found (run from the repository root, or set CONFIG=...)" >&2
  exit 2
fi

if stage 1; then
  banner 1 "prepare: fbank shards, CMVN, vocabulary and the $PLM token-feature cache"
  gmot prepare aishell1 "$CORPUS" "$DATA" --plm "$PLM" --jobs "$JOBS" --speed-perturb "$SPEED_PERTURB"
fi

if stage 2; then
  banner 2 "pretrain: conformer-CTC without transfer, $EPOCHS epochs ($NGPU GPU(s), device $DEVICE)"
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
  banner 4 "control: $PRE/avg.pt continued without transfer, $DISTILL_EPOCHS epochs (the same updates as GM-OT)"
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NGPU" -m gmot_cli pretrain "$DATA" "$CONT" --preset "$PRESET" --config "$CONFIG" --init-from "$PRE/avg.pt" --epochs "$DISTILL_EPOCHS" --device "$DEVICE" --set train.warmup_steps="$WARMUP"
  else
    gmot pretrain "$DATA" "$CONT" --preset "$PRESET" --config "$CONFIG" --init-from "$PRE/avg.pt" --epochs "$DISTILL_EPOCHS" --device "$DEVICE"
  fi
fi

if stage 5; then
  banner 5 "decode $SPLITS: greedy CTC (control and GM-OT), beam search K=$BEAM (GM-OT)"
  for split in $SPLITS; do
    gmot decode "$CONT" "$DATA" --split "$split" --method greedy --device "$DEVICE" --out "$CONT/decode_${split}_greedy"
    gmot decode "$GMOT" "$DATA" --split "$split" --method greedy --device "$DEVICE" --out "$GMOT/decode_${split}_greedy"
    gmot decode "$GMOT" "$DATA" --split "$split" --method beam --beam-size "$BEAM" --device "$DEVICE" --out "$GMOT/decode_${split}_beam"
  done
fi

if stage 6; then
  banner 6 "score: CER against the references"
  for split in $SPLITS; do
    for dec in "$CONT/decode_${split}_greedy" "$GMOT/decode_${split}_greedy" "$GMOT/decode_${split}_beam"; do
      gmot score "$DATA/$split" "$dec" --details "$dec/per_utt.txt" > "$dec/score.txt"
      echo "$dec: $(grep -m 1 '%CER' "$dec/score.txt")"
    done
  done
fi

if stage 7; then
  banner 7 "plot-alignment: transport plans of the 3 worst test utterances (WD beside GM-OT)"
  gmot plot-alignment "$GMOT" "$DATA" --split test --worst 3 --compare wd,fgw --device "$DEVICE" --out "$GMOT/alignments/worst.png"
fi

# The result table: CER (%) from each score.txt. The published figures are greedy CTC without an LM.
cer() { if [ -f "$1/score.txt" ]; then grep -o '%CER [0-9.]*' "$1/score.txt" | head -n 1 | cut -d' ' -f2; else echo "-"; fi; }
row() { printf '%-44s %8s %8s\n' "$@"; }
echo
row "AISHELL-1 CER (%)" "dev" "test"
row "baseline, no transfer ($EPOCHS + $DISTILL_EPOCHS ep.), greedy" "$(cer "$CONT/decode_dev_greedy")" "$(cer "$CONT/decode_test_greedy")"
row "GM-OT fgw ($EPOCHS + $DISTILL_EPOCHS ep.), greedy" "$(cer "$GMOT/decode_dev_greedy")" "$(cer "$GMOT/decode_test_greedy")"
row "GM-OT fgw ($EPOCHS + $DISTILL_EPOCHS ep.), beam $BEAM" "$(cer "$GMOT/decode_dev_beam")" "$(cer "$GMOT/decode_test_beam")"
row "published conformer-CTC baseline, greedy" "5.53" "6.05"
row "published WD-OT transfer, greedy" "3.96" "4.27"
row "published hierarchical Sinkhorn att., greedy" "3.64" "3.94"
echo "alignment plots: $GMOT/alignments/"
