"""Greedy `transformers` generate speed on an export written by generation_speed.py --hf_out.

  python benchmarks/hf_generate_speed.py --model=DIR --prompts_file=DIR/prompts.jsonl \
      [--batch=16] [--max_new_tokens=32]

Imports only torch and transformers (not stlm), so it times the Hugging Face stack alone.
Each prompt starts with <|endoftext|>, as stlm's generation does; rows are left-padded (the
attention mask hides the padding); generation is greedy and a row ends at <|endoftext|> or
after --max_new_tokens. One batch runs first to warm up, then all are timed.

Tokens are counted as benchmarks/generation_speed.py counts them: the NEW tokens generated,
as the GPT-2 tokens of each generated text (re-tokenized, end-of-text and padding excluded);
bytes are the UTF-8 bytes of the generated texts.
"""

import argparse
import json
import time

import torch
import transformers


def read_prompts(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line)['prompt'] for line in f if line.strip()]


def generate_batch(model, tok, prompts, max_new_tokens: int) -> list[str]:
  """Greedy continuations of the prompts (left-padded into one batch), decoded."""
  eos = tok.eos_token_id
  rows = [[eos] + tok(p)['input_ids'] for p in prompts]
  width = max(len(r) for r in rows)
  ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows])
  mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos)
  texts = []
  for row in out[:, width:].tolist():
    row = row[:row.index(eos)] if eos in row else row
    texts.append(tok.decode(row))
  return texts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, help='Hugging Face export folder.')
  parser.add_argument('--prompts_file', required=True, help='JSON lines with "prompt".')
  parser.add_argument('--batch', type=int, default=16, help='prompts generated together.')
  parser.add_argument('--max_new_tokens', type=int, default=32, help='tokens per prompt.')
  args = parser.parse_args()
  if args.batch < 1 or args.max_new_tokens < 1:
    parser.error('--batch and --max_new_tokens must be >= 1')
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.model, dtype=torch.float32, local_files_only=True).eval()
  tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
  prompts = read_prompts(args.prompts_file)
  if not prompts:
    parser.error(f'--prompts_file={args.prompts_file} holds no prompts')
  generate_batch(model, tok, prompts[:args.batch], args.max_new_tokens)   # warm-up
  start = time.perf_counter()
  texts = []
  for s in range(0, len(prompts), args.batch):
    texts += generate_batch(model, tok, prompts[s:s + args.batch], args.max_new_tokens)
  seconds = time.perf_counter() - start
  tokens = sum(len(tok(t)['input_ids']) for t in texts)
  nbytes = sum(len(t.encode('utf-8')) for t in texts)
  print('tokens: NEW tokens generated, counted as the GPT-2 tokens of each generated text '
        '(as benchmarks/generation_speed.py counts them); bytes: UTF-8 bytes generated')
  print(f'{args.model}: transformers {transformers.__version__}, torch {torch.__version__}, '
        f'{len(prompts)} prompts, batch {args.batch}, max_new_tokens={args.max_new_tokens}, '
        'greedy, left padding')
  print(f'  transformers generate: {seconds:7.2f} s  {tokens / seconds:9.1f} new tokens/s  '
        f'{nbytes / seconds:9.1f} bytes/s  ({tokens} tokens, {nbytes} bytes)')


if __name__ == '__main__':
  main()
