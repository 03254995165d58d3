"""The shared loss and the train step: accumulation is exact, padding never trains."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.models import factory
from stlm.train import optimizer
from stlm.train import state as state_lib
from stlm.train import step as step_lib


def tiny_config():
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.vocab_size = 97
  c.model.max_len = 16
  c.model.dropout = 0.0
  c.train.warmup_steps = 0
  c.train.schedule = 'constant'
  return ml_collections.ConfigDict(c.to_dict())


def random_batch(rng, batch, seq, vocab):
  inputs = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  segment_ids = np.ones((batch, seq), np.int32)
  segment_ids[:, seq // 2:] = 2
  segment_ids[0, -3:] = 0                      # a padded tail
  positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
  loss_mask = (segment_ids > 0).astype(np.float32)
  return {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
          'positions': np.broadcast_to(positions, (batch, seq)).astype(np.int32),
          'loss_mask': loss_mask,
          'target_bytes': (loss_mask * rng.integers(1, 5, (batch, seq))).astype(np.int32)}


@pytest.fixture(scope='module')
def setup():
  c = tiny_config()
  model = factory.build_model(c.model)
  params = factory.init_params(model, c.model, jax.random.key(0))
  tx = optimizer.make_optimizer(c.train)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.key(1))
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  return c, model, state, fn


@pytest.mark.slow
def test_accumulating_two_halves_equals_one_full_batch(setup):
  # Plain SGD so the updated params expose the gradient itself (Adam's first step is
  # ~sign(g), which turns float rounding in near-zero gradients into lr-sized jumps).
  c, model, state, _ = setup
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  batch = random_batch(np.random.default_rng(0), 4, 16, c.model.vocab_size)
  one = jax.tree.map(lambda x: x[None], batch)
  two = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), batch)
  s1, m1 = fn(state, one)
  s2, m2 = fn(state, two)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s1.params, s2.params)


def test_masked_targets_do_not_change_the_update(setup):
  c, _, state, fn = setup
  batch = random_batch(np.random.default_rng(1), 2, 16, c.model.vocab_size)
  other = dict(batch)
  other['targets'] = np.where(batch['loss_mask'] > 0, batch['targets'],
                              (batch['targets'] + 7) % c.model.vocab_size).astype(np.int32)
  s1, m1 = fn(state, jax.tree.map(lambda x: x[None], batch))
  s2, m2 = fn(state, jax.tree.map(lambda x: x[None], other))
  np.testing.assert_array_equal(m1['loss'], m2['loss'])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)


def test_loss_and_bits_per_byte_follow_the_shared_formula(setup):
  c, model, state, _ = setup
  batch = random_batch(np.random.default_rng(2), 2, 16, c.model.vocab_size)
  sums = step_lib.loss_sums(model, state.params, batch)
  out = model.apply({'params': state.params}, batch)
  mask = batch['loss_mask']
  np.testing.assert_allclose(sums['nll'], -np.sum(np.asarray(out['logprobs']) * mask), rtol=1e-6)
  assert float(sums['units']) == mask.sum() == float(sums['targets'])
  assert float(sums['bytes']) == float((batch['target_bytes'] * mask).sum())
  # An untrained model is close to uniform: about ln(vocab) nats per token.
  assert abs(float(sums['nll'] / sums['units']) - np.log(c.model.vocab_size)) < 0.5
