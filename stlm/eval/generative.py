"""Generative evaluation (lm-evaluation-harness `generate_until` conventions).

- `gsm8k`: k-shot prompts from the train split ("Question: q\\nAnswer: a" joined by blank
  lines, then "Question: q\\nAnswer:"), greedy until "Question:", "</s>" or "<|im_end|>"
  for at most 256 units (the harness's max_gen_toks: tokens, or chunks for byte-pool kinds),
  scored by exact match of the final number under the harness's two filters: strict-match
  (the number after "#### ") and flexible-extract (the last number in the text), with the
  harness's normalisation (commas, "$" and a trailing "." removed, case ignored).
- `lambada_gen`: greedy continuation of the passage; correct when its first word (trailing
  punctuation dropped) is the passage's last word.

Each entry has the metric, its standard error (sample SD / sqrt(n), as the harness) and n.
Generation runs `batch_size` items at a time (GENERATIVE_BATCH) through
`stlm.generate.generate_batch`: token kinds decode the batch together in one KV cache, kinds
without a batched decoder run its items in turn; the texts, and so the scores, are those of
one item at a time.
"""

from __future__ import annotations

import json
import os
import random
import re

from stlm import generate as generate_lib
from stlm.eval import loaders
from stlm.eval import metrics

TASKS = ('gsm8k', 'lambada_gen')
GSM8K_UNTIL = ('Question:', '</s>', '<|im_end|>')
GSM8K_SHOTS = 5
GSM8K_MAX_UNITS = 256     # the harness's max_gen_toks: tokens, or chunks for byte-pool kinds
LAMBADA_MAX_BYTES = 32
GENERATIVE_BATCH = 16     # items generated together
FEWSHOT_SEED = 1234       # the harness's fewshot sampler seed
INVALID = '[invalid]'     # the harness's regex-filter fallback

_STRICT = re.compile(r'#### (\-?[0-9\.\,]+)')
_FLEXIBLE = re.compile(r'(-?[$0-9.,]{2,})|(-?[0-9]+)')
_IGNORE = (',', r'\$', r'(?s).*#### ', r'\.$')


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
  """lm-evaluation-harness RegexFilter: findall, pick a match, first non-empty group."""
  found = pattern.findall(text)
  if not found:
    return INVALID
  match = found[group_select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), INVALID)
  return match.strip()


def extract_strict(text: str) -> str:
  """The strict-match filter: the first number after '#### '."""
  return _regex_filter(_STRICT, text, 0)


def extract_flexible(text: str) -> str:
  """The flexible-extract filter: the last number-like run in the text."""
  return _regex_filter(_FLEXIBLE, text, -1)


def normalise(text: str) -> str:
  """The harness's exact_match normalisation for gsm8k (regexes_to_ignore, ignore_case)."""
  for pattern in _IGNORE:
    text = re.sub(pattern, '', text)
  return text.lower()


def gsm8k_exact_match(generated: str, answer: str) -> dict:
  """Both filters' exact match of one generation against the reference answer."""
  gold = normalise(answer)
  return dict(exact_match=float(normalise(extract_strict(generated)) == gold),
              exact_match_flexible=float(normalise(extract_flexible(generated)) == gold))


def read_gsm8k(data_dir: str, split: str) -> list[dict]:
  path = os.path.join(data_dir, 'gsm8k', f'{split}.jsonl')
  if not os.path.isfile(path):
    raise loaders.DataError(f'gsm8k: {path} is missing (question/answer JSON lines)')
  items = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        row = json.loads(line)
        if 'question' not in row or 'answer' not in row:
          raise loaders.DataError(f'{path}:{n}: needs "question" and "answer"')
        items.append(dict(question=row['question'], answer=row['answer']))
  return items


def gsm8k_prompt(item: dict, shots: list[dict]) -> str:
  """The harness's prompt: shots as 'Question: q\\nAnswer: a', blank-line separated."""
  parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
  return '\n\n'.join(parts + [f"Question: {item['question']}\nAnswer:"])


def gsm8k_shots(items: list[dict], train: list[dict], k: int, seed: int = FEWSHOT_SEED
                ) -> list[list[dict]]:
  """k train examples per item, from one seeded sampler; never the item itself."""
  rnd = random.Random(seed)
  out = []
  for item in items:
    pool = rnd.sample(train, min(k + 1, len(train)))
    out.append([s for s in pool if s['question'] != item['question']][:k])
  return out


def lambada_correct(generated: str, word: str) -> float:
  first = generated.split()[0] if generated.split() else ''
  return float(first.rstrip('.,;:!?"\'”’)') == word.strip())


def _greedy(exported, prompts: list[str], max_bytes: int, stop, batch_size: int,
            progress=None, max_units=None) -> list[str]:
  """Greedy continuations of `prompts`, batch_size at a time; progress() once per item."""
  done = (lambda n: [progress() for _ in range(n)]) if progress else None
  out = generate_lib.generate_batch(exported.model, exported.params, exported.config,
                                    exported.tokenizer, prompts, max_bytes=max_bytes,
                                    temperature=0.0, stop=stop, batch_size=batch_size,
                                    progress=done, max_units=max_units)
  return [data.decode('utf-8', errors='replace') for data in out]


def _entry(per_item: list[dict], keys, split: str, examples: list[dict]) -> dict:
  out = {'main': keys[0], 'split': split, 'n': len(per_item), 'examples': examples}
  for k, s in metrics.aggregate(per_item, keys).items():
    out[k], out[f'{k}_stderr'] = s['value'], s['stderr']
  return out


def run_gsm8k(exported, data_dir: str, *, split: str = 'test', limit=None, seed=FEWSHOT_SEED,
              shots: int = GSM8K_SHOTS, max_units: int = GSM8K_MAX_UNITS,
              max_bytes: int | None = None, batch_size: int = GENERATIVE_BATCH,
              progress=None) -> dict:
  """GSM8K exact match (strict and flexible) with standard errors; `split` 'train' scores
  train items with shots drawn from the other train items. Generation stops after max_units
  units (as the harness's max_gen_toks) or max_bytes bytes, whichever comes first."""
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  train = read_gsm8k(data_dir, 'train')
  items = zero_shot.sample(read_gsm8k(data_dir, split) if split != 'train' else train,
                           limit, seed)
  prompts = [gsm8k_prompt(item, shot)
             for item, shot in zip(items, gsm8k_shots(items, train, shots, seed))]
  if max_bytes is None:
    max_bytes = max_units * generate_lib.BYTES_PER_UNIT_CAP
  texts = _greedy(exported, prompts, max_bytes, GSM8K_UNTIL, batch_size, progress, max_units)
  per_item = [gsm8k_exact_match(text, item['answer']) for item, text in zip(items, texts)]
  examples = [dict(question=item['question'], generated=text)
              for item, text in zip(items[:3], texts)]
  return dict(_entry(per_item, ('exact_match', 'exact_match_flexible'), split, examples),
              shots=shots)


def run_lambada(exported, data_dir: str, *, limit=None, seed=FEWSHOT_SEED,
                max_bytes: int = LAMBADA_MAX_BYTES, batch_size: int = GENERATIVE_BATCH,
                progress=None) -> dict:
  """LAMBADA last-word accuracy of greedy generation, with its standard error."""
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  split, items = loaders.load_split('lambada', data_dir)
  items = zero_shot.sample(items, limit, seed)
  texts = _greedy(exported, [item['context'].rstrip() for item in items], max_bytes,
                  ('\n',), batch_size, progress)
  per_item = [dict(acc=lambada_correct(text, item['continuation']))
              for item, text in zip(items, texts)]
  examples = [dict(word=item['continuation'], generated=text)
              for item, text in zip(items[:3], texts)]
  return _entry(per_item, ('acc',), split, examples)


def check_available(names, data_dir: str, gsm8k_split: str = 'test') -> None:
  """loaders.DataError naming the first missing file, before any model is loaded."""
  for name in names:
    if name == 'gsm8k':
      for split in {'train', gsm8k_split}:
        path = os.path.join(data_dir, 'gsm8k', f'{split}.jsonl')
        if not os.path.isfile(path):
          raise loaders.DataError(f'gsm8k: {path} is missing (question/answer JSON lines)'
                                  + ('; --gsm8k_split=train scores train items'
                                     if split == 'test' else ''))
    elif name == 'lambada_gen':
      loaders.check_available('lambada', data_dir)


def run_tasks(exported, names, data_dir: str, *, limit=None, seed=FEWSHOT_SEED,
              gsm8k_split: str = 'test', gsm8k_shots_: int = GSM8K_SHOTS,
              batch_size: int = GENERATIVE_BATCH) -> dict:
  out = {}
  for name in names:
    if name == 'gsm8k':
      out[name] = run_gsm8k(exported, data_dir, split=gsm8k_split, limit=limit, seed=seed,
                            shots=gsm8k_shots_, batch_size=batch_size)
    elif name == 'lambada_gen':
      out[name] = run_lambada(exported, data_dir, limit=limit, seed=seed,
                              batch_size=batch_size)
    else:
      raise loaders.DataError(f'unknown generative task {name!r}; known: {", ".join(TASKS)}')
  return out
