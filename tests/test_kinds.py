"""The model-kind registry and the optional extra_nll / stats model outputs."""

import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.config import validate as config_validate
from stlm.models import factory
from stlm.models import kinds
from stlm.train import metrics
from stlm.train import state as state_lib
from stlm.train import step as step_lib


def model_cfg(kind):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny').model
  c.update(kind=kind, vocab_size=97, max_len=8)
  return c


def test_registry_lists_kinds_and_names_them_in_errors():
  assert set(kinds.kind_names()) >= {'baseline', 'byte_pool'}
  with pytest.raises(ValueError, match='unknown; choose one of baseline, byte_pool'):
    kinds.get_kind('rnn')
  with pytest.raises(TypeError):
    kinds.register_kind('baseline')
  with pytest.raises(ValueError, match='both generation and batched_generation'):
    kinds.register_kind(dataclasses.replace(kinds.get_kind('baseline'), name='half',
                                            batched_generation=None))
  assert 'half' not in kinds.kind_names()
  with pytest.raises(config_validate.ConfigError, match='config.model.kind=.rnn.'):
    c = config_lib.base_config()
    c.model.kind = 'rnn'
    config_validate.validate(c)


@pytest.mark.parametrize('name', ['baseline', 'byte_pool'])
def test_every_kind_is_complete(name):
  kind = kinds.get_kind(name)
  cfg = model_cfg(name)
  assert callable(kind.featurizer) and callable(kind.generation)
  assert callable(kind.batched_generation)
  assert kind.target_unit in ('tokens', 'chunks')
  unit = kind.unit_shape(cfg)
  dummy = kind.dummy_batch(cfg, 3, 5)
  assert dummy['inputs'].shape == dummy['targets'].shape == (3, 5) + unit
  assert dummy['segment_ids'].shape == (3, 5)
  synth = kind.synthetic_batch(cfg, np.random.default_rng(0), (2, 3))
  assert synth['inputs'].shape == (2, 3, cfg.max_len) + unit
  assert synth['loss_mask'].shape == (2, 3, cfg.max_len) and synth['loss_mask'].all()
  np.testing.assert_array_equal(synth['targets'][:, :, :-1], synth['inputs'][:, :, 1:])
  abstract = factory.abstract_params(kind.build(cfg), cfg)
  b = kind.param_breakdown(abstract, cfg)
  assert b['embedding'] + b['head'] + b['core'] == b['total'] == factory.count_params(abstract)
  flops = kind.flops_per_target(cfg, b)
  assert metrics.flops_per_unit(types.SimpleNamespace(model=cfg), b) == flops > 6 * b['core']


def test_flops_match_the_closed_form():
  for name in ('baseline', 'byte_pool'):
    cfg = model_cfg(name)
    kind = kinds.get_kind(name)
    b = kind.param_breakdown(factory.abstract_params(kind.build(cfg), cfg), cfg)
    attention = 12 * cfg.num_layers * cfg.max_len * cfg.hidden_dim / 2
    if name == 'baseline':
      want = 6 * (b['core'] + cfg.vocab_size * cfg.hidden_dim) + attention
    else:
      want = 6 * (b['core'] + (cfg.byte_pool.max_bytes_per_chunk + 1)
                  * (b['embedding'] + b['head'])) + attention
    assert kind.flops_per_target(cfg, b) == pytest.approx(want)


def test_byte_pool_checks_name_their_key():
  c = config_lib.base_config()
  c.model.kind = 'byte_pool'
  c.model.byte_pool.pooling = 'max'
  with pytest.raises(config_validate.ConfigError, match=r'model\.byte_pool\.pooling=.max.'):
    config_validate.validate(c)


class _ContractLM(nn.Module):
  """A one-parameter LM returning extra_nll and stats, to check the step's contract."""

  @nn.compact
  def __call__(self, batch, *, deterministic=True):
    w = self.param('w', nn.initializers.ones, ())
    mask = batch['loss_mask']
    logprobs = -w * jnp.ones(mask.shape)
    return dict(logprobs=logprobs, units=jnp.ones(mask.shape), greedy=mask > 0,
                extra_nll=3.0 * w * jnp.sum(mask),
                stats={'layers_used': 2.0 * jnp.sum(mask)})


def test_extra_nll_trains_but_is_not_reported_and_stats_are_per_target():
  model = _ContractLM()
  mask = np.ones((2, 4, 5), np.float32)
  mask[1, 0, :] = 0.0
  batches = dict(loss_mask=mask, target_bytes=np.ones_like(mask, np.int32) * 2)
  params = {'w': jnp.ones(())}
  tx = optax.sgd(1.0)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.key(0))
  new, m = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))(state, batches)
  targets = mask.sum()
  # Reported loss: the nll only (w = 1 nats per unit); the objective: nll + extra = 4 w.
  np.testing.assert_allclose(m['loss'], 1.0)
  np.testing.assert_allclose(m['bits_per_byte'], 1.0 / np.log(2) / 2)
  np.testing.assert_allclose(m['extra_loss'], 3.0)
  np.testing.assert_allclose(m['layers_used'], 2.0)   # summed over micro-batches, / targets
  np.testing.assert_allclose(m['targets'], targets)
  np.testing.assert_allclose(new.params['w'], 1.0 - 4.0)  # d(4 w * targets)/dw / units
  ev = step_lib.eval_step(params, jax.tree.map(lambda x: x[0], batches), model=model)
  assert set(ev) == {'nll', 'units', 'bytes', 'targets', 'extra_nll', 'stats'}
