"""LayerSkip (layer dropout, early exit) and mixture of depths, on both model kinds."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stlm import config as config_lib
from stlm.config import validate as config_validate
from stlm.models import depth
from stlm.models import factory
from stlm.models import layers
from stlm.models import transformer
from stlm.train import state as state_lib
from stlm.train import step as step_lib
from tests.param_fill import fill_like

B, T, V = 2, 12, 61
KINDS = ('baseline', 'byte_pool')


def model_cfg(kind, **overrides):
  m = config_lib.base_config().model
  m.update(dict(kind=kind, num_layers=3, hidden_dim=32, num_heads=4, num_kv_heads=2,
                ffn_dim=48, max_len=16, dropout=0.0, vocab_size=V))
  m.byte_pool.update(dict(byte_dim=16, encoder_layers=1, decoder_layers=1, encoder_heads=2,
                          decoder_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_bytes_per_chunk=4))
  m.update(overrides)
  return m


def make_batch(kind, seed=0, seg=None):
  rng = np.random.default_rng(seed)
  if kind == 'baseline':
    inputs = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
  else:  # chunk rows: 1-3 bytes then PAD; targets end with END_OF_CHUNK
    n = rng.integers(1, 4, (B, T))
    slots = np.arange(5)
    inputs = np.where(slots < n[..., None], rng.integers(3, 200, (B, T, 5)), 0)
    targets = np.where(slots < n[..., None], rng.integers(3, 200, (B, T, 5)), 0)
    targets = np.where(slots == n[..., None], 1, targets)
  seg = np.ones((B, T), np.int32) if seg is None else seg
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32),
              segment_ids=seg, positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
              loss_mask=(seg > 0).astype(np.float32),
              target_bytes=np.full((B, T), 2, np.int32))


@functools.lru_cache(maxsize=None)
def setup(kind, **overrides):
  """(model, params, jitted apply(params, batch, train, rng)) per config."""
  cfg = model_cfg(kind, **overrides)
  model = factory.build_model(cfg)
  params = fill_like(nn.unbox(factory.abstract_params(model, cfg)))

  @functools.partial(jax.jit, static_argnums=2)
  def apply(params, batch, train, rng):
    return model.apply({'params': params}, batch, deterministic=not train,
                       rngs={'dropout': rng})
  return model, params, apply


def run(kind, batch, train=False, params=None, **overrides):
  _, p, apply = setup(kind, **overrides)
  return jax.device_get(apply(p if params is None else params, batch, train,
                              jax.random.PRNGKey(1)))


@pytest.mark.slow
def test_default_forward_is_the_plain_block_stack():
  """The default core is embed -> blocks -> final norm -> tied head: nothing added."""
  model, params, _ = setup('baseline')
  cfg = model_cfg('baseline')
  batch = make_batch('baseline')
  tp = params['transformer']
  assert set(tp) == {f'block_{i}' for i in range(3)} | {'final_norm'}
  assert 'pause_embedding' not in params

  @jax.jit
  def reference(params, batch):
    x = params['embed']['embedding'][batch['inputs']]
    for i in range(3):
      x = transformer.Block(cfg).apply({'params': tp[f'block_{i}']}, x, batch['segment_ids'],
                                       batch['positions'], deterministic=True)
    y = layers.Norm(cfg).apply({'params': tp['final_norm']}, x)
    logp = jax.nn.log_softmax(y @ params['embed']['embedding'].T)
    return jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  want = reference(params, batch)
  got = run('baseline', batch)
  np.testing.assert_allclose(got['logprobs'], want, rtol=1e-5, atol=1e-5)
  assert 'stats' not in got and 'extra_nll' not in got


@pytest.mark.slow
def test_layer_drop_rates_rise_linearly_and_rate_zero_is_the_full_model():
  assert depth.layer_drop_rates(model_cfg('baseline', layer_drop_max=0.4)) == (0.0, 0.2, 0.4)
  batch = make_batch('baseline')
  full = run('baseline', batch, train=True)
  zero = run('baseline', batch, train=True, layer_drop_max=0.0, layer_drop_per='batch')
  np.testing.assert_array_equal(zero['logprobs'], full['logprobs'])
  # A positive rate changes training outputs.
  dropped = run('baseline', batch, train=True, layer_drop_max=0.9)
  assert not np.array_equal(dropped['logprobs'], full['logprobs'])


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_early_exit_threshold_zero_is_the_full_model_and_exits_cost_nats(kind):
  batch = make_batch(kind)
  full = run(kind, batch)
  ee = dict(early_exit_layers='1,2', early_exit_weights='0.5,0.25')
  out = run(kind, batch, **ee)
  # Exits add no parameters (the head is the model's own) and leave the outputs alone.
  assert factory.count_params(setup(kind, **ee)[1]) == factory.count_params(setup(kind)[1])
  np.testing.assert_array_equal(out['logprobs'], full['logprobs'])
  np.testing.assert_array_equal(out['greedy'], full['greedy'])
  n = batch['loss_mask'].sum()
  assert out['stats']['layers_used'] == 3 * n
  nll1, nll2 = out['stats']['exit1_nll'], out['stats']['exit2_nll']
  assert nll1 > 0 and nll2 > 0
  np.testing.assert_allclose(out['extra_nll'], 0.5 * nll1 + 0.25 * nll2, rtol=1e-6)
  # A threshold every head clears exits everything at layer 1, with layer 1's scores.
  low = run(kind, batch, early_exit_threshold=1e-9, **ee)
  assert low['stats']['layers_used'] == n
  np.testing.assert_allclose(-low['logprobs'].sum(), nll1, rtol=1e-5)


@pytest.mark.slow
def test_early_exit_losses_and_mod_fractions_appear_in_train_metrics():
  cfg = model_cfg('baseline', num_layers=2, early_exit_layers='1', early_exit_weights='0.5',
                  layer_drop_max=0.2, mod_capacity=0.5)
  model = factory.build_model(cfg)
  params = fill_like(nn.unbox(factory.abstract_params(model, cfg)))
  tx = optax.sgd(0.1)
  state = state_lib.TrainState(step=np.zeros((), np.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  batches = jax.tree.map(lambda x: x[None], make_batch('baseline'))
  _, metrics = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))(
      state, batches)
  metrics = jax.device_get(metrics)
  assert metrics['exit1_nll'] > 0 and metrics['extra_loss'] > 0
  assert metrics['layers_used'] == 2.0
  # Training routes exactly the top half of every row through block_1.
  assert metrics['mod_frac_block1'] == 0.5
  assert np.isfinite(metrics['loss'])


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_mixture_of_depths_is_causal_in_inference(kind):
  mod = dict(mod_capacity=0.5, mod_every=1)  # every block routed
  seg = np.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], np.int32)
  batch = make_batch(kind, seg=seg)
  base = run(kind, batch, **mod)
  frac = base['stats']['mod_frac_block0'] / batch['loss_mask'].sum()
  assert 0.0 < frac < 1.0  # the predictor routes some tokens and skips others
  for t in (2, 6, 9):
    other = make_batch(kind, seed=7)
    pert = {k: v.copy() for k, v in batch.items()}
    pert['inputs'][:, t + 1:] = other['inputs'][:, t + 1:]
    out = run(kind, pert, **mod)
    np.testing.assert_array_equal(out['logprobs'][:, :t + 1], base['logprobs'][:, :t + 1])


@pytest.mark.slow
def test_mixture_of_depths_decode_cache_matches_the_full_forward():
  """Generation path: token-by-token decoding with MoD routing equals one full forward."""
  model, params, _ = setup('baseline', mod_capacity=0.5)
  batch = make_batch('baseline')
  ids, seg, pos = batch['inputs'][:1], batch['segment_ids'][:1], batch['positions'][:1]
  full = jax.jit(lambda p: model.apply({'params': p}, ids, seg, pos, method='logits'))(params)
  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids[:, :1], seg[:, :1],
                                            pos[:, :1], decode=True, method='logits'))['cache']
  cache = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), cache)

  @jax.jit
  def step(cache, t0, t1):
    out, mut = model.apply({'params': params, 'cache': cache}, t0, seg[:, :t1.shape[1]],
                           t1, decode=True, method='logits', mutable=['cache'])
    return out, mut['cache']
  outs = []
  for t in range(0, T, 4):  # blocks of 4 positions: cached prefix + new ones
    out, cache = step(cache, ids[:, t:t + 4], pos[:, t:t + 4])
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_depth_config_errors_name_the_key():
  c = config_lib.base_config()
  config_validate.validate(c)
  for key, value, needle in [('early_exit_layers', '8', 'early_exit_layers'),
                             ('early_exit_layers', 'a', 'early_exit_layers'),
                             ('early_exit_weights', '1,2', 'early_exit_weights'),
                             ('mod_capacity', 1.5, 'mod_capacity'),
                             ('layer_drop_max', 1.0, 'layer_drop_max'),
                             ('layer_drop_per', 'row', 'layer_drop_per'),
                             ('pause_count', 0, 'pause_count')]:
    bad = config_lib.base_config()
    bad.model[key] = value
    if key == 'early_exit_weights':
      bad.model.early_exit_layers = '1'
    with pytest.raises(config_validate.ConfigError, match=needle):
      config_validate.validate(bad)


@pytest.mark.slow
def test_scorer_reports_layers_used():
  from stlm.data.featurize import TokenFeaturizer  # pylint: disable=g-import-not-at-top
  from stlm.eval import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  from stlm.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top
  feat = TokenFeaturizer(ByteTokenizer(), 16)
  reqs = [('The cat sat on the', ' mat.'), ('Once', ' upon a time.')]
  results = {}
  for threshold in (0.0, 1e-9):
    cfg = model_cfg('baseline', vocab_size=257, early_exit_layers='1',
                    early_exit_threshold=threshold)
    model = factory.build_model(cfg)
    params = fill_like(nn.unbox(factory.abstract_params(model, cfg)))
    scorer = scorer_lib.Scorer(model, params, feat, batch_size=2)
    results[threshold] = [r.logprob for r in scorer.loglikelihood(reqs)]
    results[threshold, 'layers'] = scorer.stats['model_stats']['layers_used']
  assert results[0.0, 'layers'] == 3.0 and results[1e-9, 'layers'] == 1.0
  assert results[1e-9] != results[0.0]


@pytest.mark.slow
def test_generation_with_early_exit_reports_layers():
  from stlm import generate  # pylint: disable=g-import-not-at-top
  from stlm import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.ByteTokenizer()
  outs = {}
  for threshold in (0.0, 1e-9):
    c = config_lib.base_config()
    c.model = model_cfg('baseline', vocab_size=257, max_len=32, early_exit_layers='1',
                        early_exit_threshold=threshold)
    model = factory.build_model(c.model)
    params = fill_like(nn.unbox(factory.abstract_params(model, c.model)))
    stats = {}
    outs[threshold] = generate.generate(model, params, c, tok, 'Hello', max_bytes=6,
                                        stats=stats)
    outs[threshold, 'layers'] = stats['layers_per_unit']
  assert outs[0.0, 'layers'] == 3.0 and outs[1e-9, 'layers'] == 1.0
  assert len(outs[0.0]) > 0
