#!/usr/bin/env bash
# Stage 1 (connector pretraining): train the connector + image-aware tag encoder, LLM frozen, template
# "plain"; saves only what it trained (tuna_trainable.safetensors). LLaVA-1.5 settings (256 per step).
# Set DATA, IMAGES, CACHE (retrieval cache of DATA's images); optional LLM, CLIP, CLIP_PRETRAINED, OUT,
# NGPUS, HOSTFILE, MASTER_PORT, DS. Extra arguments are passed to train/train.py (e.g. --max_steps 10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${DATA:?set DATA to the LLaVA pretraining JSON (e.g. blip_laion_cc_sbu_558k.json)}"
: "${IMAGES:?set IMAGES to its image folder}" "${CACHE:?set CACHE to its retrieval cache (tuna-datastore cache)}"
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} --num_gpus "${NGPUS:-8}" train/train.py \
    --deepspeed "${DS:-ds_configs/zero2.json}" \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --clip_model "${CLIP:-ViT-L-14-336}" --clip_pretrained "${CLIP_PRETRAINED:-openai}" \
    --stage pretrain --template plain \
    --data_path "$DATA" --image_folder "$IMAGES" --retrieval_cache "$CACHE" \
    --output_dir "${OUT:-runs/tuna-stage1}" \
    --bf16 true --num_train_epochs 1 --per_device_train_batch_size $(( 256 / ${NGPUS:-8} )) \
    --learning_rate 1e-3 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --max_length 2048 --activation_checkpointing true --dataloader_num_workers 4 \
    --logging_steps 1 --save_strategy steps --save_steps 1000 --save_total_limit 2 \
    --report_to tensorboard "$@"
