"""Experiment: does multiplying tag-token input embeddings by a weight survive a pre-norm (RMSNorm) LLM?

Random-init 4-layer Llama (hidden 64), 16 sequences of 24 tokens, tokens 6..10 play a tag. Prints the
relative change of the last position's logits when the tag tokens are scaled, masked out, or replaced.

    python bench/exp_rmsnorm_scaling.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
m = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 1000, (16, 24))
x = m.get_input_embeddings()(ids)
tag = slice(6, 11)
def logits(emb, mask=None):
    with torch.no_grad():
        return m(inputs_embeds=emb, attention_mask=mask).logits[:, -1]
base = logits(x)
for s in (0.1, 0.5, 2.0, 10.0):
    y = x.clone(); y[:, tag] *= s
    print(f"scale tag tokens x{s:<4}: rel. change of last logits {((logits(y)-base).norm()/base.norm()).item():.4f}")
mask = torch.ones(16, 24, dtype=torch.long); mask[:, tag] = 0
print(f"mask tag tokens out     : rel. change {((logits(x, mask)-base).norm()/base.norm()).item():.4f}")
y = x.clone(); y[:, tag] = m.get_input_embeddings()(torch.randint(0, 1000, (16, 5)))
print(f"replace tag tokens      : rel. change {((logits(y)-base).norm()/base.norm()).item():.4f}")
