"""Greedy generation speed of exports: batched (`generate_batch`) vs one prompt at a time.

  python benchmarks/generation_speed.py --checkpoints=runs/baseline_tiny/export,runs/bp/export \
      [--prompts=32] [--prompts_from=../shared/data/corpus/tinystories/train_head_cased.txt] \
      [--batch=16] [--max_bytes=128] [--hf_out=DIR]
  python benchmarks/generation_speed.py --tiny=/tmp/gen_tiny --prompts=8   # smoke run, seconds

Prompts are the first `--prompts` non-empty lines of `--prompts_from` (by default a
TinyStories file of the shared corpus, whose lines are paragraphs), each cut to
`--prompt_bytes` at a word boundary. Each export generates for all of them, greedy, batched
and one at a time: a first pass of each to compile, then a timed pass of each. The count
of prompts whose texts are identical on both paths is printed.

Tokens are counted the same way here and in benchmarks/hf_generate_speed.py: the NEW tokens
generated, as the GPT-2 tokens of each generated text (so a byte-pool export, which has no
tokens, is counted alike); bytes are the UTF-8 bytes of the generated texts.

`--hf_out=DIR` also writes the first (baseline) export in Hugging Face form to DIR (the
exporter of stlm/export/hf.py) and the prompts to DIR/prompts.jsonl, for
benchmarks/hf_generate_speed.py to time `transformers` on the same model and prompts.
`--tiny=DIR` builds small random-init exports in DIR (a baseline and a byte-pool one; no
training) and times those instead of `--checkpoints`.
"""

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np

from configs import baseline as baseline_config
from configs import byte_pool as byte_pool_config
from stlm import export
from stlm import generate
from stlm import tokenizers
from stlm.export import hf as hf_export
from stlm.models import factory

_REPO = pathlib.Path(__file__).resolve().parents[1]
_CHECKPOINTS = flags.DEFINE_list('checkpoints', [], 'export folders (baseline first for '
                                 '--hf_out).')
_PROMPTS = flags.DEFINE_integer('prompts', 32, 'how many prompts.')
_FROM = flags.DEFINE_string('prompts_from', str(_REPO.parent / 'shared' / 'data' / 'corpus' /
                                                'tinystories' / 'train_head_cased.txt'),
                            'text file the prompts are taken from.')
_PROMPT_BYTES = flags.DEFINE_integer('prompt_bytes', 200, 'longest prompt, in bytes.')
_BATCH = flags.DEFINE_integer('batch', 16, 'prompts decoded together.')
_MAX_BYTES = flags.DEFINE_integer('max_bytes', 128, 'bytes generated per prompt (at most).')
_HF_OUT = flags.DEFINE_string('hf_out', '', 'folder for the baseline\'s Hugging Face export '
                              'and prompts.jsonl.')
_TINY = flags.DEFINE_string('tiny', '', 'build small random-init exports here and time them.')

PROMPTS_FILE = 'prompts.jsonl'


def read_prompts(path: str, n: int, max_bytes: int) -> list[str]:
  """The first n non-empty lines of the file, each cut to max_bytes at a space."""
  if not os.path.isfile(path):
    raise app.UsageError(f'--prompts_from={path} is not a file')
  text = pathlib.Path(path).read_text(encoding='utf-8', errors='replace')
  out = []
  for part in text.replace('<|endoftext|>', '\n').split('\n'):
    part = ' '.join(part.split())
    if not part:
      continue
    data = part.encode('utf-8')[:max_bytes].decode('utf-8', errors='ignore')
    if len(data) < len(part) and ' ' in data:
      data = data[:data.rindex(' ')]   # whole words: the continuation starts at a boundary
    out.append(data)
    if len(out) == n:
      return out
  raise app.UsageError(f'--prompts_from={path} has {len(out)} non-empty lines; '
                       f'--prompts={n} asked for more')


def _filled(abstract, seed: int):
  """Params of the abstract tree's shapes: fan-in scaled normals, norm scales 1 (no compiled
  initializer: speed does not depend on the weights)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if 'scale' in jax.tree_util.keystr(path):
      return np.ones(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    return noise * np.sqrt(leaf.shape[-1] / max(leaf.size, 1)) if leaf.ndim > 1 else 0.1 * noise
  return jax.tree_util.tree_map_with_path(fill, abstract)


def build_tiny(directory: str) -> list[str]:
  """Random-init exports of the tiny baseline and byte-pool configs (2 layers, 64 wide)."""
  out = []
  for name, config in (('baseline', baseline_config.get_config('tiny')),
                       ('byte_pool', byte_pool_config.get_config('tiny'))):
    path = os.path.join(directory, name)
    model = factory.build_model(config.model)
    params = _filled(nn.unbox(factory.abstract_params(model, config.model)), seed=0)
    export.save_export(path, params, config)
    out.append(path)
  return out


def _counts(texts: list[bytes], gpt2) -> tuple[int, int]:
  """(new GPT-2 tokens, bytes) of the generated texts."""
  return (sum(len(gpt2.encode(t.decode('utf-8', errors='replace'))) for t in texts),
          sum(len(t) for t in texts))


def time_export(path: str, prompts: list[str], gpt2) -> None:
  ex = export.load_export(path)
  kw = dict(max_bytes=_MAX_BYTES.value, temperature=0.0)
  args = (ex.model, ex.params, ex.config, ex.tokenizer)
  run_batched = lambda: generate.generate_batch(*args, prompts, batch_size=_BATCH.value, **kw)
  run_single = lambda: [generate.generate(*args, p, **kw) for p in prompts]
  # A first pass of each compiles every shape the prompts need (a strategy may meet new
  # shapes on later prompts), so the timed passes run compiled code only.
  run_batched()
  run_single()
  start = time.perf_counter()
  batched = run_batched()
  batched_s = time.perf_counter() - start
  start = time.perf_counter()
  single = run_single()
  single_s = time.perf_counter() - start
  same = sum(b == s for b, s in zip(batched, single))
  print(f'{path}: model.kind={ex.config.model.kind}, {len(prompts)} prompts, '
        f'max_bytes={_MAX_BYTES.value}, greedy; identical texts {same}/{len(prompts)}')
  tokens, nbytes = _counts(batched, gpt2)
  for label, seconds in ((f'batched (batch {_BATCH.value})', batched_s),
                         ('one at a time', single_s)):
    print(f'  {label:>18}: {seconds:7.2f} s  {tokens / seconds:9.1f} new tokens/s  '
          f'{nbytes / seconds:9.1f} bytes/s  ({tokens} tokens, {nbytes} bytes)')


def write_hf(path: str, prompts: list[str], out_dir: str) -> None:
  hf_export.export_hf(export.load_export(path), out_dir)
  with open(os.path.join(out_dir, PROMPTS_FILE), 'w', encoding='utf-8') as f:
    for p in prompts:
      f.write(json.dumps({'prompt': p}) + '\n')
  print(f'wrote the Hugging Face export of {path} and {PROMPTS_FILE} to {out_dir}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # not a line per checkpoint read
  if _BATCH.value < 1 or _PROMPTS.value < 1 or _MAX_BYTES.value < 1:
    raise app.UsageError('--batch, --prompts and --max_bytes must be >= 1')
  paths = build_tiny(_TINY.value) if _TINY.value else _CHECKPOINTS.value
  if not paths:
    raise app.UsageError('give --checkpoints=DIR1,DIR2 (exports) or --tiny=DIR')
  prompts = read_prompts(_FROM.value, _PROMPTS.value, _PROMPT_BYTES.value)
  print('tokens: NEW tokens generated, counted as the GPT-2 tokens of each generated text '
        '(as benchmarks/hf_generate_speed.py counts them); bytes: UTF-8 bytes generated')
  gpt2 = tokenizers.GPT2Tokenizer()
  for path in paths:
    time_export(path, prompts, gpt2)
  if _HF_OUT.value:
    write_hf(paths[0], prompts, _HF_OUT.value)


if __name__ == '__main__':
  app.run(main)
