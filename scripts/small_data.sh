#!/usr/bin/env bash
# Your own small dataset on one machine: the quickstart's small-scale recipe (pipeline/quickstart.py,
# QuickstartConfig and train_command) on your data, as the commands a user runs by hand:
#   tuna-datastore train-clip -> tuna-datastore build -> python -m pipeline.text_pretrain ->
#   tuna-datastore cache -> deepspeed train.train stage 1 -> stage 2 -> tuna-eval custom_open/custom_yesno.
# Every number below is the quickstart's; the comment next to it names the QuickstartConfig field (or the
# line of pipeline/quickstart.py) it comes from. The walk-through: docs/quickstart.md, "Your own small
# dataset on one machine". `bash scripts/small_data.sh --help` explains the inputs and outputs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TUNA_VENV:-$ROOT/.venv}"
CALLER_PWD="$PWD"

usage() {
    cat <<'EOF'
usage: bash scripts/small_data.sh --corpus SHARDS --pretrain JSON --instruct JSON --images DIR --out DIR
                                  [--eval-root DIR] [options] [-- EXTRA train/train.py ARGS]

Trains TUNA on your own small dataset with the quickstart's small-scale recipe, on one machine (CPU by
default), through the same commands docs/quickstart.md shows one by one. Every option can also be given
as the environment variable in brackets; a flag wins over the variable.

inputs:
  --corpus SHARDS      [CORPUS]   webdataset shards of image-caption pairs ({key}.jpg + {key}.txt, as
                                  img2dataset writes them), brace patterns or globs, quoted:
                                  'shards/{00000..00009}.tar'. The datastore, the CLIP and the LLM's text.
  --pretrain JSON      [PRETRAIN] LLaVA-format stage-1 data (image + caption conversations).
  --instruct JSON      [INSTRUCT] LLaVA-format stage-2 instruction data.
  --images DIR         [IMAGES]   folder the two JSONs' "image" paths are relative to.
  --eval-root DIR      [EVAL_ROOT] optional: evaluation data root; DIR/custom/open.jsonl (custom_open) and
                                  DIR/custom/yesno.jsonl (custom_yesno), images under DIR/custom/
                                  (docs/eval.md). Without it, or without both files, no evaluation.
  --names FILE         [NAMES]    optional: object/category names, one a line, for the LLM's copy texts.
  --clip-model M       [CLIP_MODEL]      optional, with --clip-pretrained: use this CLIP instead of training
  --clip-pretrained P  [CLIP_PRETRAINED] one: an open_clip name + tag (ViT-B-32 laion2b_s34b_b79k) or a
                                  model-config .json + checkpoint file (e.g. a train-clip output's pair).
  --llm DIR            [LLM]      optional: use this LLM folder instead of text pretraining one (a
                                  pipeline.text_pretrain output: its text_replay.json is mixed into stage 2).
  --template T         [TEMPLATE] stage-2 chat template (default chat_template, the tiny LLM's ChatML;
                                  vicuna_v1 for Vicuna).

sizes (defaults: the quickstart's):
  --nproc N            [NPROC]        training processes, deepspeed --num_gpus (2)
  --device D           [DEVICE]       cpu or cuda (cpu)
  --clip-steps N       [CLIP_STEPS]   CLIP training steps (1000)
  --llm-steps N        [LLM_STEPS]    LLM text-pretraining steps (1500)
  --llm-induction-steps N [LLM_INDUCTION_STEPS]  the LLM's induction warm-up steps before them (800)
  --stage1-steps N     [STAGE1_STEPS] stage-1 (connector) steps (60)
  --steps N            [STEPS]        stage-2 (instruction tuning) steps (300)
  --batch-size N       [BATCH_SIZE]   per-process training batch (8)
  --seed N             [SEED]         seed of every model and data order (0)
  --threads N          [THREADS]      torch threads per training process (0: cores / nproc)
  --baseline           [BASELINE=1]   also train and evaluate the no-tags baseline (same data and budget)

other:
  --out DIR            [OUT]      output folder (required). Re-running the same command skips the stages
                                  already done; other settings in an existing OUT are refused.
  --dry-run            [DRY_RUN=1] print the commands without running them.
  -h, --help           this text.
  -- ARGS              extra arguments for train/train.py, both stages (e.g. -- --bf16 true).

outputs (OUT):
  clip/                  the CLIP (tuna-quickstart-clip.json + .safetensors; not with --clip-model)
  datastore/             the image->tags datastore of the corpus
  llm/                   the LLM, its tokenizer and text_replay.json (not with --llm)
  tags.parquet           retrieved tags of every training image; tags_eval.parquet: of the eval images
  ds_zero2.json          the DeepSpeed config (ds_configs/zero2.json, buckets sized as the quickstart's)
  models/tuna-stage1/    connector + tag encoder;  models/tuna-stage2/: the TUNA model (from_pretrained)
  eval/tuna/             tuna-eval predictions and results.md (baseline: models/baseline-*, eval/baseline)
  logs/STAGE.log         each stage's output;  stages/STAGE.done: its seconds (what a re-run skips)
  settings.txt           the inputs and sizes of this run
EOF
}

die() { echo "error: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------ the recipe
# pipeline/quickstart.py, QuickstartConfig defaults (overridable above) ...
SEED="${SEED:-0}"                    # seed
CLIP_STEPS="${CLIP_STEPS:-1000}"     # clip_steps
CLIP_BATCH=128                       # clip_batch_size
LLM_STEPS="${LLM_STEPS:-1500}"       # llm_steps
LLM_HIDDEN=128                       # llm_hidden
LLM_LAYERS=2                         # llm_layers
LLM_INDUCTION_STEPS="${LLM_INDUCTION_STEPS:-800}"  # llm_induction_steps
TEXT_REPLAY=0.5                      # text_replay: text-only conversations per instruction record
STAGE1_STEPS="${STAGE1_STEPS:-60}"   # stage1_steps
STEPS="${STEPS:-300}"                # steps
BATCH_SIZE="${BATCH_SIZE:-8}"        # batch_size
STAGE1_LR=1e-3                       # stage1_lr
LR=1e-3                              # lr
FREEZE_LLM_EMBEDDINGS=true           # freeze_llm_embeddings
IMAGE_PATCH_POSITIONS=true           # image_patch_positions (the tiny CLIP is a convnet; a ViT would not need it)
NPROC="${NPROC:-2}"                  # nproc
DS_CONFIG=zero2.json                 # ds_config
K_IMAGES=5                           # k_images
MAX_TAGS=6                           # max_tags
EVAL_MIN_TAG_SUPPORT=0.5             # eval_min_tag_support
EVAL_BATCH=32                        # eval_batch_size
THREADS="${THREADS:-0}"              # threads
DEVICE="${DEVICE:-cpu}"              # device
# ... and constants of its stage functions:
CLIP_ARCH=tuna-quickstart-clip       # stage_clip: ClipTrainConfig's default model config
BUILD_BATCH=256 BUILD_WORKERS=1      # stage_datastore: ReaderConfig(batch_size=256, num_workers=1)
CACHE_MAX_TAGS=32 CACHE_WORKERS=1    # stage_datastore: CacheConfig(max_tags=32, num_workers=1)
TAG_HIDDEN_DIM=128 TAG_NUM_HEADS=4 MAX_LENGTH=512  # train_command

# ------------------------------------------------------------------------------------ arguments
CORPUS="${CORPUS:-}" PRETRAIN="${PRETRAIN:-}" INSTRUCT="${INSTRUCT:-}" IMAGES="${IMAGES:-}"
EVAL_ROOT="${EVAL_ROOT:-}" NAMES="${NAMES:-}" OUT="${OUT:-}" LLM="${LLM:-}" TEMPLATE="${TEMPLATE:-chat_template}"
CLIP_MODEL="${CLIP_MODEL:-}" CLIP_PRETRAINED="${CLIP_PRETRAINED:-}"
BASELINE="${BASELINE:-0}" DRY_RUN="${DRY_RUN:-0}"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift; continue ;;
        --baseline) BASELINE=1; shift; continue ;;
        --) shift; EXTRA=("$@"); break ;;
    esac
    [ $# -ge 2 ] || die "$1 needs a value (see --help)"
    case "$1" in
        --corpus) CORPUS="$2" ;;          --pretrain) PRETRAIN="$2" ;;
        --instruct) INSTRUCT="$2" ;;      --images) IMAGES="$2" ;;
        --eval-root) EVAL_ROOT="$2" ;;    --names) NAMES="$2" ;;
        --out) OUT="$2" ;;                --llm) LLM="$2" ;;
        --template) TEMPLATE="$2" ;;      --clip-model) CLIP_MODEL="$2" ;;
        --clip-pretrained) CLIP_PRETRAINED="$2" ;;
        --nproc) NPROC="$2" ;;            --device) DEVICE="$2" ;;
        --clip-steps) CLIP_STEPS="$2" ;;  --llm-steps) LLM_STEPS="$2" ;;
        --llm-induction-steps) LLM_INDUCTION_STEPS="$2" ;;
        --stage1-steps) STAGE1_STEPS="$2" ;; --steps) STEPS="$2" ;;
        --batch-size) BATCH_SIZE="$2" ;;  --seed) SEED="$2" ;;
        --threads) THREADS="$2" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done

# relative paths are the caller's: the commands run from the repository root
absolute() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$CALLER_PWD/$1" ;; esac; }
need_file() { [ -n "$3" ] || die "$1 ($2) not given: $4 (see --help)"; [ -f "$3" ] || die "$1 ($2): file not found: $3"; }
need_dir() { [ -n "$3" ] || die "$1 ($2) not given: $4 (see --help)"; [ -d "$3" ] || die "$1 ($2): folder not found: $3"; }

[ -n "$CORPUS" ] || die "--corpus (CORPUS) not given: the webdataset shards of image-caption pairs (see --help)"
[ -n "$OUT" ] || die "--out (OUT) not given: the output folder (see --help)"
CORPUS="$(absolute "$CORPUS")" OUT="$(absolute "$OUT")"
PRETRAIN="${PRETRAIN:+$(absolute "$PRETRAIN")}" INSTRUCT="${INSTRUCT:+$(absolute "$INSTRUCT")}"
IMAGES="${IMAGES:+$(absolute "$IMAGES")}" EVAL_ROOT="${EVAL_ROOT:+$(absolute "$EVAL_ROOT")}"
NAMES="${NAMES:+$(absolute "$NAMES")}" LLM="${LLM:+$(absolute "$LLM")}"
need_file --pretrain PRETRAIN "$PRETRAIN" "the LLaVA-format stage-1 JSON"
need_file --instruct INSTRUCT "$INSTRUCT" "the LLaVA-format instruction JSON"
need_dir --images IMAGES "$IMAGES" "the folder of the JSONs' images"
[ -z "$EVAL_ROOT" ] || need_dir --eval-root EVAL_ROOT "$EVAL_ROOT" ""
[ -z "$NAMES" ] || need_file --names NAMES "$NAMES" ""
if [ -n "$LLM" ]; then
    need_dir --llm LLM "$LLM" ""
    [ -f "$LLM/config.json" ] || die "--llm (LLM): no config.json in $LLM (not a from_pretrained folder)"
fi
if [ -n "$CLIP_MODEL$CLIP_PRETRAINED" ]; then
    [ -n "$CLIP_MODEL" ] && [ -n "$CLIP_PRETRAINED" ] || die "--clip-model and --clip-pretrained go together"
    case "$CLIP_MODEL" in *.json)
        CLIP_MODEL="$(absolute "$CLIP_MODEL")" CLIP_PRETRAINED="$(absolute "$CLIP_PRETRAINED")"
        need_file --clip-model CLIP_MODEL "$CLIP_MODEL" ""
        need_file --clip-pretrained CLIP_PRETRAINED "$CLIP_PRETRAINED" "" ;;
        *) [ ! -e "$CLIP_PRETRAINED" ] || CLIP_PRETRAINED="$(absolute "$CLIP_PRETRAINED")" ;;  # a tag, or a file
    esac
fi
for n in NPROC CLIP_STEPS LLM_STEPS STAGE1_STEPS STEPS BATCH_SIZE; do
    [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "${n}=${!n}: must be a whole number >= 1"
done
for n in SEED THREADS LLM_INDUCTION_STEPS; do
    [[ "${!n}" =~ ^[0-9]+$ ]] || die "${n}=${!n}: must be a whole number >= 0"
done
case "$DEVICE" in cpu|cuda) ;; *) die "--device $DEVICE: expected cpu or cuda" ;; esac

PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
# Two checks before anything runs: the corpus patterns expand to existing shards (brace patterns, then
# globs, as datastore.reader.expand_shards expands them for every tool; URLs are checked when opened), and
# INSTRUCT is a JSON list (or JSONL), whose length sets the text-only conversations: text_replay per
# instruction record (stage_llm)
read -r -d '' CHECK_INPUTS <<'PYEOF' || true
import glob, json, os, sys
import braceexpand
corpus, instruct, share = sys.argv[1], sys.argv[2], float(sys.argv[3])
shards = []
for url in braceexpand.braceexpand(corpus):
    found = [url] if "://" in url else sorted(glob.glob(url)) if glob.has_magic(url) else [url]
    missing = [f for f in found if "://" not in f and not os.path.isfile(f)]
    if not found or missing:
        sys.exit(f"error: --corpus (CORPUS): shard not found: {missing[0] if missing else url}")
    shards += found
try:
    with open(instruct) as f:
        n = sum(1 for line in f if line.strip()) if instruct.endswith(".jsonl") else len(json.load(f))
except (ValueError, TypeError) as e:
    sys.exit(f"error: --instruct (INSTRUCT): {instruct} is not a LLaVA JSON list ({e})")
print(len(shards), max(1, round(share * n)))
PYEOF
CHECKED="$("$PY" -c "$CHECK_INPUTS" "$CORPUS" "$INSTRUCT" "$TEXT_REPLAY")" || exit 2
read -r N_SHARDS N_REPLAY <<< "$CHECKED"
BENCHES=()
if [ -n "$EVAL_ROOT" ]; then
    [ -f "$EVAL_ROOT/custom/open.jsonl" ] && BENCHES+=(custom_open)
    [ -f "$EVAL_ROOT/custom/yesno.jsonl" ] && BENCHES+=(custom_yesno)
    [ ${#BENCHES[@]} -gt 0 ] || echo "note: neither $EVAL_ROOT/custom/open.jsonl nor yesno.jsonl: no evaluation" >&2
fi

# threads: each training process gets cores / nproc (pipeline.processes.threads_per_process); the
# single-process stages (CLIP, LLM, eval) get all of them, as the quickstart gives them
CORES="$(nproc 2>/dev/null || echo 1)"
PROC_THREADS=$(( THREADS > 0 ? THREADS : (CORES / NPROC > 0 ? CORES / NPROC : 1) ))
ALL_THREADS=$(( PROC_THREADS * NPROC ))
# the environment of every command (pipeline.processes.subprocess_env): offline, unbuffered
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# where each stage writes (the quickstart's layout, pipeline/runs.py Paths)
CLIP_DIR="$OUT/clip" DATASTORE="$OUT/datastore" CACHE="$OUT/tags.parquet" EVAL_CACHE="$OUT/tags_eval.parquet"
DS_FILE="$OUT/ds_$DS_CONFIG" MODELS="$OUT/models"
if [ -n "$LLM" ]; then LLM_DIR="$LLM"; else LLM_DIR="$OUT/llm"; fi
REPLAY_FILE="$LLM_DIR/text_replay.json"
if [ -n "$CLIP_MODEL" ]; then
    case "$CLIP_MODEL" in
        *.json) BUILD_CLIP=(--model-config "$CLIP_MODEL") TRAIN_CLIP=(--clip_model_config "$CLIP_MODEL") ;;
        *) BUILD_CLIP=(--model "$CLIP_MODEL") TRAIN_CLIP=(--clip_model "$CLIP_MODEL") ;;
    esac
    BUILD_CLIP+=(--pretrained "$CLIP_PRETRAINED") TRAIN_CLIP+=(--clip_pretrained "$CLIP_PRETRAINED")
else
    BUILD_CLIP=(--model-config "$CLIP_DIR/$CLIP_ARCH.json" --pretrained "$CLIP_DIR/$CLIP_ARCH.safetensors")
    TRAIN_CLIP=(--clip_model_config "$CLIP_DIR/$CLIP_ARCH.json" --clip_pretrained "$CLIP_DIR/$CLIP_ARCH.safetensors")
fi

# ------------------------------------------------------------------------------------ settings
SETTINGS="CORPUS=$CORPUS
PRETRAIN=$PRETRAIN
INSTRUCT=$INSTRUCT
IMAGES=$IMAGES
EVAL_ROOT=$EVAL_ROOT
NAMES=$NAMES
LLM=$LLM
CLIP_MODEL=$CLIP_MODEL
CLIP_PRETRAINED=$CLIP_PRETRAINED
TEMPLATE=$TEMPLATE
NPROC=$NPROC
DEVICE=$DEVICE
CLIP_STEPS=$CLIP_STEPS
LLM_STEPS=$LLM_STEPS
LLM_INDUCTION_STEPS=$LLM_INDUCTION_STEPS
STAGE1_STEPS=$STAGE1_STEPS
STEPS=$STEPS
BATCH_SIZE=$BATCH_SIZE
SEED=$SEED
BASELINE=$BASELINE
EXTRA=${EXTRA[*]:-}"
if [ -f "$OUT/settings.txt" ] && [ "$(cat "$OUT/settings.txt")" != "$SETTINGS" ]; then
    changed="$( (diff "$OUT/settings.txt" <(echo "$SETTINGS") || true) | sed -n 's/^> //p' | head -3 | paste -sd ' ')"
    die "$OUT holds a run with other settings (now: $changed); use another --out or delete $OUT"
fi
if [ "$DRY_RUN" != 1 ]; then
    bash "$ROOT/scripts/bootstrap.sh"
    mkdir -p "$OUT/logs" "$OUT/stages"
    echo "$SETTINGS" > "$OUT/settings.txt"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

# ------------------------------------------------------------------------------------ stage runner
# show: a command as it can be copied into a shell
show() {
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$a "; continue; fi
        a=${a//\'/\'\\\'\'}  # ' -> '\''
        out+="'$a' "
    done
    echo "+ ${out% }"
}
TOTAL_START=$(date +%s)
STAGE="" STAGE_START=0 ORDER=()
# stage NAME OUTPUT DESCRIPTION: returns 1 (skip) when OUTPUT exists and NAME finished in an earlier run
stage() {
    STAGE="$1" ORDER+=("$1")
    local done="$OUT/stages/$1.done"
    if [ -f "$done" ] && [ -e "$2" ]; then
        echo "== $1: done in an earlier run ($(cat "$done") s), skipped"
        return 1
    fi
    echo "== $1: $3"
    STAGE_START=$(date +%s)
    [ "$DRY_RUN" = 1 ] || : > "$OUT/logs/$1.log"
}
# run CMD...: print it, then run it with its output also in logs/STAGE.log; a failure stops everything
run() {
    show "$@"
    [ "$DRY_RUN" = 1 ] && return 0
    local code=0
    "$@" 2>&1 | tee -a "$OUT/logs/$STAGE.log" || code=$?
    if [ "$code" != 0 ]; then
        echo "error: stage $STAGE failed (exit $code); its output: $OUT/logs/$STAGE.log" >&2
        exit 1
    fi
}
finish() {
    [ "$DRY_RUN" = 1 ] && return 0
    local seconds=$(( $(date +%s) - STAGE_START ))
    echo "$seconds" > "$OUT/stages/$STAGE.done"
    echo "   $STAGE: $seconds s"
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "tuna small-data recipe -> $OUT ($N_SHARDS corpus shards; $NPROC processes on $DEVICE, $PROC_THREADS threads each)"
[ "$DRY_RUN" != 1 ] || echo "(dry run: the commands are printed, not run)"

# 1. the CLIP (stage_clip). Your captions are the text ("caption"; the quickstart's "names" mode reads the
# synthetic world's object lists); the tiny convnet CLIP sees 96-pixel images.
if [ -n "$CLIP_MODEL" ]; then
    echo "== clip: given ($CLIP_MODEL, $CLIP_PRETRAINED), not trained"
elif stage clip "$CLIP_DIR/train.json" "tuna-datastore train-clip ($CLIP_STEPS steps x $CLIP_BATCH pairs)"; then
    run env OMP_NUM_THREADS="$ALL_THREADS" tuna-datastore train-clip --input "$CORPUS" --out "$CLIP_DIR" \
        --model-config "$CLIP_ARCH" --text-mode caption --steps "$CLIP_STEPS" --batch-size "$CLIP_BATCH" \
        --seed "$SEED" --threads "$ALL_THREADS" --device "$DEVICE"
    finish
fi

# 2. the datastore of the corpus with that CLIP (stage_datastore)
if stage datastore "$DATASTORE/manifest.json" "tuna-datastore build"; then
    run env OMP_NUM_THREADS="$ALL_THREADS" tuna-datastore build --input "$CORPUS" --out "$DATASTORE" \
        "${BUILD_CLIP[@]}" --device "$DEVICE" --batch-size "$BUILD_BATCH" --num-workers "$BUILD_WORKERS"
    run tuna-datastore info --datastore "$DATASTORE"
    finish
fi

NAMES_FLAG=()
[ -z "$NAMES" ] || NAMES_FLAG=(--names "$NAMES")
# 3. the LLM: tokenizer + tiny Qwen2 on the corpus captions and generated copy texts, and the text-only
# conversations stage 2 mixes in (stage_llm, llm_pretrain_config)
if [ -n "$LLM" ]; then
    echo "== llm: given ($LLM), not trained"
    [ -f "$REPLAY_FILE" ] || echo "   no $REPLAY_FILE: stage 2 has no text-only conversations mixed in"
elif stage llm "$LLM_DIR/text_pretrain.json" "python -m pipeline.text_pretrain ($LLM_STEPS steps)"; then
    run env OMP_NUM_THREADS="$ALL_THREADS" "$PY" -m pipeline.text_pretrain --input "$CORPUS" \
        "${NAMES_FLAG[@]}" --out "$LLM_DIR" --text-replay "$N_REPLAY" --steps "$LLM_STEPS" \
        --hidden-size "$LLM_HIDDEN" --num-layers "$LLM_LAYERS" --induction-steps "$LLM_INDUCTION_STEPS" \
        --seed "$SEED" --threads "$ALL_THREADS"
    finish
fi

# 4. retrieved tags of every training image (stage_datastore) ...
if stage cache "$CACHE" "tuna-datastore cache of the training images"; then
    run env OMP_NUM_THREADS="$ALL_THREADS" tuna-datastore cache --datastore "$DATASTORE" --out "$CACHE" \
        --image-folder "$IMAGES" --llava-json "$INSTRUCT" "$PRETRAIN" --k-images "$K_IMAGES" \
        --max-tags "$CACHE_MAX_TAGS" --num-workers "$CACHE_WORKERS" --device "$DEVICE"
    finish
fi
# ... and, in a cache of their own (their paths are relative to EVAL_ROOT/custom), of the eval images
EVAL_FILES=()
for b in "${BENCHES[@]}"; do
    if [ "$b" = custom_open ]; then EVAL_FILES+=("$EVAL_ROOT/custom/open.jsonl"); else EVAL_FILES+=("$EVAL_ROOT/custom/yesno.jsonl"); fi
done
if [ ${#EVAL_FILES[@]} -gt 0 ] && stage eval-cache "$EVAL_CACHE" "tuna-datastore cache of the eval images"; then
    run env OMP_NUM_THREADS="$ALL_THREADS" tuna-datastore cache --datastore "$DATASTORE" --out "$EVAL_CACHE" \
        --image-folder "$EVAL_ROOT/custom" --llava-json "${EVAL_FILES[@]}" --k-images "$K_IMAGES" \
        --max-tags "$CACHE_MAX_TAGS" --num-workers "$CACHE_WORKERS" --device "$DEVICE"
    finish
fi

# 5. training (train_command; stage_train). OUT/ds_zero2.json: ds_configs/zero2.json with DeepSpeed's
# default bucket sizes where it says "auto" (pipeline.quickstart.SMALL_LLM_BUCKETS: "auto" makes a
# 128-wide LLM reduce its gradients in dozens of tiny calls)
if [ "$DRY_RUN" = 1 ] || [ ! -f "$DS_FILE" ]; then
    STAGE=ds_config
    run "$PY" -c 'import sys, pathlib, pipeline.quickstart as q, pipeline.runs as r; print(q.ds_config_file(q.QuickstartConfig(ds_config=sys.argv[1]), r.Paths(pathlib.Path(sys.argv[2]))))' "$DS_CONFIG" "$OUT"
fi
CPU_FLAGS=()
[ "$DEVICE" != cpu ] || CPU_FLAGS=(--use_cpu true)
MODEL_NAMES=(tuna)
[ "$BASELINE" != 1 ] || MODEL_NAMES=(baseline tuna)
for name in "${MODEL_NAMES[@]}"; do
    if [ "$name" = tuna ]; then TAGS=(--retrieval_cache "$CACHE"); else TAGS=(--ablation no_tags); fi
    if stage "$name-stage1" "$MODELS/$name-stage1/tuna_trainable.safetensors" "deepspeed stage 1 of $name ($STAGE1_STEPS steps)"; then
        run env OMP_NUM_THREADS="$PROC_THREADS" deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$(free_port)}" \
            --module train.train --deepspeed "$DS_FILE" --model_name_or_path "$LLM_DIR" --stage pretrain \
            "${TRAIN_CLIP[@]}" --data_path "$PRETRAIN" --image_folder "$IMAGES" --template plain \
            --output_dir "$MODELS/$name-stage1" --max_steps "$STAGE1_STEPS" \
            --per_device_train_batch_size "$BATCH_SIZE" --learning_rate "$STAGE1_LR" --lr_scheduler_type cosine \
            --warmup_steps 0.03 --weight_decay 0.0 --logging_steps $(( STAGE1_STEPS / 10 > 0 ? STAGE1_STEPS / 10 : 1 )) \
            --save_strategy no --report_to none --seed "$SEED" --dataloader_num_workers 0 --disable_tqdm true \
            --max_tags "$MAX_TAGS" --tag_hidden_dim "$TAG_HIDDEN_DIM" --tag_num_heads "$TAG_NUM_HEADS" \
            --max_length "$MAX_LENGTH" "${TAGS[@]}" --image_patch_positions "$IMAGE_PATCH_POSITIONS" \
            "${CPU_FLAGS[@]}" "${EXTRA[@]}"
        finish
    fi
    REPLAY=()  # text_replay.json: written by stage 3, or in the given LLM folder if it has one
    if [ -z "$LLM" ] || [ -f "$REPLAY_FILE" ]; then REPLAY=("$REPLAY_FILE"); fi
    if stage "$name-stage2" "$MODELS/$name-stage2/config.json" "deepspeed stage 2 of $name ($STEPS steps)"; then
        run env OMP_NUM_THREADS="$PROC_THREADS" deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$(free_port)}" \
            --module train.train --deepspeed "$DS_FILE" --model_name_or_path "$LLM_DIR" --stage finetune \
            "${TRAIN_CLIP[@]}" --data_path "$INSTRUCT" "${REPLAY[@]}" --image_folder "$IMAGES" \
            --template "$TEMPLATE" --output_dir "$MODELS/$name-stage2" --max_steps "$STEPS" \
            --per_device_train_batch_size "$BATCH_SIZE" --learning_rate "$LR" --lr_scheduler_type cosine \
            --warmup_steps 0.03 --weight_decay 0.0 --logging_steps $(( STEPS / 10 > 0 ? STEPS / 10 : 1 )) \
            --save_strategy no --report_to none --seed "$SEED" --dataloader_num_workers 0 --disable_tqdm true \
            --max_tags "$MAX_TAGS" --tag_hidden_dim "$TAG_HIDDEN_DIM" --tag_num_heads "$TAG_NUM_HEADS" \
            --max_length "$MAX_LENGTH" "${TAGS[@]}" --stage1_checkpoint "$MODELS/$name-stage1" \
            --freeze_llm_embeddings "$FREEZE_LLM_EMBEDDINGS" --image_patch_positions "$IMAGE_PATCH_POSITIONS" \
            "${CPU_FLAGS[@]}" "${EXTRA[@]}"
        finish
    fi
done

# 6. evaluation on your questions (eval_command; stage_eval): TUNA reads majority-supported tags only
if [ ${#BENCHES[@]} -gt 0 ]; then
    BENCH="$(IFS=,; echo "${BENCHES[*]}")"
    for name in "${MODEL_NAMES[@]}"; do
        if [ "$name" = tuna ]; then
            TAGS=(--retrieval-cache "$EVAL_CACHE" --datastore "$DATASTORE" --min-tag-support "$EVAL_MIN_TAG_SUPPORT")
        else
            TAGS=(--no-tags)
        fi
        if stage "eval-$name" "$OUT/eval/$name/results.json" "tuna-eval $BENCH ($name)"; then
            run env OMP_NUM_THREADS="$ALL_THREADS" tuna-eval --model "$MODELS/$name-stage2" --bench "$BENCH" \
                --data-root "$EVAL_ROOT" --out "$OUT/eval/$name" --batch-size "$EVAL_BATCH" --device "$DEVICE" \
                --k-images "$K_IMAGES" "${TAGS[@]}"
            finish
        fi
    done
    if [ "$BASELINE" = 1 ]; then
        STAGE=compare
        run tuna-eval compare "$OUT/eval/baseline" "$OUT/eval/tuna"
    fi
fi

if [ "$DRY_RUN" != 1 ]; then
    echo "stage seconds: $(for s in "${ORDER[@]}"; do printf '%s %s, ' "$s" "$(cat "$OUT/stages/$s.done")"; done)this run $(( $(date +%s) - TOTAL_START )) s"
    echo "written: models $MODELS; datastore $DATASTORE; eval outputs $OUT/eval; logs $OUT/logs"
fi
