#!/usr/bin/env bash
# One run of both default-model recipes on a machine with a GPU, within a time budget:
# the code model from scratch (a larger shape than the CPU recipe can afford) and the VLM
# continued from the shipped one, side by side on the same GPU. Run from the repository
# root. Inputs (compressed, because they travel to the machine):
#   $INPUT/corpus/{train,valid,test}.jsonl.xz   the corpus (python -m ...train.corpus)
#   $INPUT/pairs/*.java-cs.txt.{java,cs}.xz      CodeXGLUE Java <-> C# (train, valid)
#   $INPUT/fonts/*.ttf                           the fonts vlm_data draws with (DejaVu,
#                                                Liberation Mono), installed if missing
# Made here with, e.g.:
#   mkdir -p .gpu/corpus .gpu/pairs .gpu/fonts && echo /.gpu/ >> .git/info/exclude
#   for s in train valid test; do xz -c CORPUS/$s.jsonl > .gpu/corpus/$s.jsonl.xz; done
#   for f in PAIRS/*.txt.*; do xz -c "$f" > ".gpu/pairs/$(basename "$f").xz"; done
#   cp /usr/share/fonts/truetype/{dejavu,liberation}/<the five fonts> .gpu/fonts/
# Outputs in $OUT: code.f16.safetensors.part* (fp16, split), vlm.safetensors.part*
# (float32, split), meta.tar.gz (configs, logs, loss plots, manifests).
#
#   BUDGET=480 INPUT=.gpu OUT=/tmp/out bash models/train/gpu_run.sh
#
# BUDGET is the number of seconds after which both trainings have ended (exports and
# packing take about 20 s more). DEVICE=cpu with SMOKE=1 runs the same flow in minutes at
# toy sizes, to check it before a GPU is borrowed.
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-480}
INPUT=${INPUT:-.gpu}
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/gpu-work}
PY=${PY:-python3}
SITE=${SITE:-$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
rm -rf "$WORK"
mkdir -p "$WORK/corpus" "$WORK/pairs" "$WORK/meta" "$OUT"

# say / elapsed; the VLM's pictures drawn in the fonts the evaluation uses; codevista
# importable
source models/train/gpu_env.sh
(nvidia-smi || true) > "$WORK/meta/nvidia-smi.txt" 2>&1
$PY -c 'import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())' \
    > "$WORK/meta/versions.txt" 2>&1
say "start: $(cat "$WORK/meta/versions.txt")"

if [ "$SMOKE" = 1 ]; then
    CODE_SHAPE="--dim 64 --layers 2 --heads 2 --kv-heads 1 --ffn 128 --batch 8 --seq-len 256"
    VLM_SIZE="--batch 8 --workers 2 --warmup 20"
    SCALE=0.01; EXTRA_MB=5
else
    CODE_SHAPE="--dim 384 --layers 8 --heads 6 --kv-heads 2 --ffn 896 --batch 128 --seq-len 1024"
    VLM_SIZE="--batch 256 --workers 11 --warmup 300"
    SCALE=100; EXTRA_MB=150
fi

# --- the VLM: starts at once, ends by BUDGET ---------------------------------------------
VLM_BUDGET=$(( BUDGET - $(elapsed) - 15 ))
say "vlm: budget $VLM_BUDGET s"
$PY -m codevista.models.train.vlm train --run "$WORK/vlm" --init-vlm models/default/vlm \
    --device "$DEVICE" $VLM_SIZE --steps 100000 --time-budget "$VLM_BUDGET" \
    --lr 1e-3 --lm-lr-scale 0.5 --save-every 1000000 --log-every 50 \
    --ocr-rate 0.5 --novel-words 0.8 --diagram-share 0.3 --scene-share 0.5 \
    > "$WORK/meta/vlm.log" 2>&1 &
VLM_PID=$!

# --- the code model: data first ------------------------------------------------------------
unxz() { $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
for s in train valid test; do unxz "$INPUT/corpus/$s.jsonl.xz" "$WORK/corpus/$s.jsonl"; done
for f in "$INPUT"/pairs/*.xz; do unxz "$f" "$WORK/pairs/$(basename "${f%.xz}")"; done
say "inputs unpacked"
$PY -m codevista.models.train.corpus --out "$WORK/corpus" --extra-python "$SITE" \
    --extra-out "$WORK/extra.jsonl" --extra-mb "$EXTRA_MB" >> "$WORK/meta/run.log" 2>&1
cp "$WORK/extra.manifest.json" "$WORK/meta/" 2>/dev/null
say "extra python gathered"
$PY -m codevista.models.train.train prepare --corpus "$WORK/corpus" --pairs "$WORK/pairs" \
    --run "$WORK/code" --scale "$SCALE" --pair-passes 2 --tokenizer models/default/code \
    --extra "$WORK/extra.jsonl" > "$WORK/meta/prepare.log" 2>&1
$PY -m codevista.models.train.train pairs --pairs "$WORK/pairs" --run "$WORK/code" \
    >> "$WORK/meta/prepare.log" 2>&1
say "code data prepared: $(grep -h 'M tokens' "$WORK/meta/prepare.log" | tr '\n' ' ')"
CODE_BUDGET=$(( BUDGET - $(elapsed) ))
say "code: budget $CODE_BUDGET s"
$PY -m codevista.models.train.train train --run "$WORK/code" $CODE_SHAPE --device "$DEVICE" \
    --steps 100000 --time-budget "$CODE_BUDGET" --lr 2e-3 --warmup 150 --save-every 100000 \
    --log-every 25 --pair-fraction 0.06 --compile > "$WORK/meta/code.log" 2>&1
say "code model trained (exit $?)"
wait "$VLM_PID"
say "vlm trained (exit $?)"

# --- exports -------------------------------------------------------------------------------
$PY -m codevista.models.train.vlm export --run "$WORK/vlm" --out "$WORK/vlm-hf" \
    --ocr-copy-bias 3.0 >> "$WORK/meta/run.log" 2>&1
$PY - "$WORK" "$OUT" <<'EOF' >> "$WORK/meta/run.log" 2>&1
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

work, out = Path(sys.argv[1]), Path(sys.argv[2])
PART = 15 * 2**20  # under the 16 MiB a returned file may have


def split(path: Path, name: str) -> None:
    data = path.read_bytes()
    for i in range(0, len(data), PART):
        (out / f"{name}.part{i // PART}").write_bytes(data[i:i + PART])


code = work / "code" / "latest-hf" / "model.safetensors"
if code.is_file():
    state = load_file(str(code))
    save_file({k: v.half() for k, v in state.items()}, str(work / "code.f16.safetensors"))
    split(work / "code.f16.safetensors", "code.f16.safetensors")
vlm = work / "vlm-hf" / "model.safetensors"
if vlm.is_file():
    split(vlm, "vlm.safetensors")
EOF
for d in code vlm; do
    mkdir -p "$WORK/meta/$d"
    for f in "$WORK/$d/ckpt/state.json" "$WORK/$d/loss.png" "$WORK/$d/prepare.json" \
             "$WORK/$d-hf"/*.json "$WORK/$d/latest-hf"/*.json; do
        [ -f "$f" ] && cp "$f" "$WORK/meta/$d/"
    done
done
say "done"
tar -czf "$OUT/meta.tar.gz" -C "$WORK" meta
ls -la "$OUT" >&2
