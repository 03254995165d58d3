"""Benchmarks during training: learning curves on zero-shot benchmarks, inside the run.

`train.eval_benchmarks` (a comma list, as `stlm.eval --benchmarks`) is scored every
`train.eval_benchmarks_every` steps (0 = at every validation), at step 0 and at the last step,
on `train.eval_benchmarks_limit` items per benchmark: a fixed sample (`zero_shot.sample` with
its default seed), so every evaluation scores the same items, and the same items
`python -m stlm.eval --limit=<limit>` scores. The files are read from `train.final_eval_data_dir`.

One `Scorer` is built at start-up and kept: it is a separate jitted function that takes the
parameters as an argument, so the train step is never recompiled, and the scorer compiles its
length buckets once, at the first evaluation. Its parameters are the train state's, fetched to
the host (every process holds all of them; every process scores every item, so the numbers
are the same everywhere and process 0 writes them).

Each evaluation is one `benchmarks` row in metrics.jsonl (and TensorBoard, W&B) at its train
step: `<benchmark>/<metric>` with its `_stderr`, and for BLiMP each paradigm's
`blimp/paradigm/<name>/acc`; `seconds` is what the evaluation took.
"""

from __future__ import annotations

import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from stlm.config import errors
from stlm.models import kinds

SPLIT = 'benchmarks'   # the metrics.jsonl split of their rows
_SETTINGS = ('available', 'limit', 'seed', 'shots')   # how it was scored, not a score


def names(config) -> list[str]:
  return [n.strip() for n in str(config.train.get('eval_benchmarks', '')).split(',') if n.strip()]


def check(config) -> None:
  """ConfigErrors naming the key, before any work: unknown benchmarks, missing files, a model
  kind that does not score text left to right, a limit below 1."""
  wanted = names(config)
  if not wanted:
    return
  from stlm.eval import loaders  # pylint: disable=g-import-not-at-top
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  t = config.train
  if not kinds.get_kind(config.model.kind).causal:
    errors.fail('train.eval_benchmarks', t.eval_benchmarks,
                f'model.kind={config.model.kind!r} is not a causal language model; its '
                'likelihoods would see the answer')
  if int(t.eval_benchmarks_limit) < 1:
    errors.fail('train.eval_benchmarks_limit', t.eval_benchmarks_limit,
                'must be >= 1 (items per benchmark at every evaluation)')
  if int(t.eval_benchmarks_every) < 0:
    errors.fail('train.eval_benchmarks_every', t.eval_benchmarks_every,
                'must be >= 0 (0 = at every validation)')
  if not t.final_eval_data_dir:
    errors.fail('train.final_eval_data_dir', t.final_eval_data_dir,
                'train.eval_benchmarks reads the benchmark files from this directory')
  try:
    specs = zero_shot.parse_specs(wanted)
    for name, split in specs:
      loaders.check_available(name, t.final_eval_data_dir, split)
  except loaders.DataError as e:
    errors.fail('train.eval_benchmarks', t.eval_benchmarks, str(e).split('\n', 1)[0])


def every(config) -> int:
  """Steps between evaluations (0: never)."""
  if not names(config):
    return 0
  return int(config.train.eval_benchmarks_every) or int(config.train.eval_every)


def _host_params(params):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def flatten(results: dict) -> dict:
  """One metrics row from zero_shot results: each benchmark's numbers (acc, its stderr, n,
  chance, ...), and BLiMP's per paradigm."""
  row = {}
  for name, entry in results.items():
    for key, value in entry.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _SETTINGS:
        row[f'{name}/{key}'] = float(value)
    for paradigm, g in entry.get('groups', {}).get('paradigm', {}).items():
      row[f'{name}/paradigm/{paradigm}/acc'] = float(g['acc'])
  return row


class InTrainingBenchmarks:
  """The benchmarks of `train.eval_benchmarks`, scored with one scorer kept for the run."""

  def __init__(self, config, model, featurizer, params):
    from stlm.eval import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    self._config = config
    self.names = names(config)
    self.every = every(config)
    self.scorer = scorer_lib.Scorer(model, _host_params(params), featurizer,
                                    max_len=config.model.max_len,
                                    batch_size=int(config.train.eval_benchmarks_batch))
    self.last_seconds = None
    self.measured_share = None   # of the time since the previous evaluation ended
    self._previous_end = None

  def due(self, step: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == self._config.train.steps)

  def evaluate(self, params) -> dict:
    """Scores the benchmarks with `params`; returns the metrics row (see the module doc)."""
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    self.scorer.params = nn.unbox(_host_params(params))
    t = self._config.train
    results = zero_shot.run_benchmarks(None, self.names, t.final_eval_data_dir,
                                       int(t.eval_benchmarks_limit), scorer=self.scorer)
    end = time.perf_counter()
    self.last_seconds = end - t0
    if self._previous_end is not None:
      self.measured_share = self.last_seconds / (end - self._previous_end)
    self._previous_end = end
    return {**flatten(results), 'seconds': self.last_seconds}

  def measured_line(self) -> str:
    """What the latest evaluation took, against the time since the previous one ended."""
    return (f'benchmarks: {self.last_seconds:.1f} s for this evaluation, '
            f'{100 * self.measured_share:.0f}% of the time since the previous one')

  def cost_line(self, seconds_per_step: float) -> str:
    """What one evaluation costs against the training between two evaluations."""
    share = self.last_seconds / (self.last_seconds + self.every * seconds_per_step)
    limit = self._config.train.eval_benchmarks_limit
    return (f'benchmarks ({", ".join(self.names)}, {limit} items each): '
            f'{self.last_seconds:.1f} s for the first evaluation (compiling included), every '
            f'{self.every} steps: about {100 * share:.0f}% of the training time')


def row_summary(row: dict) -> str:
  """'blimp 54.0% ± 5.0, arc_easy ...': each benchmark's accuracy with its standard error."""
  mains = [k for k in row if k.count('/') == 1 and k.endswith('/acc')]
  return ', '.join(f'{k.split("/")[0]} {100 * row[k]:.1f}% ± '
                   f'{100 * row.get(k + "_stderr", np.nan):.1f}' for k in mains)
