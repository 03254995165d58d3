"""Tests for stlm/models/encoder.py and stlm/data/mlm.py: masking, loss, attention direction."""

import functools

import jax
import numpy as np
import pytest

from configs import encoder as encoder_config
from stlm import tokenizers
from stlm.data import mlm
from stlm.models import factory
from stlm.models import kinds
from stlm.train import step as step_lib

T = 12


def _cfg(kind='encoder'):
  c = encoder_config.get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=4, ffn_dim=64,
                 max_len=16, vocab_size=257)
  c.model.kind = kind
  c.tokenizer.kind = 'bytes'
  return c


@functools.lru_cache(maxsize=None)
def _model(kind):
  cfg = _cfg(kind).model
  k = kinds.get_kind(kind)
  model = k.build(cfg)
  params = model.init(jax.random.key(0), k.dummy_batch(cfg, 1, T))['params']
  logits = jax.jit(lambda p, x, s, q: model.apply({'params': p}, x, s, q, method='logits'))
  return model, params, logits


def _featurizer(**kw):
  return mlm.MLMFeaturizer(tokenizers.ByteTokenizer(), 128, mask_id=257, **kw)


def test_masking_statistics():
  f = _featurizer()
  text = ''.join(chr(97 + i % 26) for i in range(40000))   # 40k single-byte tokens
  exs = f.document(text)
  chosen = np.concatenate([e['loss_mask'] for e in exs]) > 0
  inputs = np.concatenate([e['inputs'] for e in exs])
  targets = np.concatenate([e['targets'] for e in exs])
  maskable = targets != 256
  assert not chosen[~maskable].any()                        # [eot] boundaries never chosen
  assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
  sel_in, sel_tg = inputs[chosen], targets[chosen]
  frac_mask = np.mean(sel_in == 257)
  frac_keep = np.mean(sel_in == sel_tg)
  assert abs(frac_mask - 0.8) < 0.02
  # Kept = the 10% "keep" share plus random draws that hit the original token (1/257).
  assert abs(frac_keep - 0.1 - 0.1 / 257) < 0.015
  assert abs(1 - frac_mask - frac_keep - 0.1) < 0.015      # random replacements
  np.testing.assert_array_equal(inputs[~chosen], targets[~chosen])   # the rest untouched
  # Deterministic: the same document masks the same way.
  again = f.document(text)
  np.testing.assert_array_equal(again[3]['inputs'], exs[3]['inputs'])


def test_masking_probabilities_are_configurable():
  f = _featurizer(mask_rate=0.3, mask_prob=0.5, random_prob=0.0)
  exs = f.document('x' * 20000)
  chosen = np.concatenate([e['loss_mask'] for e in exs]) > 0
  inputs = np.concatenate([e['inputs'] for e in exs])
  assert abs(chosen.mean() - 0.3) < 0.01
  assert abs(np.mean(inputs[chosen] == 257) - 0.5) < 0.03
  with pytest.raises(ValueError, match='random_prob'):
    _featurizer(mask_prob=0.8, random_prob=0.3)


def test_registered_featurizer_and_kind():
  c = _cfg()
  f = factory.make_featurizer(c, tokenizers.ByteTokenizer())
  assert isinstance(f, mlm.MLMFeaturizer) and f.mask_id == 257
  k = kinds.get_kind('encoder')
  assert k.reports_bits_per_byte is False and k.causal is False
  assert kinds.get_kind('baseline').reports_bits_per_byte is True


@pytest.mark.slow
def test_unchosen_positions_carry_no_loss():
  model, params, _ = _model('encoder')
  ex = _featurizer().mask(np.arange(97, 97 + T, dtype=np.int32), np.random.default_rng(1))
  batch = {k: v[None] for k, v in ex.items()}
  batch.update(segment_ids=np.ones((1, T), np.int32),
               positions=np.arange(T, dtype=np.int32)[None])
  sums = step_lib.loss_sums(model, params, batch)
  # Changing targets where loss_mask is 0 changes nothing; at a chosen position it does.
  other = dict(batch, targets=np.where(batch['loss_mask'] > 0, batch['targets'], 5))
  np.testing.assert_allclose(step_lib.loss_sums(model, params, other)['nll'], sums['nll'],
                             rtol=1e-6)
  first = int(np.flatnonzero(batch['loss_mask'][0])[0])
  moved = batch['targets'].copy()
  moved[0, first] = (moved[0, first] + 1) % 256
  assert float(step_lib.loss_sums(model, params, dict(batch, targets=moved))['nll']) != \
      pytest.approx(float(sums['nll']), rel=1e-6)
  assert float(sums['targets']) == batch['loss_mask'].sum()
  acc = float(sums['stats']['accuracy'])
  assert 0 <= acc <= batch['loss_mask'].sum()


@pytest.mark.parametrize('kind,sees_future', [
    ('encoder', True), pytest.param('baseline', False, marks=pytest.mark.slow)])
def test_attention_direction(kind, sees_future):
  _, params, logits = _model(kind)
  x = np.arange(10, 10 + T, dtype=np.int32)[None]
  seg = np.ones((1, T), np.int32)
  pos = np.arange(T, dtype=np.int32)[None]
  y0 = np.asarray(logits(params, x, seg, pos))
  x2 = x.copy()
  x2[0, -1] = 200                                # change only the LAST token
  y1 = np.asarray(logits(params, x2, seg, pos))
  earlier_changed = np.abs(y1[0, :-1] - y0[0, :-1]).max() > 1e-5
  assert earlier_changed == sees_future
