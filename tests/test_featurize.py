"""TokenFeaturizer: document windows, scoring pairs, and the featurizer factory."""

import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.data import featurize
from stlm.models import factory

GPT2 = tokenizers.GPT2Tokenizer()
BYTES = tokenizers.ByteTokenizer()


@pytest.mark.parametrize('max_len', [1, 3, 4, 7, 64])
def test_document_windows_cover_every_target_once(max_len):
  text = 'Hello world, this is a test of windows.\n\nSecond paragraph 中文 😀.'
  f = featurize.TokenFeaturizer(GPT2, max_len)
  ids = GPT2.encode(text)
  doc = [GPT2.eot_id] + ids + [GPT2.eot_id]
  examples = f.document(text)
  assert len(examples) == -(-(len(doc) - 1) // max_len)
  targets = np.concatenate([e['targets'] for e in examples])
  np.testing.assert_array_equal(targets, doc[1:])
  for i, e in enumerate(examples):
    n = len(e['targets'])
    assert 1 <= n <= max_len
    assert set(e) == {'inputs', 'targets', 'loss_mask', 'target_bytes'}
    assert e['inputs'].dtype == np.int32 and e['targets'].dtype == np.int32
    assert e['loss_mask'].dtype == np.float32 and e['target_bytes'].dtype == np.int32
    np.testing.assert_array_equal(e['inputs'][1:], e['targets'][:-1])
    np.testing.assert_array_equal(e['inputs'], doc[i * max_len:i * max_len + n])
    np.testing.assert_array_equal(e['loss_mask'], np.ones(n))
    if i:  # overlap by one token: this window's first input is the last target before
      assert e['inputs'][0] == examples[i - 1]['targets'][-1]
  assert examples[0]['inputs'][0] == GPT2.eot_id
  assert examples[-1]['targets'][-1] == GPT2.eot_id


def test_target_bytes_sum_to_text_bytes():
  text = 'naïve café — 中文 😀 e\u0301'
  for tok in (GPT2, BYTES):
    examples = featurize.TokenFeaturizer(tok, 5).document(text)
    tb = np.concatenate([e['target_bytes'] for e in examples])
    assert tb.sum() == len(text.encode('utf-8'))
    assert tb[-1] == 0  # the closing end-of-text has no bytes
    targets = np.concatenate([e['targets'] for e in examples])
    assert all(tb[j] == len(tok.token_bytes(int(t))) for j, t in enumerate(targets))


def test_empty_document_has_no_examples():
  assert featurize.TokenFeaturizer(GPT2, 8).document('') == []


def test_pair_like_lm_eval_harness():
  """No end-of-text before a non-empty context (the harness's prefix token only for '')."""
  f = featurize.TokenFeaturizer(GPT2, 4)  # pair() is never windowed, whatever max_len is
  context, continuation = 'The capital of France is', ' Paris, of course'
  example, mask = f.pair(context, continuation)
  ctx, cont = GPT2.encode(context), GPT2.encode(continuation)
  np.testing.assert_array_equal(example['inputs'], ctx + cont[:-1])
  np.testing.assert_array_equal(example['targets'], ctx[1:] + cont)
  assert mask.dtype == bool and mask.sum() == len(cont)
  np.testing.assert_array_equal(example['targets'][mask], cont)
  assert not mask[:len(ctx) - 1].any()
  np.testing.assert_array_equal(example['loss_mask'], np.ones(len(ctx) + len(cont) - 1))


def test_pair_always_prefix_eot_keeps_the_old_convention():
  f = featurize.TokenFeaturizer(GPT2, 4)
  context, continuation = 'The capital of France is', ' Paris, of course'
  example, mask = f.pair(context, continuation, always_prefix_eot=True)
  ctx, cont = GPT2.encode(context), GPT2.encode(continuation)
  np.testing.assert_array_equal(example['inputs'], [GPT2.eot_id] + ctx + cont[:-1])
  np.testing.assert_array_equal(example['targets'], ctx + cont)
  np.testing.assert_array_equal(example['targets'][mask], cont)
  assert not mask[:len(ctx)].any()


def test_pair_moves_trailing_space_to_continuation():
  f = featurize.TokenFeaturizer(GPT2, 512)
  a, mask_a = f.pair('The answer is ', 'yes')
  b, mask_b = f.pair('The answer is', ' yes')
  np.testing.assert_array_equal(a['targets'], b['targets'])
  np.testing.assert_array_equal(mask_a, mask_b)
  np.testing.assert_array_equal(a['targets'][mask_a], GPT2.encode(' yes'))


def test_pair_with_empty_context_scores_from_eot():
  example, mask = featurize.TokenFeaturizer(BYTES, 8).pair('', 'ab')
  np.testing.assert_array_equal(example['inputs'], [256, 97])
  np.testing.assert_array_equal(example['targets'], [97, 98])
  assert mask.all()


def test_make_featurizer():
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  f = factory.make_featurizer(c, BYTES)
  assert isinstance(f, featurize.TokenFeaturizer) and f.max_len == c.model.max_len
  c.model.kind = 'mystery'
  with pytest.raises(ValueError, match='model.kind'):
    factory.make_featurizer(c, BYTES)


def test_make_featurizer_byte_pool():
  chunking = pytest.importorskip('stlm.data.chunking')
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.kind = 'byte_pool'
  f = factory.make_featurizer(c, GPT2)
  assert isinstance(f, chunking.ChunkFeaturizer)
