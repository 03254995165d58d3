"""Dropout whose rate a training schedule can change inside one compiled step.

`Dropout(rate)` is `nn.Dropout` (same masks, same rng stream) unless the caller has set a
rate factor with `rate_factor(f)`: then it drops with rate `rate * f`, where f may be a
traced scalar (e.g. computed from the step counter inside the jitted train step), so a
dropout schedule (stlm/train/dropout_schedule.py) never recompiles. The factor is read at
trace time from a context variable, so models need no extra argument threaded through
every layer; only the train step sets it.
"""

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp

_FACTOR = contextvars.ContextVar('stlm_dropout_rate_factor', default=None)


@contextlib.contextmanager
def rate_factor(factor):
  """Within this block, every `Dropout` uses rate * factor (None: the plain rate)."""
  token = _FACTOR.set(factor)
  try:
    yield
  finally:
    _FACTOR.reset(token)


class Dropout(nn.Dropout):
  """nn.Dropout, scaled by the current `rate_factor` when one is set."""

  @nn.compact
  def __call__(self, inputs, deterministic=None, rng=None):
    factor = _FACTOR.get()
    if factor is None:
      return super().__call__(inputs, deterministic=deterministic, rng=rng)
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    rate = self.rate * jnp.asarray(factor, jnp.float32)
    keep_prob = 1.0 - rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    # keep_prob == 1 keeps every element (uniform draws are < 1), and x / 1 == x exactly.
    mask = jax.random.bernoulli(rng, p=keep_prob, shape=inputs.shape)
    return jnp.where(mask, inputs / keep_prob.astype(inputs.dtype), jnp.zeros_like(inputs))
