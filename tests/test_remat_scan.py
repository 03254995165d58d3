"""model.remat and model.scan_layers: same loss and gradients as the plain model; checkpoints
convert between the scanned and unscanned layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config
from stlm.models import factory
from stlm.models import scan_convert
from stlm.train import step as step_lib

B, T, V, L = 2, 8, 37, 2


def _cfg(**overrides):
  m = config.base_config().model
  m.update(dict(num_layers=L, hidden_dim=16, num_heads=2, num_kv_heads=1, ffn_dim=24,
                max_len=T, dropout=0.1, vocab_size=V, ce_chunk=0))
  m.update(overrides)
  return m


def _batch():
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 5 + [2] * 3, [1] * 6 + [0] * 2], np.int32)
  return dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
              targets=rng.integers(0, V, (B, T)).astype(np.int32), segment_ids=seg,
              positions=np.array([[0, 1, 2, 3, 4, 0, 1, 2], list(range(6)) + [0, 0]], np.int32),
              loss_mask=(seg > 0).astype(np.float32), target_bytes=np.ones((B, T), np.int32))


def _loss_and_grads(cfg, params, train):
  model = factory.build_model(cfg)

  def nll(p):
    return step_lib.loss_sums(model, p, _batch(), rng=jax.random.PRNGKey(1), train=train)['nll']
  return jax.jit(jax.value_and_grad(nll))(params)


@pytest.fixture(scope='module')
def plain_params():
  cfg = _cfg()
  return factory.init_params(factory.build_model(cfg), cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def plain(plain_params):
  return plain_params, _loss_and_grads(_cfg(), plain_params, train=True)


def _assert_close(got, want):
  value, grads = got
  np.testing.assert_allclose(value, want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads,
               want[1])


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['block', 'dots_saveable'])
def test_remat_same_loss_and_grads(plain, remat):
  """Same parameter names, same dropout masks, same values: remat only changes memory/time."""
  params, want = plain
  cfg = _cfg(remat=remat)
  abstract = factory.abstract_params(factory.build_model(cfg), cfg)
  assert jax.tree.structure(factory.nn.unbox(abstract)) == jax.tree.structure(params)
  _assert_close(_loss_and_grads(cfg, params, train=True), want)


@pytest.mark.slow
def test_scan_layers_same_loss_and_grads_after_conversion(plain):
  """Without dropout (scan splits the dropout rng per layer differently)."""
  params, _ = plain
  want = _loss_and_grads(_cfg(), params, train=False)
  cfg = _cfg(scan_layers=True, remat='block')
  scanned = scan_convert.to_scanned(params, L)
  abstract = factory.nn.unbox(factory.abstract_params(factory.build_model(cfg), cfg))
  assert jax.tree.structure(abstract) == jax.tree.structure(scanned)
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, scanned)
  value, grads = _loss_and_grads(cfg, scanned, train=False)
  _assert_close((value, scan_convert.to_unscanned(grads)), want)


def test_conversion_round_trip_and_errors(plain_params):
  params = plain_params
  back = scan_convert.to_unscanned(scan_convert.to_scanned(params, L))
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match='block_0..block_2'):
    scan_convert.to_scanned(params, 3)


def test_unknown_remat_is_refused():
  cfg = config.base_config()
  cfg.model.remat = 'everything'
  from stlm.config import validate as config_validate  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_validate.ConfigError, match='model.remat'):
    config_validate.validate(cfg)
