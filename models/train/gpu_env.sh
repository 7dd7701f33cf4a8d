# Sourced by the GPU recipes (gpu_run.sh, gpu_vlm.sh) on a bare machine, from the
# repository root, with T0 (the start), INPUT and WORK (with WORK/meta made) set: defines
# `elapsed` and `say` (a timed line to stderr and WORK/meta/run.log), installs the fonts
# vlm_data draws with from $INPUT/fonts where missing, and makes codevista importable
# without installing it (training needs torch, tokenizers, safetensors, pillow and numpy).
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed) s] $*" | tee -a "$WORK/meta/run.log" >&2; }
for f in "$INPUT"/fonts/*.ttf; do
    case "$(basename "$f")" in Liberation*) d=/usr/share/fonts/truetype/liberation ;;
                               *) d=/usr/share/fonts/truetype/dejavu ;; esac
    [ -f "$d/$(basename "$f")" ] || { mkdir -p "$d" && cp "$f" "$d/"; } || true
done
mkdir -p "$WORK/pkg/codevista"
ln -sfn "$PWD/models" "$WORK/pkg/codevista/models"
ln -sfn "$PWD/server" "$WORK/pkg/codevista/server"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
