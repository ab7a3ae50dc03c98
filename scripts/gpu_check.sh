#!/usr/bin/env bash
# Every GPU measurement of issue 28 in one run: datastore build vs encoder speed (§1), CUDA training
# tokens/s, MFU and peak memory per ZeRO stage (§2), the quickstart on a GPU (§3).
#
#   bash scripts/gpu_check.sh OUTDIR                         # on one GPU: ~8 min (budget GPU_CHECK_BUDGET_S=470)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh OUTDIR    # dry run on CPU at tiny sizes (tests/bench)
#
# On the lent GPU machine (python3 there has torch + CUDA; .gpu/setup.sh installs the rest from .whl/):
#   bash .gpu/setup.sh && export PATH="$(python3 -c 'import sys; print(sys.prefix)')/bin:$PATH" && \
#       bash scripts/gpu_check.sh $OUT
#
# Stages, in order; each has its own timeout (none runs past what is left of the budget), and a stage that
# fails or times out is recorded and the next one runs:
#   probe            torch / CUDA / torchvision versions, the GPU's name and memory          -> probe.json
#   build_workers    bench/bench_build.py ViT-L-14 bf16, batch 256, 15 workers, 10,000 CC3M-like JPEGs
#                    (448 px, quality 90), PIL decode in the workers, copy overlap on       -> build_workers.json
#   build_gpu_decode the same shards with --decode-device cuda (nvJPEG, batched)            -> build_gpu_decode.json
#   train_pretrain   bench/bench_train.py: random-init Llama-7B shape + ViT-L-14-336, bf16, LLM frozen
#                    (LLaVA stage 1), TUNA, ZeRO-2 then ZeRO-3, batch 4, 8 steps           -> train_pretrain.json
#   quickstart       tuna quickstart --device cuda --nproc 1 at the test suite's smoke sizes -> quickstart_stages.json
#   train_finetune   bench/bench_train.py: Llama-7B-wide (4096, MLP 11008) x 8 layers, LLM trainable
#                    (full fine-tune; 32 layers need ~112 GB of model states), ZeRO-2       -> train_finetune.json
# GPU_CHECK_STAGES=a,b,... runs only those (the others are recorded as skipped);
# GPU_CHECK_TIMEOUT_<stage>=S overrides one stage's timeout. Estimated on one H100: probe 10 s, builds 60 + 50 s,
# train_pretrain ~130 s, quickstart ~250 s (4 DeepSpeed launches, 8 tuna-eval runs), so within the default budget
# the quickstart may be cut short (its finished stages' seconds are still reported) and train_finetune skipped;
# run them alone with e.g. GPU_CHECK_STAGES=quickstart,train_finetune GPU_CHECK_TIMEOUT_quickstart=400.
#
# Expected outputs in OUTDIR: summary.md (tables: build img/s end to end, encoder alone with the copy and on
# the device, their ratio against the goal 0.90, stage seconds, decode fallbacks; training tokens/s, TFLOP/s,
# MFU against the goal 40 %, peak MB per ZeRO stage; quickstart stage seconds; every stage's status and
# seconds), summary.json (the same, machine-readable: keys device, mode, commit, total_s, stages, build,
# train, quickstart, goals), one <stage>.log per stage and the JSON files named above.
# What to expect on an H100/H200 (the H200 at 08afd89, before the levers): encoder alone ~2,350 img/s at
# ViT-L-14 bf16, build 804 img/s (ratio 0.34); the goals are ratio >= 0.90 and MFU >= 40 %.
set -uo pipefail

OUTDIR="${1:?usage: scripts/gpu_check.sh OUTDIR}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch-ext}"
START=$(date +%s)
STAGES_ALL="probe build_workers build_gpu_decode train_pretrain quickstart train_finetune"
ONLY=",${GPU_CHECK_STAGES:-${STAGES_ALL// /,}},"
printf '%s\n' "$(date -u +%FT%TZ)" >"$OUTDIR/started.txt"
: >"$OUTDIR/stages.jsonl"

if [ "$DEVICE" = "cpu" ]; then  # dry run: the same code paths at sizes that take seconds
  BUILD=(--model tuna-tiny-clip --device cpu --precision fp32 --batch-size 32 --num-workers 1 --n-images 128
         --shard-size 64 --photo-size 160 --threads 1 --encoder-batches 2)
  DECODE=cpu
  TRAIN=(--device cpu --dtype fp32 --nproc 1 --steps 3 --warmup 1 --repeats 1 --no-reference --n-corpus 200)
  PRETRAIN=(--stage pretrain --variants tuna --zero 2 --llm-hidden 64 --llm-layers 1 --batch-size 2)
  FINETUNE=(--stage finetune --variants tuna --zero 2 --llm-hidden 64 --llm-layers 1 --batch-size 2)
  QS=(--device cpu --nproc 1 --corpus-size 300 --n-instruct 60 --n-eval 16 --no-swap --clip-steps 5
      --llm-steps 5 --llm-induction-steps 5 --stage1-steps 2 --steps 3)
  declare -A TIMEOUT=([probe]=30 [build_workers]=120 [build_gpu_decode]=90 [train_pretrain]=240 [quickstart]=600
                      [train_finetune]=240)
else
  BUILD=(--model ViT-L-14 --device "$DEVICE" --precision bf16 --batch-size 256 --num-workers 15 --n-images 10000
         --shard-size 500 --photo-size 448 --encoder-batches 4)
  DECODE="$DEVICE"
  TRAIN=(--device cuda --dtype bf16 --nproc 1 --steps 8 --warmup 3 --repeats 1 --no-reference --clip ViT-L-14-336
         --batch-size 4)
  PRETRAIN=(--stage pretrain --variants tuna --zero 2,3 --llm-shape llama-7b)
  FINETUNE=(--stage finetune --variants tuna --zero 2 --llm-type llama --llm-hidden 4096 --llm-layers 8
            --llm-heads 32 --llm-kv-heads 32 --llm-intermediate 11008)
  QS=(--device cuda --nproc 1 --corpus-size 2000 --n-instruct 400 --n-eval 48 --swap-corpus-size 600
      --clip-steps 60 --llm-steps 60 --llm-induction-steps 30 --stage1-steps 8 --steps 30)
  declare -A TIMEOUT=([probe]=20 [build_workers]=90 [build_gpu_decode]=70 [train_pretrain]=140 [quickstart]=230
                      [train_finetune]=100)
fi

record() {  # stage status rc seconds timeout reason
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "log": "%s.log", "reason": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$1" "$6" >>"$OUTDIR/stages.jsonl"
}

stage() {  # name command...: run with the stage's timeout (capped by the budget left), record the outcome
  local name="$1"; shift
  if [[ "$ONLY" != *",$name,"* ]]; then record "$name" skipped null 0 null "not in GPU_CHECK_STAGES"; return; fi
  local left=$((BUDGET - ($(date +%s) - START)))
  local override="GPU_CHECK_TIMEOUT_$name"
  local limit="${!override:-${TIMEOUT[$name]}}"
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 15 ]; then record "$name" skipped null 0 null "budget of ${BUDGET} s spent"; return; fi
  echo "== $name (timeout ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$? seconds=$(( $(date +%s) - t0 ))
  local status=ok reason=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; reason="ran past ${limit} s"
  elif [ "$rc" -ne 0 ]; then status=failed
    reason="$(grep -v '^\s*$' "$OUTDIR/$name.log" | tail -1 | cut -c1-200 | tr -d '"\\' )"; fi
  record "$name" "$status" "$rc" "$seconds" "$limit" "$reason"
  echo "   $name: $status in ${seconds} s"
}

stage probe "$PY" -c "
import json, sys, torch, torchvision, transformers
info = {'python': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__,
        'transformers': transformers.__version__, 'cuda': torch.version.cuda, 'device': 'cpu', 'memory_gb': None}
if '$DEVICE' != 'cpu':
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, memory_gb=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
json.dump(info, open('$OUTDIR/probe.json', 'w'), indent=1)
print(info)"

stage build_workers "$PY" bench/bench_build.py "${BUILD[@]}" --world "$WORK/build_world" \
  --json "$OUTDIR/build_workers.json"
stage build_gpu_decode "$PY" bench/bench_build.py "${BUILD[@]}" --world "$WORK/build_world" \
  --decode-device "$DECODE" --json "$OUTDIR/build_gpu_decode.json"
stage train_pretrain "$PY" bench/bench_train.py "${TRAIN[@]}" "${PRETRAIN[@]}" --json "$OUTDIR/train_pretrain.json" \
  --md "$OUTDIR/train_pretrain.md"
stage quickstart "$PY" -m pipeline.cli quickstart --out "$WORK/quickstart" "${QS[@]}"
# the stage seconds of whatever finished, also after a timeout
[ -f "$WORK/quickstart/stages.json" ] && cp "$WORK/quickstart/stages.json" "$OUTDIR/quickstart_stages.json"
stage train_finetune "$PY" bench/bench_train.py "${TRAIN[@]}" "${FINETUNE[@]}" --json "$OUTDIR/train_finetune.json" \
  --md "$OUTDIR/train_finetune.md"

"$PY" bench/gpu_check_summary.py "$OUTDIR" --mode "$DEVICE" --total-s $(( $(date +%s) - START )) \
  --commit "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "summary: $OUTDIR/summary.md"
