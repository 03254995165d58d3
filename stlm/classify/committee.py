"""Soft committees: the mean of members' class probabilities, and measured latency.

Each member is fine-tuned on its own (stlm.classify.finetune); the committee predicts the
argmax of the average probability vector. Latency is measured, not estimated: each model's
jitted forward is compiled and warmed up, then timed over the same examples in batches, and
a committee's latency is its members' forwards run one after another (one device).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from stlm.classify import finetune


def average_probabilities(member_probs) -> np.ndarray:
  """Mean over members of N x C probability arrays (all of the same shape)."""
  probs = [np.asarray(p, np.float64) for p in member_probs]
  if not probs:
    raise ValueError('a committee needs at least one member')
  shapes = {p.shape for p in probs}
  if len(shapes) != 1:
    raise ValueError(f'committee members disagree on the output shape: {sorted(shapes)}')
  return np.mean(np.stack(probs), axis=0)


def latency_per_example(classifiers, arrays: dict, batch_size: int = 32,
                        repeats: int = 3) -> float:
  """Seconds per example for the classifiers run in sequence (a committee) over `arrays`.

  The best of `repeats` passes (the one least disturbed by anything else running).
  """
  fns = [(c.logits_fn(), c.params) for c in classifiers]
  batches = list(finetune.iter_batches(arrays, batch_size))
  n = len(next(iter(arrays.values())))

  def one_pass():
    for b in batches:
      for f, p in fns:
        jax.block_until_ready(f(p, b))

  one_pass()  # compile every batch shape once
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    one_pass()
    best = min(best, time.perf_counter() - t0)
  return best / n
