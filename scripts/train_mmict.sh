#!/usr/bin/env bash
# MMICT in-context tuning (docs/mmict.md): the M-Hub (a BLIP-2-shaped Q-Former) + its FC layer train, CLIP and the
# LLM stay frozen (--freeze_llm true; a full model is still exported for tuna-eval); every sample gets K in 1,2,4
# demonstrations from POOL (tuna-icl pool build), the loss on the query's answer only; AdamW, cosine decay.
# Set DATA (LLaVA JSON), IMAGES, POOL; optional LLM, CLIP, CLIP_PRETRAINED, TEMPLATE, OUT, NGPUS, HOSTFILE,
# DS (zero2.json), RETRIEVER (siir; random, sttr, sit, ...), SHOTS (1,2,4), P (share with demos, 1.0),
# QFORMER (a BLIP-2 checkpoint to start the hub from, e.g. a local Salesforce/blip2-opt-2.7b folder).
# Ablations: --freeze_llm false (the LLM trains too), --mhub_demo_features visual, RETRIEVER=random.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${DATA:?set DATA to the training JSON}" "${IMAGES:?set IMAGES}" "${POOL:?set POOL to a demonstration pool}"
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} --num_gpus "${NGPUS:-8}" train/train.py \
    --deepspeed "${DS:-ds_configs/zero2.json}" \
    --model_name_or_path "${LLM:-lmsys/vicuna-7b-v1.5}" \
    --clip_model "${CLIP:-ViT-L-14-336}" --clip_pretrained "${CLIP_PRETRAINED:-openai}" \
    --stage finetune --freeze_llm true --connector mhub --ablation no_tags --template "${TEMPLATE:-vicuna_v1}" \
    ${QFORMER:+--mhub_qformer "$QFORMER"} \
    --icl_pool "$POOL" --icl_retriever "${RETRIEVER:-siir}" --icl_shots "${SHOTS:-1,2,4}" --icl_p "${P:-1.0}" \
    --data_path "$DATA" --image_folder "$IMAGES" --output_dir "${OUT:-runs/mmict}" \
    --bf16 true --num_train_epochs 1 --per_device_train_batch_size $(( 128 / ${NGPUS:-8} )) \
    --learning_rate 1e-4 --weight_decay 0.05 --warmup_steps 0.03 --lr_scheduler_type cosine \
    --max_length 2048 --dataloader_num_workers 4 \
    --logging_steps 1 --save_strategy steps --save_steps 500 --save_total_limit 2 \
    --report_to tensorboard "$@"
