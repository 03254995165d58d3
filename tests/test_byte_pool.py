"""BytePoolLM: causality by perturbation, pads inert, loss == slow step-by-step reference."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import byte_pool as byte_pool_config
from stlm import tokenizers
from stlm.data import chunking
from stlm.models import baseline
from stlm.models.byte_pool import paper as byte_pool
from stlm.models.byte_pool import params as byte_pool_params
from stlm.models import factory

T = 12          # positions per row in these tests
MAX_BYTES = 6   # chunk rows are 7 slots wide
# Tests only: cheaper CPU code generation (compiling dominates these tests' run time).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TEXTS = ['Hello wonderful world, 日!', 'Byte pools.', 'Zürich ☃ x']


def small_cfg(**byte_overrides):
  m = byte_pool_config.get_config('tiny').model
  m.byte_pool.version = 'paper'   # this file tests the paper's version (v2: test_byte_pool_v2)
  m.update(num_layers=1, hidden_dim=32, num_heads=2, num_kv_heads=1, ffn_dim=64, max_len=T,
           dropout=0.0)
  m.byte_pool.update(max_bytes_per_chunk=MAX_BYTES, byte_dim=16, encoder_layers=1,
                     encoder_heads=2, encoder_ffn_dim=32, decoder_layers=1, decoder_heads=2,
                     decoder_ffn_dim=32)
  m.byte_pool.update(byte_overrides)
  return m


def pack(featurizer, rows_of_texts, width):
  """Rows of packed documents (segment ids 1, 2, ..., positions restart), zero padded."""
  keys = ('inputs', 'targets', 'loss_mask', 'target_bytes')
  out = {k: np.zeros((len(rows_of_texts), T) + ((width,) if k in keys[:2] else ()),
                     np.float32 if k == 'loss_mask' else np.int32)
         for k in keys + ('segment_ids', 'positions')}
  for r, texts in enumerate(rows_of_texts):
    t = 0
    for seg, text in enumerate(texts, 1):
      (ex,) = featurizer.document(text)
      n = len(ex['inputs'])
      for k in keys:
        v = ex[k]
        out[k][r, t:t + n, ...] = v if k not in keys[:2] else np.pad(
            v, ((0, 0), (0, width - v.shape[1])))
      out['segment_ids'][r, t:t + n] = seg
      out['positions'][r, t:t + n] = np.arange(n)
      t += n
  return out


def fast_init(model, *args, seed=0, **kwargs):
  """Params of the model's shapes drawn with numpy: no compiled initializers (slow on CPU).

  Fan-in scaled normals for kernels, unit normals for tables and queries, ones for norm
  scales, zeros for biases: the scale of the real init, so outputs are not degenerate.
  """
  abstract = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), *args, **kwargs))['params'])
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = path[-1].key
    if name == 'scale':
      return np.ones(s.shape, s.dtype)
    if name.endswith('bias'):
      return np.zeros(s.shape, s.dtype)
    fan_in = math.prod(s.shape[:2]) if name == 'o_kernel' else s.shape[0]
    std = 1 / math.sqrt(fan_in) if name.endswith(('kernel', 'head', 'core')) else 1.0
    return (std * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(make, abstract)


@functools.lru_cache(maxsize=None)
def setup(pooling='mean', decoder='autoregressive'):
  """(cfg, model, params, jitted (params, batch) -> (outputs, logits)) of a small model."""
  cfg = small_cfg(pooling=pooling, decoder=decoder)
  model = byte_pool.BytePoolLM(cfg)
  params = fast_init(model, factory.dummy_batch(cfg, 2, T))
  forward = jit(lambda p, b: model.apply({'params': p}, b, method='scores'))
  return cfg, model, params, forward


@functools.lru_cache(maxsize=None)
def train_step():
  """Jitted adam step of the 'mean' model: (params, opt, batch) -> (params, opt, loss, grads)."""
  _, model, _, _ = setup()
  tx = optax.adam(1e-2)

  @jit
  def step(params, opt, batch):
    def loss_fn(p):
      o = model.apply({'params': p}, batch)
      m = batch['loss_mask']
      return -jnp.sum(o['logprobs'] * m) / jnp.sum(o['units'] * m)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, grads
  return tx, step


@pytest.fixture(scope='module')
def featurizer():
  return chunking.ChunkFeaturizer(tokenizers.GPT2Tokenizer(), T, MAX_BYTES)


@pytest.fixture(scope='module')
def batch(featurizer):
  return pack(featurizer, [[TEXTS[0]], [TEXTS[1], TEXTS[2]]], MAX_BYTES + 1)


def test_byte_ids_match_chunking():
  assert (byte_pool.PAD, byte_pool.END_OF_CHUNK, byte_pool.EOT, byte_pool.BYTE_OFFSET,
          byte_pool.BYTE_VOCAB) == (chunking.PAD, chunking.END_OF_CHUNK, chunking.EOT,
                                    chunking.BYTE_OFFSET, chunking.BYTE_VOCAB)


def test_outputs_and_units(batch):
  _, _, params, forward = setup()
  out, logits = forward(params, batch)
  real = batch['segment_ids'] > 0
  assert out['logprobs'].shape == out['units'].shape == out['greedy'].shape == real.shape
  # units = real bytes + 1 (END_OF_CHUNK, or the lone EOT); 0 on padding positions.
  np.testing.assert_array_equal(out['units'], np.where(real, batch['target_bytes'] + 1, 0))
  assert np.all(np.asarray(out['logprobs'])[real] < 0)
  assert np.all(np.asarray(out['logprobs'])[~real] == 0)
  # The masks make each slot a distribution over exactly the symbols the data can hold.
  p = np.exp(np.asarray(logits, np.float64) - jax.nn.logsumexp(logits, -1)[..., None])
  assert np.all(p[..., byte_pool.PAD] == 0)
  assert np.all(p[..., 0, byte_pool.END_OF_CHUNK] == 0)
  assert np.all(p[..., 1:, byte_pool.EOT] == 0)
  np.testing.assert_allclose(p[..., MAX_BYTES, byte_pool.END_OF_CHUNK], 1.0)


@pytest.mark.slow
@pytest.mark.parametrize('decoder', ['autoregressive', 'parallel'])
def test_causal_across_chunks(batch, decoder):
  _, _, params, forward = setup(decoder=decoder)
  _, logits0 = forward(params, batch)
  k = 4  # change chunk k+1: the input at k+1 and the target at k
  b = {key: np.array(v) for key, v in batch.items()}
  b['inputs'][0, k + 1, :3] = [40, 50, 60]
  b['targets'][0, k, :4] = [40, 50, 60, byte_pool.END_OF_CHUNK]
  out1, logits1 = forward(params, b)
  np.testing.assert_array_equal(logits1[0, :k], logits0[0, :k])
  np.testing.assert_array_equal(logits1[0, k, 0], logits0[0, k, 0])  # slot 0: no target seen
  np.testing.assert_array_equal(logits1[1], logits0[1])  # other rows untouched
  assert not np.allclose(logits1[0, k + 1], logits0[0, k + 1])  # the change is seen later


def test_causal_within_chunk(batch):
  _, _, params, forward = setup()
  _, logits0 = forward(params, batch)
  t, j = 1, 1
  b = {key: np.array(v) for key, v in batch.items()}
  assert b['targets'][0, t, j + 2] != byte_pool.PAD
  b['targets'][0, t, j] = b['targets'][0, t, j] % 200 + 7
  _, logits1 = forward(params, b)
  # Slots 0..j predict up to and including the changed byte: never influenced by it.
  np.testing.assert_array_equal(logits1[0, t, :j + 1], logits0[0, t, :j + 1])
  assert not np.allclose(logits1[0, t, j + 1], logits0[0, t, j + 1])


def test_parallel_decoder_never_sees_targets(batch):
  _, _, params, forward = setup(decoder='parallel')
  out0, logits0 = forward(params, batch)
  b = {key: np.array(v) for key, v in batch.items()}
  b['targets'][0, 1, :2] = [99, 98]
  _, logits1 = forward(params, b)
  np.testing.assert_array_equal(logits1, logits0)
  # Pad slots are left out of the loss: the loss sums real slots only.
  lp = byte_pool.slot_logprobs(logits0, batch['targets'])
  np.testing.assert_allclose(out0['logprobs'], np.asarray(lp).sum(-1), rtol=1e-6)
  assert np.all(np.asarray(lp)[batch['targets'] == byte_pool.PAD] == 0)


@pytest.mark.slow
@pytest.mark.parametrize('pooling', ['mean', 'attention', 'last'])
def test_pad_positions_change_nothing(batch, pooling):
  """Garbage in padding positions (segment 0): same real outputs, same loss, no gradient."""
  _, model, params, forward = setup(pooling=pooling)
  out0, _ = forward(params, batch)
  b = {key: np.array(v) for key, v in batch.items()}
  pad_pos = b['segment_ids'] == 0
  assert pad_pos.any()
  b['inputs'][pad_pos] = np.random.default_rng(0).integers(0, 259, b['inputs'][pad_pos].shape)
  b['targets'][pad_pos] = np.random.default_rng(1).integers(1, 259, b['targets'][pad_pos].shape)
  out1, _ = forward(params, b)
  real = ~pad_pos
  np.testing.assert_allclose(np.asarray(out1['logprobs'])[real],
                             np.asarray(out0['logprobs'])[real], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out1['units'])[real], np.asarray(out0['units'])[real])

  if pooling != 'mean':
    return
  # Pad byte slots never reach the loss: the PAD rows of both byte embeddings get no gradient.
  tx, step = train_step()
  grads = step(params, tx.init(params), batch)[3]
  enc = np.asarray(grads['byte_encoder']['embed']['embedding'])
  dec = np.asarray(grads['byte_decoder']['embed']['embedding'])
  assert np.all(enc[byte_pool.PAD] == 0) and np.any(enc[byte_pool.BYTE_OFFSET:] != 0)
  assert np.all(dec[byte_pool.PAD] == 0) and np.any(dec[byte_pool.BYTE_OFFSET:] != 0)


@pytest.mark.slow
@pytest.mark.parametrize('pooling', ['mean', 'attention', 'last'])
def test_extra_pad_slots_change_nothing(featurizer, pooling):
  """Rows cut at 4 bytes, 5 slots wide or padded to 7: identical log-probabilities."""
  _, model, params, forward = setup(pooling=pooling)
  narrow = chunking.ChunkFeaturizer(featurizer.tokenizer, T, 4)
  b5 = pack(narrow, [[TEXTS[1]], [TEXTS[2]]], 5)
  b7 = pack(narrow, [[TEXTS[1]], [TEXTS[2]]], MAX_BYTES + 1)
  out5 = jit(lambda p, b: model.apply({'params': p}, b))(params, b5)  # 5-slot rows
  out7, _ = forward(params, b7)
  np.testing.assert_allclose(out5['logprobs'], out7['logprobs'], rtol=1e-5, atol=1e-5)


def test_loss_equals_slow_reference(batch):
  """Each byte's log-probability from a model that sees only the prefix chunks and bytes."""
  _, _, params, forward = setup()
  out, _ = forward(params, batch)
  rng = np.random.default_rng(0)
  B, _, C = batch['inputs'].shape
  ref = np.zeros((B, T))
  for r in range(B):
    for t in range(T):
      seg = batch['segment_ids'][r, t]
      if seg == 0:
        continue
      start = int(np.argmax(batch['segment_ids'][r] == seg))
      for j in range(C):
        target = batch['targets'][r, t, j]
        if target == byte_pool.PAD:
          break
        # Only this document's chunks up to t, and target bytes before slot j, are real;
        # everything after is garbage the model must not use.
        b = {k: np.array(v[r:r + 1]) for k, v in batch.items()}
        n = t - start + 1
        for k in ('inputs', 'targets', 'segment_ids', 'positions'):
          b[k] = np.zeros_like(b[k])
          b[k][0, :n] = batch[k][r, start:t + 1]
        b['inputs'][0, n:] = rng.integers(3, 259, b['inputs'][0, n:].shape)
        b['segment_ids'][0, n:] = 7
        b['targets'][0, n - 1, j:] = rng.integers(3, 259, C - j)
        _, logits = forward(params, {k: np.concatenate([v, v]) for k, v in b.items()})
        row = np.asarray(logits[0, n - 1, j], np.float64)
        ref[r, t] += row[target] - np.log(np.sum(np.exp(row - row.max()))) - row.max()
  np.testing.assert_allclose(out['logprobs'], ref, rtol=1e-5, atol=1e-4)
  mask = batch['loss_mask']
  loss = -np.sum(ref * mask) / np.sum((batch['target_bytes'] + 1) * mask)
  bpb = -np.sum(ref * mask) / np.log(2) / np.sum(batch['target_bytes'] * mask)
  got = -np.sum(np.asarray(out['logprobs']) * mask)
  np.testing.assert_allclose(got / np.sum(np.asarray(out['units']) * mask), loss, rtol=1e-5)
  np.testing.assert_allclose(got / np.log(2) / np.sum(batch['target_bytes'] * mask), bpb,
                             rtol=1e-5)


@pytest.mark.slow
def test_training_lowers_loss(batch):
  _, _, params, _ = setup()
  tx, step = train_step()
  opt = tx.init(params)
  losses = []
  for _ in range(40):
    params, opt, loss, _ = step(params, opt, batch)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_param_report_per_preset():
  """Totals within 10% of each preset's name; byte parts >= 90% smaller than embed + head."""
  reports = {}
  for preset, size in (('tiny', None), ('10m', 10e6), ('50m', 50e6), ('100m', 100e6)):
    cfg = byte_pool_config.get_config(preset).model
    cfg.byte_pool.version = 'paper'   # the sizes in configs/byte_pool.py's docstring
    report = byte_pool_params.param_report(factory.abstract_params(factory.build_model(cfg), cfg), cfg)
    print(preset, byte_pool_params.format_param_report(report))
    if size:
      assert abs(report['total'] - size) <= 0.1 * size, (preset, report)
    assert report['byte_total'] <= 0.1 * report['baseline_embed_head'], (preset, report)
    reports[preset] = report
  # The baseline built on the same core has exactly that embedding + head, and the same core.
  base_cfg = byte_pool_config.get_config('10m').model
  base_cfg.byte_pool.version = 'paper'
  base_cfg.kind = 'baseline'
  base = factory.param_breakdown(
      factory.abstract_params(baseline.BaselineLM(base_cfg), base_cfg), base_cfg)
  assert base['embedding'] + base['head'] == reports['10m']['baseline_embed_head']
  assert base['core'] == reports['10m']['core']


def test_bad_rows_raise(batch):
  _, model, params, _ = setup()
  b = dict(batch, inputs=np.zeros((2, T, MAX_BYTES + 3), np.int32),
           targets=np.zeros((2, T, MAX_BYTES + 3), np.int32))
  with pytest.raises(ValueError, match='max_bytes_per_chunk'):
    jax.eval_shape(lambda: model.apply({'params': params}, b))
  with pytest.raises(ValueError, match='B x T x C'):
    jax.eval_shape(lambda: model.apply({'params': params},
                                       dict(batch, inputs=batch['segment_ids'])))
