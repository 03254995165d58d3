"""Instruction-tuned runs beside their base run: response bits per byte, generation, choice.

A run is listed when it was fine-tuned (`sft.template`), is the base (`train.init_from`) of
one that was, or has generative or held-out response scores in its results.json. The base
column names the run whose export `train.init_from` points at (its path when that run is
not in the report).
"""

from __future__ import annotations

import os

from stlm.report import table
from stlm.report.collect import Run

GENERATIVE = (('gsm8k', 'exact_match', 'GSM8K'), ('gsm8k', 'exact_match_flexible',
                                                   'GSM8K flexible'),
              ('lambada_gen', 'acc', 'LAMBADA (gen)'))
HEADER = ('Run', 'Base run', 'Loss on', 'Response bits/byte') + tuple(
    c for _, _, c in GENERATIVE) + tuple(c for _, c in table.BENCHMARKS)


def _init_from(run: Run) -> str:
  return run.config.get('train', {}).get('init_from', '') or ''


def _tuned(run: Run) -> bool:
  return bool(run.config.get('sft', {}).get('template'))


def _base_name(run: Run, runs: list[Run]) -> str:
  path = _init_from(run)
  if not path:
    return '-'
  target = os.path.realpath(path)
  for other in runs:
    if os.path.realpath(other.path / 'export') == target:
      return other.name
  return path


def listed(runs: list[Run]) -> list[Run]:
  bases = {os.path.realpath(_init_from(r)) for r in runs if _tuned(r) and _init_from(r)}
  def shown(run):
    results = run.results or {}
    bench = results.get('benchmarks', {})
    return (_tuned(run) or os.path.realpath(run.path / 'export') in bases
            or 'instruct' in results or any(k in bench for k, _, _ in GENERATIVE))
  return [r for r in runs if shown(r)]


def _cell(entry: dict | None, key: str) -> str:
  if not entry or key not in entry:
    return '-'
  return table.benchmark_cell(dict(entry, main=key))


def rows(runs: list[Run]) -> list[list[str]]:
  out = []
  for run in listed(runs):
    results = run.results or {}
    bench = results.get('benchmarks', {})
    instruct = results.get('instruct')
    loss_on = run.config.get('sft', {}).get('loss_on', '-') if _tuned(run) else '-'
    out.append([run.name, _base_name(run, runs), loss_on,
                f"{instruct['bits_per_byte']:.4f}" if instruct else '-',
                *[_cell(bench.get(k), m) for k, m, _ in GENERATIVE],
                *[table.benchmark_cell(bench.get(k)) for k, _ in table.BENCHMARKS]])
  return out


def markdown(runs: list[Run]) -> str | None:
  """The section (title, note, table), or None when no run belongs in it."""
  body = rows(runs)
  if not body:
    return None
  lines = ['## Instruction tuning and generation', '',
           'Held-out response bits per byte of the instruction data (stlm.eval --instruct), '
           'generative tasks and multiple choice, in % ± 1 standard error.', '',
           '| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
  lines += ['| ' + ' | '.join(c.replace('|', '\\|') for c in r) + ' |' for r in body]
  return '\n'.join(lines)
