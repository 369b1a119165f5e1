#!/usr/bin/env bash
# The GPU check: what cmaclip does on a GPU, in one run of under 8 minutes, into one summary file.
#
#   bench/gpu_check.sh [--cpu] [--compile] [--steps N] [--out DIR] [WHEELS_DIR]
#
# For a GPU machine with torch, transformers and accelerate preinstalled and no network. Wheels
# the machine lacks (deepspeed and its small dependencies hjson, py-cpuinfo, msgpack, ninja,
# pydantic; ftfy + wcwidth for the tokenizer; webdataset) come in WHEELS_DIR and are installed
# from it alone (pip --no-index); fill it where there is network with e.g.
#   pip download --no-deps -d WHEELS webdataset deepspeed hjson py-cpuinfo ftfy wcwidth ...
# DALI cannot travel (its wheel is 200 MB), so training uses the PIL loader. Parts:
#   1. pytest -m gpu                         (the CUDA-only tests)
#   2. bench/attention.py                    bf16 fused vs naive attention, and which SDPA kernel ran
#   3. shards from the embedded fashion sample (858 products)
#   4. ViT-B/16 training, N steps (100), DDP on every GPU: samples/s, TFLOP/s, MFU, peak memory
#   5. the same under DeepSpeed ZeRO-2
#   6. (--compile) the DDP run again with train.compile=true
# Each part has a time limit, logs to DIR/<part>.log and adds its lines to DIR/summary.txt; a part
# that fails is recorded and the check goes on; the exit status is the number of failed parts.
# --cpu: a dry run on a CPU machine: the GPU parts are skipped or shrunk (tiny preset, 2 CPU
# processes, 6 steps), so the script itself is tested where no GPU is.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CPU=0
COMPILE=0
STEPS=""
OUT="$REPO/runs/gpu-check"
WHEELS=""
while (($#)); do
    case "$1" in
        --cpu | --dry-run) CPU=1 ;;
        --compile) COMPILE=1 ;;
        --steps) STEPS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) WHEELS="$1" ;;
    esac
    shift
done
if ((CPU)); then
    PRESET=tiny BATCH=8 STEPS="${STEPS:-6}" LOG_EVERY=2 PROCESSES=2 WORKERS=1
    DDP_LAUNCHER=cpu.yaml ZERO2_LAUNCHER=cpu-deepspeed.yaml
else
    PRESET=vit-b-16 BATCH=64 STEPS="${STEPS:-100}" LOG_EVERY=20 WORKERS=6
    PROCESSES="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    DDP_LAUNCHER=gpu-ddp.yaml ZERO2_LAUNCHER=gpu-zero2.yaml
    if [[ "$PROCESSES" -lt 1 ]]; then
        echo "gpu_check.sh: torch sees no CUDA device (use --cpu for a dry run)" >&2
        exit 2
    fi
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
cd "$REPO" || exit 2
FAILED=0

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# part NAME SECONDS COMMAND...: run it with a time limit, its output in OUT/NAME.log
part() {
    local name="$1" limit="$2" started status code
    shift 2
    started=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        status=ok
    else
        code=$?
        status="FAILED (exit $code; see $OUT/$name.log)"
        ((code == 124)) && status="TIMED OUT after $limit s (see $OUT/$name.log)"
        FAILED=$((FAILED + 1))
    fi
    say "$name: $status in $((SECONDS - started)) s"
    [[ "$status" == ok ]]
}

say "cmaclip GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( ((CPU)) && echo ', --cpu dry run')"
say "$("$PYTHON" -c 'import sys, torch, transformers, accelerate
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}; {device}")')"

if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl "$WHEELS"/*.tar.gz)
    shopt -u nullglob
    part install 180 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${wheels[@]}"
fi
missing="$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("deepspeed", "ftfy", "yaml", "safetensors", "tqdm") if u.find_spec(m) is None))')"
[[ -n "$missing" ]] && say "not installed: $missing (pass their wheels in WHEELS_DIR)"

if ((CPU)); then
    say "pytest-gpu: skipped (--cpu)"
    part attention 120 "$PYTHON" bench/attention.py --backend-only
else
    part pytest-gpu 150 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
    grep -E "passed|failed|skipped|error" "$OUT/pytest-gpu.log" | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
    part attention 120 "$PYTHON" bench/attention.py
fi
grep -E "^(SDPA backend|attention speedup|roofline)" "$OUT/attention.log" | sed 's/^/  /' | tee -a "$SUMMARY"

SHARDS="$OUT/shards"
part shards 120 "$PYTHON" -m cmaclip shards --input shards/fashion-products/metadata.csv \
    --image-root shards/fashion-products --text-column productDisplayName \
    --tasks masterCategory,subCategory,baseColour,gender,usage --val-fraction 0 --out "$SHARDS" --overwrite --quiet

# train NAME LAUNCHER [key=value ...]: STEPS steps of PRESET on every device, PIL loader
train() {
    local name="$1" launcher="$2"
    shift 2
    rm -rf "${OUT:?}/$name"
    part "$name" 240 "$PYTHON" -m accelerate.commands.launch --config_file "launchers/accelerate/$launcher" \
        --num_processes "$PROCESSES" -m cmaclip.train --config configs/vit-b16-fashiongen.yaml \
        model.pretrained= "model.preset=$PRESET" "data.shards=$SHARDS" data.loader=pil "data.workers=$WORKERS" \
        data.eval_split=none "train.max_steps=$STEPS" "train.batch_size=$BATCH" train.save_every=0 \
        train.export=false train.resume= optim.freeze_backbone_steps=0 "logging.log_every=$LOG_EVERY" \
        "output_dir=$OUT/$name" "$@"
    grep -E "^(training on|loader:|model:|efficiency:)" "$OUT/$name.log" | sed 's/^/  /' | tee -a "$SUMMARY"
}
train ddp "$DDP_LAUNCHER"
if [[ " $missing " == *" deepspeed "* ]]; then
    say "zero2: skipped (deepspeed is not installed)"
else
    train zero2 "$ZERO2_LAUNCHER"
fi
if ((COMPILE)); then
    train ddp-compiled "$DDP_LAUNCHER" train.compile=true
fi

say "failed parts: $FAILED; summary in $SUMMARY"
exit "$FAILED"
