# Sourced by the GPU recipes (gpu_run.sh, gpu_vlm.sh) on a bare machine, from the
# repository root, with INPUT and WORK set: installs the fonts vlm_data draws with from
# $INPUT/fonts where missing, and makes codevista importable without installing it
# (training needs torch, tokenizers, safetensors, pillow and numpy only).
for f in "$INPUT"/fonts/*.ttf; do
    case "$(basename "$f")" in Liberation*) d=/usr/share/fonts/truetype/liberation ;;
                               *) d=/usr/share/fonts/truetype/dejavu ;; esac
    [ -f "$d/$(basename "$f")" ] || { mkdir -p "$d" && cp "$f" "$d/"; } || true
done
mkdir -p "$WORK/pkg/codevista"
ln -sfn "$PWD/models" "$WORK/pkg/codevista/models"
ln -sfn "$PWD/server" "$WORK/pkg/codevista/server"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
