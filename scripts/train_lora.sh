#!/usr/bin/env bash
# Stage 2 with LoRA (r 128, alpha 256 on all linear layers of the LLM; connector + tag encoder fully
# trained), from the stage-1 checkpoint. Same variables as train_finetune.sh. The exported directory
# keeps the adapters (config.lora) and loads with TunaForCausalLM.from_pretrained; merge_lora() folds them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${DATA:?set DATA to the instruction JSON}" "${IMAGES:?set IMAGES}" "${CACHE:?set CACHE}"
: "${STAGE1:?set STAGE1 to the stage-1 output directory}"
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} --num_gpus "${NGPUS:-8}" train/train.py \
    --deepspeed "${DS:-ds_configs/zero3.json}" \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --clip_model "${CLIP:-ViT-L-14-336}" --clip_pretrained "${CLIP_PRETRAINED:-openai}" \
    --stage lora --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 \
    --template "${TEMPLATE:-vicuna_v1}" --stage1_checkpoint "$STAGE1" \
    --data_path "$DATA" --image_folder "$IMAGES" --retrieval_cache "$CACHE" \
    --group_by_modality_length true --output_dir "${OUT:-runs/tuna-lora}" \
    --bf16 true --num_train_epochs 1 --per_device_train_batch_size $(( 128 / ${NGPUS:-8} )) \
    --learning_rate 2e-4 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
    --max_length 2048 --activation_checkpointing true --dataloader_num_workers 4 \
    --logging_steps 1 --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --report_to tensorboard "$@"
