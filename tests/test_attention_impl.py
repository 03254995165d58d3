"""The Pallas kernel is a drop-in for XLA attention inside a real training step of the tiny preset."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kernels import attention
from stlm import config as config_lib
from stlm.models import factory
from stlm.train import step as step_lib
from tests.test_step import random_batch


def _loss_and_grads(impl, batch):
  """Loss and gradients of the tiny preset's training loss (the train step's gradient)."""
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.vocab_size = 257
  c.model.attention_impl = impl
  c = ml_collections.ConfigDict(c.to_dict())
  model = factory.build_model(c.model)
  params = factory.init_params(model, c.model, jax.random.key(0))

  def loss_fn(p):
    sums = step_lib.loss_sums(model, p, batch)
    return sums['nll'] / sums['units']

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.slow
def test_pallas_training_step_matches_xla():
  """Tolerances from the kernel's float32 error analysis (kernels/README.md): loss rtol 1e-5,
  every gradient leaf within 1e-4 of its largest entry."""
  batch = random_batch(np.random.default_rng(0), 2, 128, 257)   # packed rows with padding
  loss_x, grads_x = _loss_and_grads('xla', batch)
  loss_p, grads_p = _loss_and_grads('pallas', batch)
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
  for (path, gx), gp in zip(jax.tree_util.tree_leaves_with_path(grads_x), jax.tree.leaves(grads_p)):
    scale = float(jnp.max(jnp.abs(gx)))
    err = float(jnp.max(jnp.abs(gx - gp)))
    assert err <= 1e-4 * scale + 1e-9, (jax.tree_util.keystr(path), err, scale)


def test_auto_picks_xla_on_cpu():
  q = jnp.ones((1, 4, 2, 16))
  assert not attention._pallas_supported(q.shape, q.shape, q.dtype)  # pylint: disable=protected-access
