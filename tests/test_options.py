"""Issue 9 options 1, 5, 6, 7: weight sharing (+ LoRA), dropout and LR schedules, decay policy."""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.models import dropout as dropout_lib
from stlm.models import factory
from stlm.models import kinds
from stlm.train import optimizer
from stlm.train import state as state_lib
from stlm.train import step as step_lib
from tests import param_fill

L, E, H, K, F, V, T = 2, 32, 4, 2, 64, 64, 8
D = E // H


def model_cfg(kind='baseline', **kw):
  c = config_lib.base_config().model
  c.update(kind=kind, num_layers=L, hidden_dim=E, num_heads=H, num_kv_heads=K, ffn_dim=F,
           vocab_size=V, max_len=T, dropout=0.0)
  c.byte_pool.update(max_bytes_per_chunk=4, byte_dim=16, encoder_layers=1, decoder_layers=1,
                     encoder_heads=2, decoder_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
  c.update(kw)
  return ml_collections.ConfigDict(c.to_dict())


def core_of(params, kind):
  return nn.unbox(params)['transformer' if kind == 'baseline' else 'core']


ATTN = E * H * D + 2 * E * K * D + H * D * E
FFN = 3 * E * F  # SwiGLU: gate, up, down
NORMS = 2 * E    # per layer; the final norm adds E once


def closed_form(mode, r):
  per_layer = NORMS + (0 if 'attn' in mode else ATTN) + (0 if mode in ('ffn', 'ffn_attn') else FFN)
  shared = (ATTN if mode == 'ffn_attn' else 0) + (FFN if mode in ('ffn', 'ffn_attn') else 0)
  lora = 0
  if r:
    lora += r * ((E + F) * 2 + (F + E))                              # gate, up, down
    if mode == 'ffn_attn':
      lora += r * ((E + H * D) + 2 * (E + K * D) + (H * D + E))      # q, k, v, o
  return L * (per_layer + lora) + shared + E


@pytest.mark.parametrize('kind', ['baseline', pytest.param('byte_pool', marks=pytest.mark.slow)])
def test_sharing_param_counts_match_the_closed_form(kind):
  flops = {}
  for mode, r in (('none', 0), ('ffn', 0), ('ffn_attn', 0), ('ffn', 4), ('ffn_attn', 4)):
    cfg = model_cfg(kind, sharing=mode, sharing_lora_rank=r)
    abstract = factory.abstract_params(factory.build_model(cfg), cfg)
    b = factory.param_breakdown(abstract, cfg)
    assert kinds.count_params(core_of(abstract, kind)) == b['core'] == closed_form(mode, r), \
        (mode, r)
    flops[mode, r] = kinds.get_kind(kind).flops_per_target(cfg, b)
    report = kinds.get_kind(kind).param_report(abstract, cfg) or ''
    if mode != 'none':
      saved = closed_form('none', 0) - closed_form(mode, r)  # against the unshared core
      assert f'{saved:,} fewer' in report, report
  # Shared weights still run in every layer: FLOPs equal the unshared model's (+ LoRA's).
  assert flops['ffn', 0] == flops['ffn_attn', 0] == flops['none', 0]
  lora = closed_form('ffn', 4) - closed_form('ffn', 0)
  assert flops['ffn', 4] == pytest.approx(flops['none', 0] + 6 * lora)


def test_options_off_keep_todays_param_tree():
  cfg = model_cfg()
  assert (cfg.sharing, cfg.sharing_lora_rank) == ('none', 0)
  core = core_of(factory.abstract_params(factory.build_model(cfg), cfg), 'baseline')
  assert set(core) == {f'block_{i}' for i in range(L)} | {'final_norm'}
  assert set(core['block_0']) == {'attn', 'attn_norm', 'ffn', 'ffn_norm'}


# Row 0 of the logprobs and the param count of tiny models under param_fill.fill_like(seed 0),
# computed with the code before these options existed (commit add999d): options off must
# reproduce them.
_BEFORE_OPTIONS = {
    'baseline': ([-4.1872, -4.4245, -5.0734, -4.1341,
                  -2.7910, -4.1435, -4.1157, -5.1574], 20),
    'byte_pool': ([-17.1379, -17.3620, -16.9812, -16.6045,
                  -17.0105, -16.8270, -17.0359, -16.6606], 43),
}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['baseline', 'byte_pool'])
def test_options_off_reproduce_the_model_before_them(kind):
  cfg = model_cfg(kind)
  model = factory.build_model(cfg)
  abstract = nn.unbox(factory.abstract_params(model, cfg))
  params = param_fill.fill_like(abstract, seed=0)
  rng = np.random.default_rng(0)
  b = factory.dummy_batch(cfg, 2, 8)
  lo, hi = (0, V) if kind == 'baseline' else (3, 259)
  b['inputs'] = rng.integers(lo, hi, b['inputs'].shape).astype(np.int32)
  b['targets'] = rng.integers(lo, hi, b['targets'].shape).astype(np.int32)
  if kind == 'byte_pool':  # two bytes, END_OF_CHUNK, padding
    b['inputs'][..., 2:] = 0
    b['targets'][..., 2] = 1
    b['targets'][..., 3:] = 0
  want_row, want_leaves = _BEFORE_OPTIONS[kind]
  assert len(jax.tree.leaves(abstract)) == want_leaves
  logprobs = model.apply({'params': params}, b)['logprobs']
  np.testing.assert_allclose(logprobs[0], want_row, atol=2e-4, rtol=0)


def test_dropout_without_a_schedule_is_flax_dropout():
  x = jnp.arange(1.0, 257.0)
  rngs = {'dropout': jax.random.key(3)}
  ours = dropout_lib.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
  theirs = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(ours, theirs)
  with dropout_lib.rate_factor(0.0):  # rate 0: exactly the input
    np.testing.assert_array_equal(
        dropout_lib.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs), x)


def _batch(cfg, seed=0):
  kind = kinds.get_kind(cfg.kind)
  return jax.tree.map(lambda a: a[0], kind.synthetic_batch(cfg, np.random.default_rng(seed),
                                                           (1, 2)))


def _strip_lora(params):
  if isinstance(params, dict):
    return {k: _strip_lora(v) for k, v in params.items() if not k.endswith('_lora')}
  return params


@functools.lru_cache(maxsize=None)
def lora_setup(kind):
  """A shared (ffn_attn) model with rank-2 adapters, params as at init: B = 0, A random."""
  cfg = model_cfg(kind, sharing='ffn_attn', sharing_lora_rank=2)
  model = factory.build_model(cfg)
  params = param_fill.fill_like(nn.unbox(factory.abstract_params(model, cfg)))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("_b']") else x, params)
  return cfg, model, params, _batch(cfg)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['baseline', 'byte_pool'])
def test_lora_with_zero_b_is_exactly_the_shared_model(kind):
  cfg, lora_model, params, batch = lora_setup(kind)
  shared_cfg = model_cfg(kind, sharing='ffn_attn')
  shared_model = factory.build_model(shared_cfg)
  with_lora = lora_model.apply({'params': params}, batch)['logprobs']
  without = shared_model.apply({'params': _strip_lora(params)}, batch)['logprobs']
  np.testing.assert_array_equal(with_lora, without)


@pytest.mark.slow
def test_both_lora_matrices_train():
  _, model, params, batch = lora_setup('baseline')
  grad_fn = jax.jit(jax.grad(lambda p: step_lib.loss_sums(model, p, batch)['nll']))
  g = grad_fn(params)['transformer']['block_1']['ffn_lora']
  assert float(jnp.abs(g['up_b']).max()) > 0            # B: A x is non-zero at init
  assert float(jnp.abs(g['up_a']).max()) == 0           # A: B = 0 blocks its gradient
  params = jax.tree.map(lambda p, d: p - 0.1 * d, params, grad_fn(params))
  g = grad_fn(params)['transformer']['block_1']['ffn_lora']
  assert float(jnp.abs(g['up_a']).max()) > 0            # after one update B != 0


@pytest.mark.slow
def test_shared_attention_decodes_like_the_full_forward():
  _, model, params, batch = lora_setup('baseline')
  # Non-zero B, so the per-layer adapters matter in both paths.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if jax.tree_util.keystr(p).endswith("_b']") else x, params)
  ids, seg, pos = batch['inputs'][:1], batch['segment_ids'][:1], batch['positions'][:1]
  full = model.apply({'params': params}, ids, seg, pos, method='logits')
  cache = jax.eval_shape(lambda: model.init(jax.random.key(0), ids[:, :1], seg[:, :1],
                                            pos[:, :1], decode=True, method='logits'))['cache']
  assert set(cache['transformer']['shared_attn']) >= {f'key_{i}' for i in range(L)}
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)

  @jax.jit
  def step(cache, i, s, p):
    out, mut = model.apply({'params': params, 'cache': cache}, i, s, p, decode=True,
                           method='logits', mutable=['cache'])
    return out, mut['cache']
  outs = []
  for t in range(T):
    out, cache = step(cache, ids[:, t:t + 1], seg[:, t:t + 1], pos[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


class _DropoutProbe(nn.Module):
  """Reports (as stats) how many of 4096 ones survive a Dropout(0.5)."""

  @nn.compact
  def __call__(self, batch, *, deterministic=True):
    w = self.param('w', nn.initializers.ones, ())
    kept = jnp.sum(dropout_lib.Dropout(0.5)(jnp.ones(4096), deterministic=deterministic) != 0)
    mask = batch['loss_mask']
    return dict(logprobs=-w * mask, units=mask, greedy=mask > 0,
                stats={'kept': kept * jnp.sum(mask) / 4096})


def _train_cfg(**kw):
  c = ml_collections.ConfigDict(config_lib.base_config().train.to_dict())
  c.update(kw)
  return c


@pytest.mark.parametrize('schedule,expected', [
    ('early', {0: 1.0, 9: 1.0, 10: 0.0, 500: 0.0}),
    pytest.param('late', {0: 0.0, 9: 0.0, 10: 1.0, 500: 1.0}, marks=pytest.mark.slow),
    pytest.param('linear', {0: 1.0, 5: 0.5, 10: 0.0, 500: 0.0}, marks=pytest.mark.slow),
])
def test_dropout_schedule_rates_inside_one_compiled_step(schedule, expected):
  cfg = _train_cfg(dropout_schedule=schedule, dropout_schedule_steps=10)
  model, tx = _DropoutProbe(), optax.sgd(0.0)
  params = {'w': jnp.ones(())}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.key(0))
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                 dropout_schedule=optimizer.make_dropout_schedule(cfg)))
  batch = {'loss_mask': np.ones((1, 1, 4), np.float32),
           'target_bytes': np.ones((1, 1, 4), np.int32)}
  for step, factor in expected.items():
    _, m = fn(state.replace(step=jnp.asarray(step, jnp.int32)), batch)
    assert float(m['dropout_factor']) == pytest.approx(factor)
    dropped = 1.0 - float(m['kept'])
    assert dropped == pytest.approx(0.5 * factor, abs=0.04), (step, dropped)
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_constant_dropout_schedule_changes_nothing():
  assert optimizer.make_dropout_schedule(_train_cfg()) is None


def test_wsd_values():
  base = dict(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule='wsd',
              wsd_decay_fraction=0.2)
  lin = optimizer.make_schedule(_train_cfg(**base, wsd_decay_shape='linear'))
  np.testing.assert_allclose([lin(0), lin(5), lin(10), lin(50), lin(80), lin(90), lin(100)],
                             [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1], atol=1e-6)
  cos = optimizer.make_schedule(_train_cfg(**base, wsd_decay_shape='cosine'))
  np.testing.assert_allclose([cos(79), cos(90), cos(100)], [1.0, 0.55, 0.1], atol=1e-6)
  sqrt = optimizer.make_schedule(_train_cfg(**base, wsd_decay_shape='1-sqrt'))
  np.testing.assert_allclose([sqrt(80), sqrt(85), sqrt(100)],
                             [1.0, 0.1 + 0.9 * (1 - 0.5), 0.1], atol=1e-6)


def test_inverse_sqrt_values():
  s = optimizer.make_schedule(_train_cfg(lr=1.0, steps=1000, warmup_steps=100,
                                         schedule='inverse_sqrt'))
  np.testing.assert_allclose([s(0), s(50), s(100), s(400), s(900)],
                             [0.0, 0.5, 1.0, 0.5, 1 / 3], atol=1e-6)


def test_weight_decay_like_the_original_repo():
  cfg = model_cfg(tie_embeddings=True)
  axes = optimizer.param_axes(factory.abstract_params(factory.build_model(cfg), cfg))
  nanogpt = optimizer.decay_mask(axes, 'ndim2')
  ours = optimizer.decay_mask(axes, 'matrices')
  assert nanogpt['embed']['embedding'] and not ours['embed']['embedding']  # tied table
  block = nanogpt['transformer']['block_0']
  assert block['attn']['q_kernel'] and not block['attn_norm']['scale']
  for name in ('baseline', 'sincos_pe', 'learned_pe', 'simple_ffn', 'dropout_free', 'byte_pool'):
    c = importlib.import_module(f'configs.{name}').get_config('tiny')
    assert c.train.weight_decay_params == 'ndim2', name
  assert config_lib.base_config().train.weight_decay_params == 'matrices'
