"""Core diagnostics (stlm/experiments/core_diagnostics.py): the core-output hook, the two
transforms, zero cost on a model whose decoder cannot read its core, positive cost on one
whose targets are what it predicts from its core, per-slot sums, the gradient ratio.

One v2 model and one batch shape throughout, so each jitted function compiles once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import ids
from stlm.data import byte_stream
from stlm.experiments import core_diagnostics as cd
from stlm.models import baseline
from stlm.models import factory
from stlm.models.byte_pool import slot_classes
from stlm.models.byte_pool import v2
from stlm.models.byte_pool import v2_kind
from tests import param_fill
from tests import test_byte_pool as tbp
from tests import test_byte_pool_v2 as tv2

T = tv2.T
# Decoder context 'chunk': a symbol sees only its own chunk's earlier symbols, so the model's
# own predictions can be written into the targets slot by slot (`self_labelled`).
OVERRIDES = dict(decoder_context='chunk', ngram_buckets=0)
LN2 = math.log(2.0)


@functools.lru_cache(maxsize=None)
def setup():
  """(model, params, featurizer, texts, batch, valid, jitted (params, batch) -> (out, logits))."""
  cfg = tv2.small_cfg(**OVERRIDES)
  model = factory.build_model(cfg)
  params = param_fill.random_params(model, v2_kind.dummy_batch(cfg, 2, T))
  featurizer = byte_stream.StreamFeaturizer(tv2.GPT2, T, tv2.MAX_BYTES, 48)
  texts = tv2.TEXTS
  (batch, valid), = cd.batches(*cd.layout(model, params, featurizer, texts))
  forward = tbp.jit(lambda p, b: model.apply({'params': p}, b, method='scores'))
  return model, params, featurizer, texts, batch, valid, forward


def ignoring_core(params):
  """The params with the decoder's cross-attention output zeroed: it never reads y."""
  params = jax.tree.map(lambda x: x, params)
  cross = params['byte_decoder']['cross']
  cross['o_kernel'] = jnp.zeros_like(cross['o_kernel'])
  return params


def reading_core(params, scale=4.0):
  """The params with the cross-attention output scaled up: the core dominates the decoder."""
  params = jax.tree.map(lambda x: x, params)
  cross = params['byte_decoder']['cross']
  cross['o_kernel'] = scale * cross['o_kernel']
  return params


def self_labelled(forward, params, batch):
  """The batch with every target byte replaced by the model's most likely byte there, slot by
  slot (each slot sees its chunk's earlier, already replaced, symbols): text the model
  predicts from its core outputs. Chunk lengths, END_OF_CHUNK and end-of-text stay."""
  batch = {k: np.array(v) for k, v in batch.items()}
  slot = np.asarray(v2.slot_index(batch['targets_chunk_start']))
  is_byte = (batch['targets'] >= ids.BYTE_OFFSET) & (batch['targets_segment_ids'] > 0)
  for j in range(tv2.MAX_BYTES):
    logits = np.asarray(forward(params, batch)[1])
    best = logits[..., ids.BYTE_OFFSET:].argmax(-1) + ids.BYTE_OFFSET
    at = is_byte & (slot == j)
    batch['targets'][at] = best[at]
  return batch


def totals(model, params, batch, valid):
  """'<variant>/<class>' and 'symbols/<class>' sums over the batch, float64."""
  out = cd.variant_scores(model, params, batch, valid)
  return {k: float(np.asarray(v, np.float64).sum()) for k, v in out.items()}


def cost_bits_per_byte(sums, variant, nbytes):
  return sum(sums[f'model/{c}'] - sums[f'{variant}/{c}'] for c in slot_classes.CLASSES) \
      / LN2 / nbytes


# ------------------------------------------------------------------ the hook


def _abstract(model, batch):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), batch))['params']


@pytest.mark.parametrize('version', ['v2', 'paper'])
def test_identity_transform_is_the_default_forward(version):
  """The identity hook traces to the very program of the default forward, so its outputs are
  the same bits (and the hook adds no params): checked on the traced program, which needs
  no compilation. The hook sits before the decoder's condition, so one condition covers v2."""
  cfg = tv2.small_cfg() if version == 'v2' else tbp.small_cfg()
  model = factory.build_model(cfg)
  batch = factory.dummy_batch(cfg, 2, T)
  identity = model.clone(core_transform=lambda y, segment_ids: y)
  params = _abstract(model, batch)
  assert jax.tree.structure(_abstract(identity, batch)) == jax.tree.structure(params)
  program = lambda m: str(jax.make_jaxpr(lambda p: m.apply({'params': p}, batch))(params))
  assert program(identity) == program(model)
  zeroed = model.clone(core_transform=lambda y, segment_ids: jnp.zeros_like(y))
  assert program(zeroed) != program(model)   # the hook is on the path


# ------------------------------------------------------------------ the transforms


def test_batch_mean_is_the_mean_over_real_chunk_positions():
  rng = np.random.default_rng(0)
  y = rng.standard_normal((3, 5, 4)).astype(np.float32)
  seg = np.array([[1, 1, 1, 0, 0], [1, 2, 2, 2, 2], [0, 0, 0, 0, 0]], np.int32)
  got = np.asarray(cd.batch_mean(jnp.asarray(y), jnp.asarray(seg)))
  want = y[seg > 0].mean(0)
  np.testing.assert_allclose(got, np.broadcast_to(want, y.shape), rtol=1e-6)


def test_other_row_is_a_derangement_reading_positions_modulo_the_other_rows_length():
  y = np.arange(4 * 5, dtype=np.float32).reshape(4, 5, 1) * np.ones((1, 1, 2), np.float32)
  seg = np.array([[1, 1, 1, 1, 1],    # 5 real chunks
                  [1, 1, 0, 0, 0],    # 2
                  [0, 0, 0, 0, 0],    # padding row: skipped
                  [1, 1, 1, 0, 0]],   # 3
                 np.int32)
  got = np.asarray(cd.other_row(jnp.asarray(y), jnp.asarray(seg)))[..., 0]
  row = lambda r, positions: [y[r, p, 0] for p in positions]
  np.testing.assert_array_equal(got[0], row(1, [0, 1, 0, 1, 0]))   # row 1, mod 2
  np.testing.assert_array_equal(got[1], row(3, [0, 1, 2, 0, 1]))   # row 3, mod 3
  np.testing.assert_array_equal(got[2], y[2, :, 0])                # padding keeps its own
  np.testing.assert_array_equal(got[3], row(0, [0, 1, 2, 3, 4]))   # wraps to row 0


def test_rows_per_batch_never_leaves_a_row_alone():
  assert cd.rows_per_batch(4, 32) == 4
  assert cd.rows_per_batch(33, 32) == 31        # 33 = 31 + 2, not 32 + 1
  assert cd.rows_per_batch(64, 32) == 32
  for rows in range(2, 80):
    size = cd.rows_per_batch(rows, 8)
    assert 2 <= size <= 8 and rows % size != 1
  with pytest.raises(ValueError, match='at least 2'):
    cd.rows_per_batch(1, 32)


# ------------------------------------------------------------------ the diagnostics


@pytest.mark.slow   # compiles the diagnostics and their gradient
def test_no_cost_and_no_encoder_gradient_when_the_decoder_cannot_read_the_core():
  model, params, featurizer, texts, batch, valid, forward = setup()
  params = ignoring_core(params)
  d = cd.diagnose(model, params, featurizer, texts)
  assert d['documents'] == len(texts) and d['windows'] == d['rows_per_batch'] == 4
  assert d['mean_y_cost'] == 0.0 and d['shuffled_y_cost'] == 0.0
  assert d['mean_y_bits_per_byte'] == d['bits_per_byte'] > 1.0
  assert all(v == 0.0 for v in d['mean_y_slot_cost'].values())
  assert d['encoder_grad_norm'] == 0.0 and d['decoder_grad_norm'] > 0.0
  assert d['grad_ratio'] == 0.0
  # The scorer's figure for these documents: the model's own logprobs on the same rows.
  out, _ = forward(params, batch)
  nats = -np.sum(np.where(valid, np.asarray(out['logprobs'], np.float64), 0.0))
  assert d['bytes'] == sum(len(t.encode()) for t in texts)
  assert d['bits_per_byte'] == pytest.approx(nats / LN2 / d['bytes'], rel=1e-6)


def test_slot_classes_add_up_to_the_chunk_scores():
  model, params, _, _, batch, valid, forward = setup()
  sums = totals(model, params, batch, valid)
  out, _ = forward(params, batch)
  masked = lambda a: float(np.sum(np.where(valid, np.asarray(a, np.float64), 0.0)))
  lp = sum(sums[f'model/{c}'] for c in slot_classes.CLASSES)
  assert lp == pytest.approx(masked(out['logprobs']), rel=1e-6)
  symbols = {c: sums[f'symbols/{c}'] for c in slot_classes.CLASSES}
  assert sum(symbols.values()) == masked(out['units'])
  assert symbols['first'] == float(valid.sum())                   # one per chunk
  end_of_text = float(np.sum(valid & (batch['target_bytes'] == 0)))
  assert symbols['end_of_chunk'] == symbols['first'] - end_of_text
  assert symbols['first'] - end_of_text + symbols['later'] == masked(batch['target_bytes'])
  assert all(sums[f'model/{c}'] < 0 for c in slot_classes.CLASSES)


@pytest.mark.slow   # compiles the diagnostics and their gradient
def test_cost_and_encoder_gradient_when_the_targets_come_from_the_core():
  model, params, _, _, batch, valid, forward = setup()
  params = reading_core(params)
  labelled = self_labelled(forward, params, batch)
  sums = totals(model, params, labelled, valid)
  nbytes = float(np.sum(labelled['target_bytes'] * valid))
  mean_cost = cost_bits_per_byte(sums, 'mean_y', nbytes)
  shuffled_cost = cost_bits_per_byte(sums, 'shuffled_y', nbytes)
  assert mean_cost > 0.05 and shuffled_cost > 0.05, (mean_cost, shuffled_cost)
  encoder, decoder = cd.grad_norms(model, params, [(labelled, valid)])
  assert encoder > 0.0 and decoder > 0.0


def test_only_byte_pool_models_are_diagnosed():
  model, *_ = setup()
  assert cd.supported(model)
  other = baseline.BaselineLM(model.cfg)
  assert not cd.supported(other)
  with pytest.raises(ValueError, match='byte-pool model'):
    cd.diagnose(other, {}, None, ['x'])
