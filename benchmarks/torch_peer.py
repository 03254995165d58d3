"""The PyTorch peer: a Hugging Face transformers Llama train step of a given shape (CPU eager).

Run with a Python that has torch and transformers (a separate environment:
`pip install torch==2.13.0 transformers`); benchmarks/train_step.py --compare calls it.

  python benchmarks/torch_peer.py --hidden 256 --layers 8 --heads 8 --kv_heads 2 --ffn 768 \
      --vocab 50257 --batch 8 --seq 256 [--untied] [--steps 5] [--threads 2]

Prints one line `peer tokens/s X step_ms Y params Z`. Same shape as the stlm baseline
(RMSNorm, RoPE, GQA, SwiGLU, no biases, tied head by default), AdamW, sdpa attention,
after the script in ../shared/bench/peer_torch_llama.py.
"""

import argparse
import os
import time

import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM


def main():
  p = argparse.ArgumentParser()
  for name, default in [('hidden', 256), ('layers', 8), ('heads', 8), ('kv_heads', 2),
                        ('ffn', 768), ('vocab', 50257), ('batch', 8), ('seq', 256),
                        ('steps', 5), ('warmup', 2), ('threads', os.cpu_count())]:
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--untied', action='store_true')
  a = p.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(a.threads)
  cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                    num_hidden_layers=a.layers, num_attention_heads=a.heads,
                    num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
                    tie_word_embeddings=not a.untied, attn_implementation='sdpa')
  model = LlamaForCausalLM(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  x = torch.randint(0, a.vocab, (a.batch, a.seq))

  def step():
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(a.warmup):
    step()
  times = []
  for _ in range(a.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = sorted(times)[len(times) // 2]
  params = sum(t.numel() for t in model.parameters())
  print(f'peer tokens/s {a.batch * a.seq / step_s:.1f} step_ms {step_s * 1e3:.1f} '
        f'params {params}', flush=True)


if __name__ == '__main__':
  main()
