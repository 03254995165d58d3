"""Divergence guard: no checkpoint or export ever holds a non-finite state.

The train step flags, on device and every step, a loss or global gradient norm that is not
finite (metrics['nonfinite']). This module folds those flags into a few device counters by a
tiny jitted update dispatched after each step (asynchronous: no host sync), and reads them only
where the loop syncs anyway: at logging steps, and before every checkpoint save or export.

Policies (config.train.nonfinite_policy):
  stop: the update is applied as computed; the run stops at the next check, naming the first
        non-finite step and the first non-finite parameter group, before anything is saved.
  skip: the step drops that update (params and optimizer state are kept); skipped steps are
        counted in the train metrics ('skipped'), and the run stops once
        train.max_consecutive_skips steps in a row were skipped.
"""

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ('stop', 'skip')


class DivergenceError(RuntimeError):
  """Training diverged; the message names the step (and parameter group)."""


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def first_nonfinite_group(params):
  """Name of the first parameter (tree order) holding a NaN or inf, or None. Syncs to host."""
  flags = jax.device_get(jax.tree.map(lambda x: jnp.logical_not(jnp.all(jnp.isfinite(x))),
                                      params))
  for path, bad in jax.tree_util.tree_flatten_with_path(flags)[0]:
    if bool(bad):
      return _path_name(path)
  return None


@jax.jit
def _update(counters, nonfinite):
  bad = (nonfinite > 0).astype(jnp.int32)
  step = counters['step'] + 1
  run = (counters['run'] + 1) * bad
  return {
      'step': step,
      'run': run,
      'max_run': jnp.maximum(counters['max_run'], run),
      'max_run_end': jnp.where(run > counters['max_run'], step, counters['max_run_end']),
      'interval_skips': counters['interval_skips'] + bad,
      'first_bad': jnp.where((counters['first_bad'] < 0) & (bad > 0), step,
                             counters['first_bad']),
  }


class DivergenceGuard:
  """Device-side counters of non-finite steps, checked where the loop syncs anyway."""

  def __init__(self, policy: str, max_consecutive_skips: int, start_step: int):
    if policy not in POLICIES:
      raise ValueError(f'nonfinite policy {policy!r}; choose one of {", ".join(POLICIES)}')
    self.policy = policy
    self.max_consecutive = max_consecutive_skips
    z = lambda v: jnp.asarray(v, jnp.int32)
    self._c = {'step': z(start_step), 'run': z(0), 'max_run': z(0), 'max_run_end': z(-1),
               'interval_skips': z(0), 'first_bad': z(-1)}

  def observe(self, metrics) -> None:
    """Folds one step's flag in (asynchronously dispatched)."""
    self._c = _update(self._c, metrics['nonfinite'])

  def interval_skips(self) -> int:
    """Steps skipped since the last call (for the train metrics row); syncs."""
    n = int(jax.device_get(self._c['interval_skips']))
    self._c = {**self._c, 'interval_skips': jnp.zeros((), jnp.int32)}
    return n

  def check(self, params, what: str = 'continuing') -> None:
    """Raises DivergenceError if the policy says stop, or if params are not finite. Syncs."""
    c = jax.device_get(self._c)
    first = int(c['first_bad'])
    if self.policy == 'stop' and first >= 0:
      group = first_nonfinite_group(params)
      where = (f'first non-finite parameter group: {group}' if group else
               'the parameters are still finite')
      raise DivergenceError(
          f'loss or gradient norm became non-finite at step {first} ({where}); stopped before '
          f'{what}. Lower config.train.lr, or set config.train.nonfinite_policy=skip.')
    if self.policy == 'skip' and int(c['max_run']) >= self.max_consecutive:
      raise DivergenceError(
          f'{int(c["max_run"])} consecutive steps had a non-finite loss or gradient norm '
          f'(up to step {int(c["max_run_end"])}; config.train.max_consecutive_skips='
          f'{self.max_consecutive}); stopped before {what}.')
    group = first_nonfinite_group(params) if what != 'continuing' else None
    if group:
      raise DivergenceError(f'parameter group {group} is not finite at step {int(c["step"])}; '
                            f'stopped before {what}.')


def finite_or_none(value):
  """A metric value for JSON: NaN and inf become None (null), which JSON can hold."""
  v = float(np.asarray(value))
  return v if np.isfinite(v) else None
