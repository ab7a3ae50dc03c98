"""Experiment: how to apply per-tag weights in a pre-norm (RMSNorm) LLM.

Random-init 4-layer Llama (hidden 64), 16 sequences of 24 tokens; tokens 6..10 play one tag.
Prints the relative change of the last position's logits when the tag's input embeddings are
scaled by w (the literal TUNA rule), when an additive attention bias log(w) is put on the tag's key
columns through a 4D float attention mask, when the tag is masked out, or replaced.

    python experiments/exp_rmsnorm_scaling.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
model = LlamaForCausalLM(cfg).eval()
B, L, TAG = 16, 24, slice(6, 11)
ids = torch.randint(0, 1000, (B, L))
x = model.get_input_embeddings()(ids)


def logits(emb, mask=None):
    with torch.no_grad():
        return model(inputs_embeds=emb, attention_mask=mask).logits[:, -1]


def bias_mask(bias: float) -> torch.Tensor:
    causal = torch.full((L, L), float("-inf")).triu(1)
    mask = causal.expand(B, 1, L, L).clone()  # (B, 1, Lq, Lk) additive
    mask[..., TAG] += bias
    return mask


def rel(a, b) -> float:
    return ((a - b).norm() / base.norm()).item()


base = logits(x)
pad = torch.ones(B, L, dtype=torch.long)
pad[:, TAG] = 0
masked = logits(x, pad)
print(f"4D zero-bias mask equals the default causal mask: {torch.allclose(logits(x, bias_mask(0.0)), base, atol=1e-5)}")
print(f"{'w':>6} {'scale: change':>14} {'scale: to masked':>17} {'bias: change':>13} {'bias: to masked':>16}")
for w in (1e-6, 0.1, 0.5, 2.0, 10.0):
    scaled = x.clone()
    scaled[:, TAG] *= w
    s, b = logits(scaled), logits(x, bias_mask(float(torch.log(torch.tensor(w)))))
    print(f"{w:>6g} {rel(s, base):>14.4f} {rel(s, masked):>17.4f} {rel(b, base):>13.4f} {rel(b, masked):>16.4f}")
replaced = x.clone()
replaced[:, TAG] = model.get_input_embeddings()(torch.randint(0, 1000, (B, 5)))
print(f"tag masked out: change {rel(masked, base):.4f}; tag replaced by other tokens: change {rel(logits(replaced), base):.4f}")
