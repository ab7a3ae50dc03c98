"""Run by test_zero3.py in a fresh process: stage-1 save/load of a ZeRO-3-partitioned TunaForCausalLM.

Usage: python zero3_partial_save.py LLM_DIR TOKENIZER_DIR OUT_DIR  (env: MASTER_PORT)
Prints one JSON line with the checks' results.
"""

import json
import os
import sys

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from datastore.clip import ClipSpec  # noqa: E402
from tuna.modeling_tuna import TunaForCausalLM  # noqa: E402

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def engine(llm_dir: str, tokenizer, seed: int):
    torch.manual_seed(seed)
    model = TunaForCausalLM.from_components(llm_dir, ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2)
    reference = model.trainable_state_dict()
    wrapped, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ZERO3)
    return wrapped.module, reference


def main(llm_dir: str, tokenizer_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    deepspeed.init_distributed(dist_backend="gloo")
    first, reference = engine(llm_dir, tokenizer, seed=1)
    param = first.connector[0].weight
    result = {"partitioned": hasattr(param, "ds_id") and param.numel() == 0}
    gathered = first.trainable_state_dict()
    result["gathered_equal"] = all(torch.equal(reference[k], gathered[k]) for k in reference)
    first.save_trainable(out)
    second, other = engine(llm_dir, tokenizer, seed=2)
    result["differs_before_load"] = not torch.equal(other["connector.0.weight"], reference["connector.0.weight"])
    second.load_trainable(out)
    loaded = second.trainable_state_dict()
    result["loaded_equal"] = all(torch.equal(reference[k], loaded[k]) for k in reference)
    print(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
