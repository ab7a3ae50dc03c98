#!/usr/bin/env bash
# Stage 2 (instruction tuning): LLM + connector + tag encoder trainable, starting from the stage-1
# checkpoint; template vicuna_v1 (chat_template for Qwen2-style LLMs). LLaVA-1.5 settings (128 per step).
# Set DATA (e.g. llava_v1_5_mix665k.json), IMAGES, CACHE, STAGE1; optional LLM, CLIP, CLIP_PRETRAINED,
# TEMPLATE, OUT, NGPUS, HOSTFILE, DS (zero3.json; zero3_offload.json for small GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${DATA:?set DATA to the instruction JSON}" "${IMAGES:?set IMAGES}" "${CACHE:?set CACHE}"
: "${STAGE1:?set STAGE1 to the stage-1 output directory}"
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} --num_gpus "${NGPUS:-8}" train/train.py \
    --deepspeed "${DS:-ds_configs/zero3.json}" \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --clip_model "${CLIP:-ViT-L-14-336}" --clip_pretrained "${CLIP_PRETRAINED:-openai}" \
    --stage finetune --template "${TEMPLATE:-vicuna_v1}" --stage1_checkpoint "$STAGE1" \
    --data_path "$DATA" --image_folder "$IMAGES" --retrieval_cache "$CACHE" \
    --group_by_modality_length true --output_dir "${OUT:-runs/tuna}" \
    --bf16 true --num_train_epochs 1 --per_device_train_batch_size $(( 128 / ${NGPUS:-8} )) \
    --learning_rate 2e-5 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --max_length 2048 --activation_checkpointing true --dataloader_num_workers 4 \
    --logging_steps 1 --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --report_to tensorboard "$@"
