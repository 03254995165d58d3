"""Schedules, the AdamW decay mask, and Muon for the hidden matrices."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.config import validate as config_validate
from stlm.models import factory
from stlm.train import checkpoint
from stlm.train import optimizer
from stlm.train import setup as setup_lib
from stlm.train import sharding


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
  assert all(jax.tree.leaves(optimizer.decay_mask(params, 'all')))


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


# ----------------------------------------------------------------------------- Muon


def newton_schulz5(g):
  """Muon's orthogonalisation as modded-nanogpt writes it: Frobenius-normalise, then five
  quintic steps X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation."""
  a, b, c = 3.4445, -4.775, 2.0315
  x = g / (np.linalg.norm(g) + 1e-8)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  for _ in range(5):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def reference_muon_updates(grads, lr, beta):
  """Updates of Muon (optax.contrib.muon's definition) for matrices (fan_in x fan_out).

  Nesterov momentum with bias correction: mu_t = beta mu_{t-1} + (1 - beta) g_t, the update
  direction beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t), orthogonalised,
  scaled by sqrt(max(1, fan_out / fan_in)) and by -lr.
  """
  mu, out = 0.0, []
  for t, g in enumerate(grads, start=1):
    mu = beta * mu + (1 - beta) * g
    direction = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    fan_in, fan_out = g.shape
    out.append(-lr * np.sqrt(max(1.0, fan_out / fan_in)) * newton_schulz5(direction))
  return out


def muon_cfg(**kw):
  return train_cfg(**{**dict(optimizer='muon', schedule='constant', warmup_steps=0,
                             grad_clip=0.0, muon_lr=0.02, muon_momentum=0.95,
                             muon_weight_decay=0.0), **kw})


def run_updates(tx, params, grads_per_step):
  state = tx.init(params)
  out = []
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    out.append(updates)
  return out


# (shape, logical axes, the param as Muon's matrices: (batch, fan_in, fan_out), and back).
MATRIX_LAYOUTS = {
    'ffn_up_wide': ((6, 10), ('embed', 'mlp'),
                    lambda w: w[None], lambda m, shape: m[0]),
    'ffn_down_tall': ((10, 6), ('mlp', 'embed'),
                      lambda w: w[None], lambda m, shape: m[0]),
    # q/k/v: embed -> (heads, head_dim), one (E, H*D) matrix.
    'attention_q': ((8, 2, 3), ('embed', 'heads', 'head_dim'),
                    lambda w: w.reshape(1, 8, 6), lambda m, shape: m.reshape(shape)),
    # o: (heads, head_dim) -> embed, one (H*D, E) matrix.
    'attention_o': ((2, 3, 8), ('heads', 'head_dim', 'embed'),
                    lambda w: w.reshape(1, 6, 8), lambda m, shape: m.reshape(shape)),
    # A scanned model's stacked layers: one matrix per layer.
    'scanned_q': ((2, 8, 2, 3), ('layers', 'embed', 'kv_heads', 'head_dim'),
                  lambda w: w.reshape(2, 8, 6), lambda m, shape: m.reshape(shape)),
}


@pytest.mark.parametrize('layout', MATRIX_LAYOUTS)
def test_muon_updates_equal_the_reference_newton_schulz(layout):
  shape, axes, to_matrices, from_matrices = MATRIX_LAYOUTS[layout]
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=shape).astype(np.float32) for _ in range(2)]
  tx = optimizer.make_optimizer(muon_cfg(), {'w': axes})
  params = {'w': jnp.zeros(shape)}
  got = run_updates(tx, params, [{'w': jnp.asarray(g)} for g in grads])
  # The first update is the orthogonalised gradient; the second checks the momentum.
  per_matrix = [reference_muon_updates([to_matrices(g.astype(np.float64))[i] for g in grads],
                                       lr=0.02, beta=0.95)
                for i in range(to_matrices(grads[0]).shape[0])]
  for step in range(2):
    want = from_matrices(np.stack([m[step] for m in per_matrix]), shape)
    np.testing.assert_allclose(got[step]['w'], want, rtol=2e-4, atol=2e-6,
                               err_msg=f'{layout} step {step + 1}')


def test_muon_update_is_orthogonal_and_ignores_the_gradient_scale():
  # What makes it Muon: the update's singular values are ~1 (Newton-Schulz with these
  # coefficients lands in roughly [0.7, 1.2]) whatever the gradient's size.
  rng = np.random.default_rng(1)
  g = rng.normal(size=(16, 16)).astype(np.float32)
  tx = optimizer.make_optimizer(muon_cfg(muon_lr=1.0), {'w': ('embed', 'mlp')})
  small, = run_updates(tx, {'w': jnp.zeros((16, 16))}, [{'w': jnp.asarray(1e-3 * g)}])
  large, = run_updates(tx, {'w': jnp.zeros((16, 16))}, [{'w': jnp.asarray(1e3 * g)}])
  np.testing.assert_allclose(small['w'], large['w'], rtol=1e-4, atol=1e-6)
  singular = np.linalg.svd(np.asarray(small['w']), compute_uv=False)
  assert 0.6 < singular.min() and singular.max() < 1.3, singular


def test_muon_leaves_the_other_params_to_the_configured_adamw():
  # Tables, norms and the head take exactly the update optimizer='adamw' gives them:
  # train.lr, b1, b2, eps and the decay mask (the head decays, the table and norm do not).
  axes = {'w': ('embed', 'mlp'), 'table': ('vocab', 'embed'), 'head': ('embed', 'vocab'),
          'norm': ('norm',)}
  rng = np.random.default_rng(2)
  params = {'w': jnp.ones((4, 6)), 'table': jnp.ones((5, 4)), 'head': jnp.ones((4, 5)),
            'norm': jnp.ones(4)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(2)]
  common = dict(lr=0.01, weight_decay=0.5, b1=0.8, b2=0.9, eps=1e-6)
  muon = run_updates(optimizer.make_optimizer(muon_cfg(**common), axes), params, grads)
  adamw = run_updates(optimizer.make_optimizer(
      muon_cfg(**common, optimizer='adamw'), axes), params, grads)
  for step in range(2):
    for name in ('table', 'head', 'norm'):
      np.testing.assert_allclose(muon[step][name], adamw[step][name], rtol=1e-6, err_msg=name)
    assert not np.allclose(muon[step]['w'], adamw[step]['w'])
  # Muon's own decay: muon_lr * muon_weight_decay * w on top of the orthogonalised update.
  zero = [jax.tree.map(jnp.zeros_like, params)]
  decayed, = run_updates(optimizer.make_optimizer(muon_cfg(muon_weight_decay=0.5), axes),
                         params, zero)
  np.testing.assert_allclose(decayed['w'], -0.02 * 0.5, rtol=1e-6)


def _trained_by(tx, params) -> dict[str, set[str]]:
  """{'muon' | 'adamw': the paths of the params whose per-param state that optimizer holds}.

  A per-param state leaf (a moment) ends in its param's path (dict keys); the first dict key
  of its path is the optimizer partition that holds it.
  """
  owners = {'muon': set(), 'adamw': set()}
  for path, _ in jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, params))[0]:
    is_key = [isinstance(k, jax.tree_util.DictKey) for k in path]
    trailing = len(path) - max((i + 1 for i, d in enumerate(is_key) if not d), default=0)
    if trailing:
      owner = path[is_key.index(True)].key
      owners[owner].add('/'.join(k.key for k in path[len(path) - trailing:]))
  return owners


MODELS = {
    'baseline': ('baseline', {}),
    'baseline_untied_head': ('baseline', {'tie_embeddings': False}),
    'baseline_scanned': ('baseline', {'scan_layers': True}),
    'byte_pool_v2': ('byte_pool', {}),
    'byte_pool_v2_attention_pool_slot_add': (
        'byte_pool', {'byte_pool.pooling': 'attention', 'byte_pool.condition': 'slot_add',
                      'tie_embeddings': False}),
    'byte_pool_v2_slots_pool': ('byte_pool', {'byte_pool.pooling': 'slots',
                                              'byte_pool.condition': 'add'}),
    'byte_pool_paper_attention_pool': ('byte_pool', {'byte_pool.version': 'paper',
                                                     'byte_pool.pooling': 'attention',
                                                     'byte_pool.condition': 'add'}),
}
# Last path component -> who trains it. Everything a model has must be listed here.
MUON_PARAMS = {'q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'gate_kernel', 'up_kernel',
               'down_kernel', 'pool_k_kernel', 'to_core', 'slots_to_core', 'from_core'}
# Tables (token, byte, n-gram, slot and age embeddings), output heads, norms, and learned
# per-head query vectors (no input axis: not a map of activations).
ADAMW_PARAMS = {'embedding', 'lm_head', 'head', 'ngram_3', 'ngram_4', 'slot_embedding',
                'age_embedding', 'query', 'pool_query', 'scale'}


@pytest.mark.parametrize('model', MODELS)
def test_muon_trains_the_hidden_matrices_and_adamw_the_rest(model):
  config_name, overrides = MODELS[model]
  c = importlib.import_module(f'configs.{config_name}').get_config('tiny')
  for key, value in overrides.items():
    node = c.model
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  boxed = factory.abstract_params(factory.build_model(c.model), c.model)
  tx = optimizer.make_optimizer(muon_cfg(), optimizer.param_axes(boxed))
  owners = _trained_by(tx, nn.unbox(boxed))
  every = {'/'.join(k.key for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
  assert owners['muon'] | owners['adamw'] == every and not owners['muon'] & owners['adamw']
  muon_names = {p.rsplit('/', 1)[-1] for p in owners['muon']}
  adamw_names = {p.rsplit('/', 1)[-1] for p in owners['adamw']}
  assert muon_names <= MUON_PARAMS, muon_names - MUON_PARAMS
  assert adamw_names <= ADAMW_PARAMS, adamw_names - ADAMW_PARAMS
  assert {'q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'down_kernel'} <= muon_names
  assert {'embedding', 'scale'} <= adamw_names
  b = c.model.byte_pool
  if c.model.kind == 'byte_pool':
    assert 'from_core' in muon_names or 'cross' in {p.split('/')[1] for p in owners['muon']}
    assert {'to_core', 'slots_to_core'} & muon_names
  if c.model.kind == 'byte_pool' and b.version == 'v2':
    assert {'ngram_3', 'ngram_4', 'slot_embedding'} <= adamw_names
    if b.condition == 'cross_attention':
      assert 'age_embedding' in adamw_names
  if b.pooling == 'attention':
    assert {'query', 'pool_query'} & adamw_names
    assert {'k_kernel', 'pool_k_kernel'} & muon_names
  if not c.model.tie_embeddings:
    assert {'lm_head', 'head'} & adamw_names


def test_attention_kernels_reshape_to_input_by_output_matrices():
  dims = optimizer.muon_dimension_numbers
  md = optax.contrib.MuonDimensionNumbers
  assert dims(('embed', 'heads', 'head_dim')) == md((0,), (1, 2))
  assert dims(('embed', 'kv_heads', 'head_dim')) == md((0,), (1, 2))
  assert dims(('heads', 'head_dim', 'embed')) == md((0, 1), (2,))
  assert dims(('layers', 'embed', 'heads', 'head_dim')) == md((1,), (2, 3))
  assert dims(('embed', None, None)) == md((0,), (1, 2))      # reads the residual stream
  assert dims((None, None, 'embed')) == md((0, 1), (2,))      # writes it
  for adamw_only in [('heads', 'head_dim'), ('vocab', 'embed'), ('embed', 'vocab'),
                     ('position', 'embed'), ('position', 'heads', 'head_dim'), ('norm',),
                     ('layers', 'norm'), ('embed',), ('layers', 'embed')]:
    assert dims(adamw_only) is None, adamw_only


def test_unknown_optimizer_names_the_key_and_the_choices():
  c = config_lib.base_config()
  c.train.optimizer = 'lion'
  with pytest.raises(config_validate.ConfigError,
                     match=r"config\.train\.optimizer='lion': unknown value; choose one of "
                           r'adamw, muon'):
    config_validate.validate(c)
  with pytest.raises(ValueError, match='train.optimizer'):
    optimizer.make_optimizer(train_cfg(optimizer='lion'))


def test_checkpoints_without_the_optimizer_keys_resume_as_adamw():
  saved = config_lib.base_config().to_dict()
  for key in ('optimizer', 'muon_lr', 'muon_momentum', 'muon_weight_decay'):
    del saved['train'][key]
  assert checkpoint.config_differences(saved, config_lib.base_config()) == []
  muon = config_lib.base_config()
  muon.train.optimizer = 'muon'
  assert checkpoint.config_differences(saved, muon) == [
      "train.optimizer: checkpoint has 'adamw', this run has 'muon'"]


def test_muon_config_trains():
  # The trainer's own construction (sharded init, opt-state shardings, donating step) on one
  # fixed batch: the loss is finite and falls at every step.
  c = importlib.import_module('configs.muon').get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 max_len=16, vocab_size=64, dropout=0.0)
  c.train.update(batch_size=4, grad_accum=1, warmup_steps=0, schedule='constant')
  config_validate.validate(c)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  built = setup_lib.build_train_step(c, factory.build_model(c.model), mesh)
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 64, (1, 4, 16)).astype(np.int32)
  ones = np.ones((1, 4, 16), np.int32)
  batch = {'inputs': inputs, 'targets': (inputs * 7 + 3) % 64, 'segment_ids': ones,
           'positions': np.broadcast_to(np.arange(16, dtype=np.int32), (1, 4, 16)),
           'loss_mask': ones.astype(np.float32), 'target_bytes': ones}
  state, losses = built.init(), []
  with sharding.mesh_context(mesh):
    for _ in range(5):
      state, metrics = built.step(state, sharding.global_batch(batch, mesh, True))
      losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)), losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
