"""The chunked output layer + log-softmax equals the full-logits path, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config
from stlm.models import chunked_ce
from stlm.models import factory
from stlm.train import step as step_lib

N, D, V = 14, 8, 37   # N not divisible by the chunk of 4: the last chunk is padded


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(N, D)).astype(np.float32)
  w = rng.normal(size=(V, D)).astype(np.float32)
  t = rng.integers(0, V, N).astype(np.int32)
  mask = (rng.random(N) > 0.3).astype(np.float32)
  return h, w, t, mask


def _plain(h, w, t):
  return chunked_ce.plain_target_scores(h @ w.T, t)


def test_values_and_greedy_match_plain():
  h, w, t, _ = _inputs()
  t[:4] = np.argmax(h[:4] @ w.T, axis=-1)  # some targets are the argmax
  lp, greedy = jax.jit(lambda h, w: chunked_ce.target_scores(h, w, t, chunk=4))(h, w)
  lp_ref, greedy_ref = _plain(h, w, t)
  np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(greedy, greedy_ref)
  assert greedy[:4].all()


@pytest.mark.slow
@pytest.mark.parametrize('speculate', [True, False])
@pytest.mark.parametrize('cotangent', ['loss', 'other'])
def test_gradients_match_plain(speculate, cotangent):
  """-sum(lp * mask) takes the forward-pass gradients; any other cotangent recomputes."""
  h, w, t, mask = _inputs(1)
  weights = mask if speculate else None
  coef = mask if cotangent == 'loss' else np.random.default_rng(2).normal(size=N).astype(
      np.float32)

  def chunked(h, w):
    return -jnp.sum(chunked_ce.target_scores(h, w, t, chunk=4, weights_N=weights)[0] * coef)

  def plain(h, w):
    return -jnp.sum(_plain(h, w, t)[0] * coef)

  got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
  want = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_rejects_bad_chunk():
  h, w, t, _ = _inputs()
  with pytest.raises(ValueError, match='chunk'):
    chunked_ce.target_scores(h, w, t, chunk=0)


def _model_cfg(chunk, tied):
  m = config.base_config().model
  m.update(dict(num_layers=1, hidden_dim=16, num_heads=2, num_kv_heads=1, ffn_dim=24,
                max_len=8, dropout=0.0, vocab_size=V, ce_chunk=chunk, tie_embeddings=tied))
  return m


@pytest.mark.slow
@pytest.mark.parametrize('tied', [True, False])
def test_baseline_loss_and_grads_match_plain(tied):
  """The model's loss (masked, packed) and every parameter gradient agree with ce_chunk=0."""
  rng = np.random.default_rng(3)
  B, T = 2, 7
  seg = np.array([[1] * 4 + [2] * 3, [1] * 5 + [0] * 2], np.int32)
  batch = dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
               targets=rng.integers(0, V, (B, T)).astype(np.int32), segment_ids=seg,
               positions=np.array([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 0]], np.int32),
               loss_mask=(seg > 0).astype(np.float32), target_bytes=np.ones((B, T), np.int32))
  results = []
  for chunk in (0, 3):
    cfg = _model_cfg(chunk, tied)
    model = factory.build_model(cfg)
    params = factory.init_params(model, cfg, jax.random.PRNGKey(0))

    def nll(p, model=model):
      sums = step_lib.loss_sums(model, p, batch)
      return sums['nll'], sums

    (value, _), grads = jax.jit(jax.value_and_grad(nll, has_aux=True))(params)
    out = jax.jit(lambda p, model=model: model.apply({'params': p}, batch))(params)
    results.append((value, grads, out))
  (v0, g0, o0), (v1, g1, o1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(o1['logprobs'], o0['logprobs'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(o1['greedy'], o0['greedy'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
