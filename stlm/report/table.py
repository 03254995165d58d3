"""The Table-2-shaped summary of runs and the config diff against a reference run."""

from __future__ import annotations

import math

from stlm.report.collect import Run

BENCHMARKS = (('blimp', 'BLiMP'), ('hellaswag', 'HellaSwag'), ('arc_easy', 'ARC-easy'),
              ('winogrande', 'WinoGrande'), ('mmlu', 'MMLU'))
HEADER = ('Run', 'Status', 'Model', 'Parameters (total / emb+head)', 'Tokens seen',
          'Val bits/byte') + tuple(c for _, c in BENCHMARKS) + ('Wall time',)


def _count(n) -> str:
  if n is None:
    return '-'
  n = float(n)
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


def _duration(s) -> str:
  if s is None:
    return '-'
  s = float(s)
  return f'{s / 3600:.1f} h' if s >= 3600 else f'{s / 60:.1f} min' if s >= 60 else f'{s:.0f} s'


def benchmark_cell(entry: dict | None) -> str:
  """'acc ± stderr (split)' in %, e.g. '27.0 ± 1.9 (dev)'; '-' when not run."""
  if not entry:
    return '-'
  key = entry.get('main', 'acc')
  acc, se = entry.get(key), entry.get(f'{key}_stderr')
  if acc is None:
    return '-'
  se_txt = '' if se is None or (isinstance(se, float) and math.isnan(se)) else \
      f' ± {100 * se:.1f}'
  return f'{100 * acc:.1f}{se_txt} ({entry.get("split", "?")})'


def row(run: Run) -> list[str]:
  info, cfg = run.info, run.config
  params = info.get('params') or {}
  total = params.get('total')
  emb_head = (params.get('embedding', 0) + params.get('head', 0)) if params else None
  if total is None and run.results:
    total = run.results.get('parameters')
  model = f"{cfg.get('name', '?')}:{cfg.get('preset', '?')} ({cfg.get('model', {}).get('kind', '?')})"
  val = run.final_validation
  tokens = info.get('tokens_seen')
  if tokens is None and run.tokens_per_step and run.metrics:
    tokens = max(int(r['step']) for r in run.metrics) * run.tokens_per_step
  bench = (run.results or {}).get('benchmarks', {})
  wall = info.get('wall_time_s')
  status = run.status
  if status == 'running':
    status += f" (step {info.get('steps_done', '?')}/{info.get('total_steps', '?')})"
  return [run.name, status, model,
          f'{_count(total)} / {_count(emb_head)}' if total is not None else '-',
          _count(tokens), f"{val['bits_per_byte']:.3f}" if val and 'bits_per_byte' in val else '-',
          *[benchmark_cell(bench.get(k)) for k, _ in BENCHMARKS], _duration(wall)]


def rows(runs: list[Run]) -> list[list[str]]:
  return [row(r) for r in runs]


def markdown(runs: list[Run]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(c.replace('|', '\\|') for c in r) + ' |' for r in rows(runs)]
  return '\n'.join(lines)


def flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


# Keys that say where a run lives or how it was launched, not what it is.
_IGNORED = ('data.data_dir', 'tokenizer.sp_model_path', 'train.final_eval_data_dir')


def config_diff(config: dict, reference: dict) -> list[tuple[str, object, object]]:
  """(key, reference value, this run's value) for every key that differs."""
  a, b = flatten(reference), flatten(config)
  out = []
  for k in sorted(set(a) | set(b)):
    if k in _IGNORED:
      continue
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if isinstance(va, list):
      va = tuple(va)
    if isinstance(vb, list):
      vb = tuple(vb)
    if va != vb:
      out.append((k, va, vb))
  return out


def pick_reference(runs: list[Run], name: str | None = None) -> Run | None:
  """--reference by run name; default the first baseline-kind run, else the first run."""
  if not runs:
    return None
  if name:
    for r in runs:
      if r.name == name or r.name.rstrip('/').split('/')[-1] == name:
        return r
    raise ValueError(f'--reference={name}: no such run; runs: {", ".join(r.name for r in runs)}')
  for r in runs:
    if r.config.get('model', {}).get('kind') == 'baseline':
      return r
  return runs[0]
