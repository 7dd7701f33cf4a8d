#!/usr/bin/env bash
# Two VLM continuations side by side on one GPU, within a time budget: the same data mix,
# two learning rates, from one exported VLM (or one each: INIT_A, INIT_B). The small model
# leaves the GPU mostly idle, so the runs share it and split the CPU cores that draw the
# pictures. Run from the repository root. Inputs (they travel to the machine, so only
# what is needed):
#   $INPUT/init/   an exported VLM (config.json, model.safetensors, tokenizer files, ...);
#                  INIT_A / INIT_B name other folders per run
#   $INPUT/fonts/  the fonts vlm_data draws with (DejaVu, Liberation Mono), installed if
#                  missing
# Outputs in $OUT: A.safetensors.part*, B.safetensors.part* (float32, split under the size a
# returned file may have), meta.tar.gz (configs, logs, loss plots).
#
#   BUDGET=450 INPUT=.gpu OUT=/tmp/out bash models/train/gpu_vlm.sh
#
# LR_A, LRS_A, LR_B, LRS_B: learning rate and language-model scale of each run (3e-4 x 1.0,
# 1e-3 x 0.5); WARMUP (100); EXTRA: more arguments for both (e.g. --novel-text 0.8; OCR
# lines in explanations too: --ocr-tasks describe-diagram,explain --chart-share 0.35; for
# reading: --patch 8 --read-weight 1.0 --read-batch 128 --read-transcribe 0.3, the init's
# tower resized to 8 px patches, as the VLM's model card explains).
# COPY_BIAS: the exported models' OCR copy bias (the shipped model's 3.0).
# BUDGET: seconds from the start after which both trainings have ended (the export and
# packing take about 15 s more). DEVICE=cpu SMOKE=1 runs the same flow at toy sizes.
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-450}
INPUT=${INPUT:-.gpu}
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/gpu-vlm}
PY=${PY:-python3}
rm -rf "$WORK"
mkdir -p "$WORK/meta" "$OUT"

# say / elapsed; the pictures drawn in the fonts the evaluation uses; codevista importable
source models/train/gpu_env.sh
(nvidia-smi || true) > "$WORK/meta/nvidia-smi.txt" 2>&1
say "start: $($PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), torch.get_num_threads())' 2>&1)"

if [ "$SMOKE" = 1 ]; then
    SIZE="--batch 8 --warmup 5"; WORKERS_A=1; WORKERS_B=1
else
    CORES=$(nproc)
    SIZE="--batch 256 --warmup ${WARMUP:-100}"
    WORKERS_A=$(( (CORES - 2) / 2 )); WORKERS_B=$(( CORES - 2 - WORKERS_A ))
fi
MIX="--ocr-rate 0.5 --novel-words 0.8 --diagram-share 0.15 --scene-share 0.6 --pad longest
     --scene-weights locate=3,locate_one=1,count=5,count_shape=2,color=1,shape=1,describe=2
     --box-tokens regular --first-coord-weight 3 ${EXTRA:-}"
TRAIN_BUDGET=$(( BUDGET - $(elapsed) ))
say "training: budget $TRAIN_BUDGET s, workers $WORKERS_A + $WORKERS_B"
run() {  # name, workers, lr, lm-lr-scale, seed, init
    OMP_NUM_THREADS=1 $PY -m codevista.models.train.vlm train --run "$WORK/$1" \
        --init-vlm "$6" --device "$DEVICE" $SIZE --workers "$2" --lr "$3" \
        --lm-lr-scale "$4" --steps 100000 --time-budget "$TRAIN_BUDGET" \
        --save-every 1000000 --log-every 50 --seed "$5" $MIX > "$WORK/meta/$1.log" 2>&1
    echo "exit $?" >> "$WORK/meta/$1.log"
}
run A "$WORKERS_A" "${LR_A:-3e-4}" "${LRS_A:-1.0}" 14 "${INIT_A:-$INPUT/init}" &
PID_A=$!
run B "$WORKERS_B" "${LR_B:-1e-3}" "${LRS_B:-0.5}" 15 "${INIT_B:-$INPUT/init}" &
PID_B=$!
wait "$PID_A" "$PID_B"
say "trained: A $(tail -1 "$WORK/meta/A.log"), B $(tail -1 "$WORK/meta/B.log")"

for r in A B; do
    $PY -m codevista.models.train.vlm export --run "$WORK/$r" --out "$WORK/$r-hf" \
        --ocr-copy-bias "${COPY_BIAS:-3.0}" \
        >> "$WORK/meta/run.log" 2>&1
    f="$WORK/$r-hf/model.safetensors"
    [ -f "$f" ] && split -b 15M -d "$f" "$OUT/$r.safetensors.part"
    mkdir -p "$WORK/meta/$r"
    cp "$WORK/$r-hf"/*.json "$WORK/$r/loss.png" "$WORK/$r/ckpt/state.json" "$WORK/meta/$r/" \
        2>/dev/null
done
say "done"
tar -czf "$OUT/meta.tar.gz" -C "$WORK" meta
ls -la "$OUT" >&2
