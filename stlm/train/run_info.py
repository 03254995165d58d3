"""<workdir>/run.json: what a run is, why it exists, where it stands (read by stlm.report).

The train loop calls `RunRecorder.start` once the workdir is known to be this run's,
`evaluated` after each validation, `finished` at the end and `crashed` when anything
escapes (status: running | finished | crashed), and `preempted` when a signal stopped it
with a checkpoint (the same command resumes it). The file is rewritten whole each time
(write to a temporary file, then rename), so a reader never sees half of it.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import jax

RUN_FILE = 'run.json'
RESULTS_FILE = 'results.json'


def config_docstring(path: str | None) -> str:
  """The module docstring of a config file (its "why"), read without running it."""
  if not path:
    return ''
  path = path.split(':', 1)[0]  # --config=configs/baseline.py:50m
  try:
    with open(path, encoding='utf-8') as f:
      return ast.get_docstring(ast.parse(f.read())) or ''
  except (OSError, SyntaxError, ValueError):
    return ''


def git_state(directory: str) -> dict:
  """{'commit', 'dirty'} of the checkout holding `directory`; None values outside git."""
  def git(*args):
    return subprocess.run(['git', '-C', directory, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    return dict(commit=None, dirty=None)
  return dict(commit=commit, dirty=dirty)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def tokens_per_step(config) -> int:
  """Positions trained per optimizer step: tokens (baseline) or chunks (byte_pool).

  Rows are packed documents, so these are real targets except a row's unfilled tail.
  """
  t = config.train
  return int(t.batch_size * t.grad_accum * config.model.max_len)


class RunRecorder:
  """Keeps <workdir>/run.json up to date; silent on processes other than 0."""

  def __init__(self, workdir: str, config, config_path: str | None = None):
    self.workdir = workdir
    self.path = os.path.join(workdir, RUN_FILE)
    self.enabled = jax.process_index() == 0
    self.started = False
    self._t0 = time.time()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.info = dict(
        name=config.get('name', ''), preset=config.get('preset', ''),
        kind=config.model.kind, status='starting', config_file=config_path or '',
        config_docstring=config_docstring(config_path), command=list(sys.argv),
        git=git_state(repo), host=socket.gethostname(), pid=os.getpid(),
        start_time=_now(), end_time=None, wall_time_s=0.0, steps_done=0,
        total_steps=int(config.train.steps), tokens_per_step=tokens_per_step(config),
        tokens_seen=0, throughput=None, final_validation=None, params=None,
        benchmarks_requested=config.train.get('final_eval_benchmarks', ''),
        results=None, error=None, starts=[], config=config.to_dict())

  def identity(self) -> dict:
    """What names this run and where it comes from (for other metric stores, e.g. W&B)."""
    keys = ('name', 'preset', 'kind', 'config_file', 'command', 'git', 'host', 'start_time')
    return {**{k: self.info[k] for k in keys}, 'workdir': self.workdir}

  def _write(self) -> None:
    if not (self.enabled and self.started):
      return
    self.info['wall_time_s'] = round(time.time() - self._t0, 3)
    tmp = self.path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(self.info, f, indent=2, default=str)
    os.replace(tmp, self.path)

  def start(self, config, breakdown: dict, start_step: int) -> None:
    """Called once the workdir is known to hold this run; first write of run.json."""
    self.started = True
    # A resumed run keeps its first start time and adds to its earlier wall time.
    previous = _read(self.path)
    if previous and start_step:
      self.info['start_time'] = previous.get('start_time', self.info['start_time'])
      self.info['starts'] = list(previous.get('starts') or [])
      self._t0 -= float(previous.get('wall_time_s') or 0.0)
    self.info.update(status='running', config=config.to_dict(),
                     params={k: (int(v) if not isinstance(v, bool) else v)
                             for k, v in breakdown.items()},
                     steps_done=int(start_step), tokens_seen=int(start_step) * self.info[
                         'tokens_per_step'])
    self._write()

  def first_step(self, step: int, seconds: float) -> None:
    """One entry per process start: its first step and the wall seconds from process start
    (imports, data, restore, compilation or cache load, the step itself) to that step's end."""
    self.info['starts'].append(dict(step=int(step), time_to_first_step_s=round(seconds, 3)))
    self._write()

  def evaluated(self, step: int, validation: dict, targets_per_s: float | None = None) -> None:
    self.info.update(steps_done=int(step), tokens_seen=int(step) * self.info['tokens_per_step'],
                     final_validation={'step': int(step), **{
                         k: float(v) for k, v in validation.items()
                         if k not in ('targets', 'bytes')}})
    if targets_per_s is not None:
      self.info['throughput'] = dict(targets_per_s=float(targets_per_s))
    self._write()

  def results(self, path: str) -> None:
    self.info['results'] = os.path.abspath(path)
    self._write()

  def finished(self) -> None:
    self.info.update(status='finished', end_time=_now())
    self._write()

  def preempted(self, step: int, signal_name: str) -> None:
    self.info.update(status='preempted', end_time=_now(), steps_done=int(step),
                     tokens_seen=int(step) * self.info['tokens_per_step'],
                     stopped_by=signal_name)
    self._write()

  def crashed(self, error: BaseException) -> None:
    self.info.update(status='crashed', end_time=_now(),
                     error=''.join(traceback.format_exception_only(type(error), error)).strip())
    self._write()


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read(workdir: str) -> dict | None:
  """run.json of a workdir, or None when it has none (or it cannot be parsed)."""
  return _read(os.path.join(workdir, RUN_FILE))
