"""Tests for stlm/models/baseline.py and stlm/models/factory.py."""

import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config
from stlm.models import baseline
from stlm.models import factory
from stlm.models import kinds
from tests.param_fill import fill_like

B, T, V, D = 2, 10, 61, 32
# Inputs are numpy: eager jnp ops each compile on first use (slow on CPU).
SEG = np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], np.int32)
POS = np.array([list(range(6)) + list(range(4)), list(range(8)) + [0, 0]], np.int32)
AXIS_NAMES = {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'position'}


def tiny_cfg(**overrides):
  m = config.base_config().model
  m.update(dict(num_layers=2, hidden_dim=D, num_heads=4, num_kv_heads=2, ffn_dim=48,
                max_len=16, dropout=0.0, vocab_size=V))
  m.update(overrides)
  return m


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, V, (B, T)).astype(np.int32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  return dict(inputs=inputs, targets=targets, segment_ids=SEG, positions=POS,
              loss_mask=(SEG > 0).astype(np.float32), target_bytes=np.ones((B, T), np.int32))


def random_params(model, cfg, seed=0):
  """Params of the model's shapes filled from numpy (real init is tested separately)."""
  return fill_like(nn.unbox(factory.abstract_params(model, cfg)), seed)


@functools.lru_cache(maxsize=None)
def _setup(overrides=()):
  """(model, params, jitted forward returning (outputs, logits)) per config, compiled once."""
  cfg = tiny_cfg(**dict(overrides))
  model = factory.build_model(cfg)
  params = random_params(model, cfg)

  @jax.jit
  def forward(params, batch):
    out = model.apply({'params': params}, batch)
    logits = model.apply({'params': params}, batch['inputs'], batch['segment_ids'],
                         batch['positions'], method=baseline.BaselineLM.logits)
    return out, logits
  return model, params, forward


def test_outputs_are_log_probs_of_targets():
  _, params, forward = _setup()
  batch = _batch()
  out, logits = forward(params, batch)
  assert set(out) == {'logprobs', 'units', 'greedy'}
  assert out['logprobs'].dtype == jnp.float32 and out['logprobs'].shape == (B, T)
  assert out['units'].dtype == jnp.float32 and out['greedy'].dtype == jnp.bool_
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, V)
  logits64 = np.asarray(logits, np.float64)
  log_softmax = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))
  expected = np.take_along_axis(log_softmax, batch['targets'][..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out['logprobs'], expected, atol=1e-5)
  np.testing.assert_array_equal(out['units'], 1.0)
  argmax = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(out['greedy'], argmax == batch['targets'])
  # Targets set to the argmax make every prediction greedy-correct.
  batch['targets'] = argmax.astype(np.int32)
  assert bool(forward(params, batch)[0]['greedy'].all())


def test_future_token_never_changes_earlier_logits():
  _, params, forward = _setup()
  batch = _batch()
  changed = dict(batch, inputs=batch['inputs'].copy())
  changed['inputs'][:, 3] = (batch['inputs'][:, 3] + 7) % V
  logits, logits2 = np.asarray(forward(params, batch)[1]), np.asarray(forward(params, changed)[1])
  np.testing.assert_array_equal(logits2[:, :3], logits[:, :3])
  assert np.abs(logits2[:, 3] - logits[:, 3]).max() > 1e-4


@pytest.mark.parametrize('overrides', [
    (), pytest.param((('position', 'learned'),), marks=pytest.mark.slow)], ids=['rope', 'learned'])
def test_packed_documents_are_isolated(overrides):
  _, params, forward = _setup(overrides)
  batch = _batch()
  logits = np.asarray(forward(params, batch)[1])
  changed = dict(batch, inputs=batch['inputs'].copy())
  changed['inputs'][0, 6:] = (batch['inputs'][0, 6:] + 5) % V
  np.testing.assert_array_equal(np.asarray(forward(params, changed)[1])[0, :6], logits[0, :6])
  # Document 2 alone at the start of a row, positions from 0, padding after.
  alone = dict(batch, inputs=np.zeros_like(SEG), segment_ids=np.zeros_like(SEG),
               positions=np.zeros_like(POS))
  alone['inputs'][0, :4] = batch['inputs'][0, 6:]
  alone['segment_ids'][0, :4], alone['positions'][0, :4] = 1, np.arange(4)
  np.testing.assert_allclose(np.asarray(forward(params, alone)[1])[0, :4], logits[0, 6:],
                             atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_decode_with_cache_matches_full_logits():
  model, params, forward = _setup()
  batch = _batch()
  full = np.asarray(forward(params, batch)[1])

  @jax.jit
  def step(params, cache, inputs, seg, pos):
    variables = {'params': params} if cache is None else {'params': params, 'cache': cache}
    logits, mutated = model.apply(variables, inputs, seg, pos, decode=True, mutable=['cache'],
                                  method=baseline.BaselineLM.logits)
    return logits, mutated['cache']

  # Token by token, then in pieces (no cache at first: the first apply starts an empty one).
  cache, outs, start = None, [], 0
  for n in (1, 1, 4, 4):
    sl = slice(start, start + n)
    logits, cache = step(params, cache, batch['inputs'][:, sl], SEG[:, sl], POS[:, sl])
    outs.append(np.asarray(logits))
    start += n
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-4)


def test_tied_and_untied_param_counts_differ_by_vocab_times_hidden():
  counts = {}
  for tie in (True, False):
    cfg = tiny_cfg(tie_embeddings=tie)
    abstract = factory.abstract_params(factory.build_model(cfg), cfg)
    counts[tie] = factory.param_breakdown(abstract, cfg)
  assert counts[False]['total'] - counts[True]['total'] == V * D
  assert counts[True]['head'] == 0 and counts[True]['tied']
  assert counts[False]['head'] == V * D and not counts[False]['tied']
  assert counts[True]['embedding'] == V * D
  assert counts[True]['core'] == counts[False]['core']
  for c in counts.values():
    assert c['embedding'] + c['head'] + c['core'] == c['total']


@pytest.mark.parametrize('overrides', [
    dict(),
    dict(tie_embeddings=False, position='learned', use_bias=True, norm='layer', ffn_type='gelu'),
], ids=['default', 'untied-learned-bias'])
def test_every_param_has_logical_axis_names(overrides):
  cfg = tiny_cfg(**overrides)
  model = factory.build_model(cfg)
  boxed = factory.abstract_params(model, cfg)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf
  specs = factory.logical_partition_specs(model, cfg)
  assert specs['embed']['embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert len(jax.tree_util.tree_leaves(specs, is_leaf=is_spec)) == len(leaves)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg = tiny_cfg(dtype='bfloat16')
  model = factory.build_model(cfg)
  abstract = nn.unbox(factory.abstract_params(model, cfg))
  assert {x.dtype for x in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype('float32')}
  _, params, forward32 = _setup()
  out = jax.jit(lambda p, b: model.apply({'params': p}, b))(params, _batch())
  assert out['logprobs'].dtype == jnp.float32
  np.testing.assert_allclose(out['logprobs'], forward32(params, _batch())[0]['logprobs'],
                             atol=0.1, rtol=0.05)


@pytest.mark.parametrize('preset,target', [('10m', 10e6), ('50m', 50e6), ('100m', 100e6)])
def test_preset_param_counts_match_table_1(preset, target):
  cfg = config.apply_preset(config.base_config(), preset).model
  cfg.vocab_size = 50257
  abstract = factory.abstract_params(factory.build_model(cfg), cfg)  # shapes only, no memory
  total = factory.count_params(abstract)
  assert abs(total - target) / target < 0.10, total
  assert factory.param_breakdown(abstract, cfg)['total'] == total


@pytest.mark.slow
def test_init_params_real_init():
  cfg = tiny_cfg()
  model, _, forward = _setup()
  params = factory.init_params(model, cfg, jax.random.key(0, impl='rbg'))  # rbg: quick compile
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  assert factory.count_params(params) == factory.count_params(factory.abstract_params(model, cfg))
  emb = np.asarray(params['embed']['embedding'])
  assert emb.shape == (V, D) and 0.01 < emb.std() < 0.03
  # A fresh model predicts close to uniform: log p(target) near -ln V.
  out = forward(params, _batch())[0]
  np.testing.assert_allclose(np.asarray(out['logprobs']).mean(), -math.log(V), atol=0.5)


def test_factory_kinds_and_dummy_batch():
  with pytest.raises(ValueError, match='model.kind'):
    factory.build_model(tiny_cfg(kind='rnn'))
  cfg = tiny_cfg(kind='byte_pool')
  batch = factory.dummy_batch(cfg, batch_size=3)
  assert batch['inputs'].shape == (3, 16, cfg.byte_pool.max_bytes_per_chunk + 1)  # + end-of-chunk
  assert batch['positions'].shape == (3, 16)
  assert type(factory.build_model(cfg)).__name__ == 'BytePoolLM'
  assert factory.dummy_batch(tiny_cfg(), 2)['inputs'].shape == (2, 16)


def test_byte_pool_missing_gives_clear_error(monkeypatch):
  import stlm.models  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(stlm.models, 'byte_pool', raising=False)
  for name in ('stlm.models.byte_pool', 'stlm.models.byte_pool.kind'):   # as if absent
    monkeypatch.setitem(sys.modules, name, None)
  # A registry that has not yet loaded its kind modules, so it tries (and fails) again.
  monkeypatch.setattr(kinds, '_REGISTRY', {k: v for k, v in kinds._REGISTRY.items()
                                           if k != 'byte_pool'})
  monkeypatch.setattr(kinds, '_loaded', False)
  monkeypatch.setattr(kinds, '_missing', {})
  with pytest.raises(ImportError, match='byte_pool.py'):
    factory.build_model(tiny_cfg(kind='byte_pool'))
