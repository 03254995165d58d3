"""Schedules and the AdamW decay mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.train import optimizer


def train_cfg(**kw):
  c = config_lib.base_config().train
  c = ml_collections.ConfigDict(c.to_dict())
  c.update({**dict(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1), **kw})
  return c


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant'])
def test_warmup_is_linear_from_zero(schedule):
  s = optimizer.make_schedule(train_cfg(schedule=schedule))
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)


def test_decay_shapes():
  cos = optimizer.make_schedule(train_cfg(schedule='cosine'))
  lin = optimizer.make_schedule(train_cfg(schedule='linear'))
  const = optimizer.make_schedule(train_cfg(schedule='constant'))
  np.testing.assert_allclose(cos(55), 0.1 + 0.9 * 0.5, atol=1e-5)   # half way down the cosine
  np.testing.assert_allclose(cos(100), 0.1, atol=1e-6)
  np.testing.assert_allclose(lin(55), 1.0 - 0.9 * 0.5, atol=1e-5)
  np.testing.assert_allclose(lin(100), 0.1, atol=1e-6)
  np.testing.assert_allclose(const(90), 1.0)


def test_decay_mask_skips_norms_biases_and_embeddings():
  # Decided by each param's logical axis names, as the models box them.
  box = lambda shape, names: nn.LogicallyPartitioned(jnp.ones(shape), names)
  boxed = {'embed': {'embedding': box((10, 4), ('vocab', 'embed'))},
           'block_0': {'attn': {'q': {'kernel': box((4, 2, 2), ('embed', 'heads', 'head_dim'))}},
                       'norm': {'scale': box((4,), ('norm',))},
                       'ffn': {'bias': box((8,), ('mlp',))}},
           'pos_embed': {'table': box((16, 4), ('position', 'embed'))},
           'lm_head': box((4, 10), ('embed', 'vocab'))}
  params = optimizer.param_axes(boxed)
  mask = optimizer.decay_mask(params)
  assert mask['lm_head']  # an output head is a matrix, not a lookup table
  assert mask['block_0']['attn']['q']['kernel']
  assert not mask['embed']['embedding'] and not mask['pos_embed']['table']
  assert not mask['block_0']['norm']['scale'] and not mask['block_0']['ffn']['bias']
  assert all(jax.tree.leaves(optimizer.decay_mask(params, True)))


def test_weight_decay_only_moves_masked_in_params():
  cfg = train_cfg(schedule='constant', warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
  params = {'w': jnp.ones((2, 2)), 'norm': {'scale': jnp.ones(2)}}
  tx = optimizer.make_optimizer(cfg)
  zero_grads = {'w': jnp.zeros((2, 2)), 'norm': {'scale': jnp.zeros(2)}}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['w'], 0.5)          # 1 - lr * wd * 1
  np.testing.assert_allclose(new['norm']['scale'], 1.0)


def test_clipping_bounds_the_update_norm():
  cfg = train_cfg(schedule='constant', warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
  tx = optimizer.make_optimizer(cfg)
  params = {'w': jnp.zeros(3)}
  state = tx.init(params)
  clipped, _ = tx.update({'w': jnp.array([300.0, 400.0, 0.0])}, state, params)
  unclipped, _ = tx.update({'w': jnp.array([0.6, 0.8, 0.0])}, state, params)
  np.testing.assert_allclose(clipped['w'], unclipped['w'], rtol=1e-6)
