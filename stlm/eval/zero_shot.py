"""Zero-shot benchmark runs: load items, build harness prompts, score, aggregate.

`run_benchmarks(exported, names, data_dir, limit=None)` is what the trainer and the CLI
call; each benchmark's entry is flat (`results['blimp']['acc']`, `['acc_stderr']`,
`['chance']`, `['n']`) with per-group breakdowns under `groups`.
"""

from __future__ import annotations

import math
import os
import random
from typing import Sequence

import numpy as np

from stlm import cli_errors
from stlm.eval import loaders
from stlm.eval import metrics
from stlm.eval import prompts
from stlm.eval.scorer import Scorer

KNOWN = loaders.KNOWN
TABLE = ('blimp', 'hellaswag', 'arc_easy', 'winogrande', 'mmlu')  # the paper's Table 2
DEFAULT_SEED = 1234
# Benchmarks whose choices differ in length report acc_norm / acc_bytes too.
_NORM = {'hellaswag', 'arc_easy', 'arc_challenge', 'piqa', 'openbookqa', 'copa'}


def parse_specs(names) -> list[tuple[str, str | None]]:
  """(name, split or None) from a list or a comma string; `arc_easy:test` requests a split.

  Unknown names list the known ones.
  """
  if isinstance(names, str):
    names = [n.strip() for n in names.split(',') if n.strip()]
  specs = []
  for n in names:
    name, _, split = n.partition(':')
    specs.append((name.strip().lower().replace('-', '_'), split.strip() or None))
  bad = [n for n, _ in specs if n not in KNOWN]
  if bad:
    raise loaders.DataError(f'Unknown benchmark(s) {", ".join(bad)}; known benchmarks: '
                            f'{", ".join(KNOWN)}.')
  return specs


def parse_names(names) -> list[str]:
  """Benchmark names (any `:split` suffix dropped); unknown names list the known ones."""
  return [n for n, _ in parse_specs(names)]


def sample(items: Sequence, limit: int | None, seed: int = DEFAULT_SEED) -> list:
  """`limit` items drawn with a fixed seed, kept in file order (all items if no limit)."""
  if limit is None or limit >= len(items):
    return list(items)
  idx = sorted(random.Random(seed).sample(range(len(items)), int(limit)))
  return [items[i] for i in idx]


def build_prompts(name: str, items: Sequence[dict], data_dir=None, split: str = '',
                  mmlu_shots: int = 0) -> list[prompts.Prompt]:
  if name != 'mmlu' or mmlu_shots <= 0:
    return [prompts.BUILDERS[name](it) for it in items]
  dev = loaders.mmlu_dev(data_dir)
  out = []
  for it in items:
    pool = dev.get(it['subject'], [])
    if split == 'dev':  # never show the question being asked as its own example
      pool = [d for d in pool if d['question'] != it['question']]
    out.append(prompts.mmlu(it, pool[:mmlu_shots]))
  return out


def _flat(summary: dict) -> dict:
  out = {}
  for k, s in summary.items():
    out[k], out[f'{k}_stderr'] = s['value'], s['stderr']
  return out


def _groups(per_item: list[dict], keys: Sequence[str], labels: Sequence[str]) -> dict:
  groups: dict[str, list[dict]] = {}
  for m, g in zip(per_item, labels):
    groups.setdefault(g, []).append(m)
  return {g: dict(n=len(ms), **_flat(metrics.aggregate(ms, keys)))
          for g, ms in sorted(groups.items())}


def _multiple_choice(scorer: Scorer, name: str, items: list[dict], ps: list) -> dict:
  requests = [r for p in ps for r in p.requests]
  results = scorer.loglikelihood(requests, desc=name)
  per_item, pos = [], 0
  for p in ps:
    lls = [r.logprob for r in results[pos:pos + len(p.requests)]]
    pos += len(p.requests)
    per_item.append(metrics.choice_metrics(lls, p.choices, p.gold))
  keys = ('acc', 'acc_norm', 'acc_bytes') if name in _NORM else ('acc',)
  out = dict(n=len(items), chance=metrics.chance([len(p.requests) for p in ps]), main='acc',
             **_flat(metrics.aggregate(per_item, keys)))
  if name == 'blimp':
    out['groups'] = dict(field=_groups(per_item, keys, [it['field'] for it in items]),
                         paradigm=_groups(per_item, keys, [it['paradigm'] for it in items]))
  elif name == 'mmlu':
    subjects = _groups(per_item, keys, [it['subject'] for it in items])
    out['groups'] = dict(subject=subjects)
    accs = [s['acc'] for s in subjects.values()]
    ses = [s['acc_stderr'] for s in subjects.values() if not math.isnan(s['acc_stderr'])]
    # The headline is `acc` over all questions (the harness's weight_by_size); the mean of
    # subject accuracies stays available as acc_macro.
    out['acc_macro'] = float(np.mean(accs))
    out['acc_macro_stderr'] = (float(math.sqrt(sum(se * se for se in ses)) / len(accs))
                               if ses else float('nan'))
  return out


def _lambada(scorer: Scorer, items: list[dict]) -> dict:
  results = scorer.loglikelihood([prompts.lambada(it) for it in items], desc='lambada')
  lls = [r.logprob for r in results]
  out = dict(n=len(items), chance=float('nan'), main='acc',
             **_flat(metrics.aggregate([dict(acc=float(r.is_greedy)) for r in results],
                                       ('acc',))))
  out['perplexity'] = float(math.exp(-np.mean(lls)))
  return out


def evaluate(scorer: Scorer, name: str, data_dir, *, limit: int | None = None,
             seed: int = DEFAULT_SEED, split: str | None = None, mmlu_shots: int = 0,
             allow_split_fallback: bool = False) -> dict:
  """Metrics of one benchmark (see the module docstring for the layout).

  `split` None takes the first split found in the benchmark's preference order (test, then
  validation, then train); a named split that is missing is an error unless
  `allow_split_fallback`, which then takes the preference order. `split` in the result
  says where the numbers come from.
  """
  name, named = parse_specs([name])[0]
  split = split or named
  try:
    used, items = loaders.load_split(name, data_dir, split)
  except loaders.DataError:
    if split is None or not allow_split_fallback:
      raise
    used, items = loaders.load_split(name, data_dir, None)
  total = len(items)
  items = sample(items, limit, seed)
  if name == 'lambada':
    out = _lambada(scorer, items)
  else:
    ps = build_prompts(name, items, data_dir, used, mmlu_shots)
    out = _multiple_choice(scorer, name, items, ps)
  out.update(split=used, requested_split=split, available=total, limit=limit, seed=seed,
             always_prefix_eot=scorer.always_prefix_eot,
             speed=dict(items_per_s=scorer.stats.get('items_per_s'),
                        compile_count=scorer.compile_count))
  if name == 'mmlu':
    out['shots'] = mmlu_shots
  return out


def make_scorer(exported, batch_size: int = 32, progress: bool = False,
                verbose: bool = False, always_prefix_eot: bool = False,
                score_fraction: float | None = None) -> Scorer:
  return Scorer(exported.model, exported.params, exported.featurizer,
                max_len=exported.config.model.max_len, batch_size=batch_size,
                progress=progress, verbose=verbose, always_prefix_eot=always_prefix_eot,
                score_fraction=score_fraction)


def run_benchmarks(exported, names, data_dir, limit: int | None = None, *,
                   seed: int = DEFAULT_SEED, batch_size: int = 32, mmlu_shots: int = 0,
                   progress: bool = False, scorer: Scorer | None = None,
                   allow_split_fallback: bool = False) -> dict:
  """{name: metrics} for an `Exported` (model, params, config, tokenizer, featurizer).

  `names` may request splits (`arc_easy:test`); see `evaluate`.
  """
  specs = parse_specs(names)
  scorer = scorer or make_scorer(exported, batch_size, progress)
  return {n: evaluate(scorer, n, data_dir, limit=limit, seed=seed, split=split,
                      mmlu_shots=mmlu_shots, allow_split_fallback=allow_split_fallback)
          for n, split in specs}


# ---------------------------------------------------------------- checkpoints and tables

def open_checkpoint(path: str, flag: str = '--checkpoint'):
  """`load_export(path)`, after checking that `path` is a whole export of a causal language
  model (stlm.export.BadExportError names what is wrong otherwise)."""
  # Imported here: orbax (via export) is only needed when reading a checkpoint from disk.
  from stlm import export  # pylint: disable=g-import-not-at-top
  check_causal_export(path, flag)
  return export.load_export(path, flag)


def check_causal_export(path: str, flag: str = '--checkpoint'):
  """The export's config; BadExportError unless it is a whole export of a model that scores
  text left to right (a masked-LM encoder's likelihoods would see the answer)."""
  from stlm import export  # pylint: disable=g-import-not-at-top
  from stlm.models import kinds  # pylint: disable=g-import-not-at-top
  config = export.check_export(path, flag)
  if not kinds.get_kind(config.model.kind).causal:
    raise export.BadExportError(
        f'{flag}={path} holds a bidirectional model (model.kind={config.model.kind!r}, a '
        'masked-LM encoder): the evaluator scores causal language models; fine-tune it with '
        'python -m stlm.classify instead')
  return config


def write_results(path: str, exported, checkpoint: str, results: dict,
                  perplexity: dict | None = None, scoring: dict | None = None,
                  instruct: dict | None = None) -> dict:
  """Writes results.json (what `python -m stlm.eval` and the trainer write; stlm.report reads
  it) and returns its contents."""
  import json  # pylint: disable=g-import-not-at-top
  from stlm.models import factory  # pylint: disable=g-import-not-at-top
  out = dict(model=exported.config.get('name', 'model'), kind=exported.config.model.kind,
             checkpoint=os.path.abspath(checkpoint),
             parameters=factory.count_params(exported.params),
             scoring=scoring or dict(always_prefix_eot=False, allow_split_fallback=False),
             benchmarks=results, perplexity=perplexity)
  if instruct is not None:   # held-out response bits per byte (stlm/eval/instruct.py)
    out['instruct'] = instruct
  with cli_errors.atomic_file(path) as f:   # a reader (stlm.report) never sees half of it
    json.dump(out, f, indent=2)
  return out


_COLUMNS = (('blimp', 'BLiMP'), ('hellaswag', 'HellaSwag'), ('arc_easy', 'ARC-easy'),
            ('winogrande', 'WinoGrande'), ('mmlu', 'MMLU'))


def _pct(entry: dict | None) -> str:
  if not entry:
    return '-'
  return f"{100 * entry[entry.get('main', 'acc')]:.1f}"


def _params(n: int) -> str:
  return f'{n / 1e6:.1f}M' if n >= 1e5 else str(n)


def markdown_table(model_name: str, num_params: int, results: dict,
                   perplexity: dict | None = None) -> str:
  """The paper's Table 2 row (accuracy in %), a row naming each number's split, and a row
  for any other benchmark run."""
  head = ['Model', 'Parameters'] + [c for _, c in _COLUMNS] + ['Bits per byte']
  row = [model_name, _params(num_params)] + [_pct(results.get(k)) for k, _ in _COLUMNS]
  row.append(f"{perplexity['bits_per_byte']:.3f}" if perplexity else '-')
  splits = ['split', ''] + [_split(results.get(k)) for k, _ in _COLUMNS] + ['-']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head), '| ' + ' | '.join(row) + ' |',
           '| ' + ' | '.join(splits) + ' |']
  extra = [k for k in results if k not in dict(_COLUMNS)]
  if extra:
    lines += ['', '| ' + ' | '.join(['Model'] + extra) + ' |', '|' + '---|' * (len(extra) + 1),
              '| ' + ' | '.join([model_name] + [_pct(results[k]) for k in extra]) + ' |',
              '| ' + ' | '.join(['split'] + [_split(results[k]) for k in extra]) + ' |']
  return '\n'.join(lines)


def _split(entry: dict | None) -> str:
  return str(entry.get('split', '?')) if entry else '-'
