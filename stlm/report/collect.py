"""Reading run directories: run.json, metrics.jsonl, results.json, export/config.json.

A run is any directory holding one of those files; runs still training and runs that
crashed read as they are (status from run.json; 'unknown' where a run predates run.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from stlm.data import phases

RUN_FILE = 'run.json'            # written by stlm.train.run_info
RESULTS_FILE = 'results.json'    # written by the trainer's final benchmarks and stlm.eval
METRICS_FILE = 'metrics.jsonl'
EXPORT_CONFIG = os.path.join('export', 'config.json')


@dataclasses.dataclass
class Run:
  name: str                 # path relative to the scanned root
  path: pathlib.Path
  info: dict                # run.json ({} if absent)
  config: dict              # the run's full config ({} if unknown)
  metrics: list[dict]       # metrics.jsonl records
  results: dict | None      # results.json

  @property
  def status(self) -> str:
    return self.info.get('status') or 'unknown'

  def series(self, split: str, key: str) -> list[tuple[int, float, float | None]]:
    """(step, value, seconds since the run's first record or None) of one metric."""
    times = [r['time'] for r in self.metrics if 'time' in r]
    t0 = min(times) if times else None
    return [(int(r['step']), float(r[key]), (r['time'] - t0) if 'time' in r else None)
            for r in self.metrics if r.get('split') == split and key in r]

  @property
  def final_validation(self) -> dict | None:
    if self.info.get('final_validation'):
      return self.info['final_validation']
    val = [r for r in self.metrics if r.get('split') == 'validation']
    return val[-1] if val else None

  @property
  def phase_boundaries(self) -> list[int]:
    """Steps after which the run's next data phase starts ([] for a run without phases)."""
    try:
      return phases.boundaries(phases.parse(self.config.get('data', {}).get('phases', '')))
    except phases.PhaseSpecError:
      return []

  @property
  def tokens_per_step(self) -> int | None:
    if self.info.get('tokens_per_step'):
      return int(self.info['tokens_per_step'])
    t, m = self.config.get('train', {}), self.config.get('model', {})
    if {'batch_size', 'grad_accum'} <= t.keys() and 'max_len' in m:
      return int(t['batch_size'] * t['grad_accum'] * m['max_len'])
    return None


def _json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError):
    return None


def _metrics(path: pathlib.Path) -> list[dict]:
  out = []
  try:
    lines = path.read_text(encoding='utf-8').splitlines()
  except OSError:
    return out
  for line in lines:
    try:
      out.append(json.loads(line))
    except ValueError:
      continue  # a line being written right now
  return out


def _is_run(d: pathlib.Path) -> bool:
  return any((d / f).is_file() for f in (RUN_FILE, METRICS_FILE, EXPORT_CONFIG))


def load_run(path: pathlib.Path, name: str) -> Run:
  info = _json(path / RUN_FILE) or {}
  config = info.get('config') or _json(path / EXPORT_CONFIG) or {}
  results_path = pathlib.Path(info['results']) if info.get('results') else path / RESULTS_FILE
  return Run(name=name, path=path, info=info, config=config,
             metrics=_metrics(path / METRICS_FILE), results=_json(results_path))


def scan(root) -> list[Run]:
  """Runs under `root` (root itself, or its subdirectories up to three levels: a population's
  members are <population>/members/<name>), sorted by name."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root} is not a directory of runs')
  if _is_run(root):
    return [load_run(root, root.name)]
  found = []
  for d in sorted(p for p in root.rglob('*') if p.is_dir()):
    rel = d.relative_to(root)
    if len(rel.parts) <= 3 and _is_run(d) and not any(
        _is_run(root.joinpath(*rel.parts[:i])) for i in range(1, len(rel.parts))):
      found.append(load_run(d, rel.as_posix()))
  return found
