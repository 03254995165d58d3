"""Pause tokens: insertion never changes the accounting; the model reads pauses; scoring."""

import flax.linen as nn
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.data import pauses
from stlm.eval import scorer as scorer_lib
from stlm.models import decoding
from stlm.models import factory
from stlm.ids import PAUSE_ID
from tests.param_fill import fill_like

GPT2 = tokenizers.GPT2Tokenizer()
TEXT = 'Once upon a time, a naïve café owner found 中文 letters and 😀 in the snow.'
KINDS = ('baseline', 'byte_pool')


def config(kind, **pause):
  c = config_lib.base_config()
  c.model.update(dict(kind=kind, num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2,
                      ffn_dim=48, max_len=16, dropout=0.0, vocab_size=GPT2.vocab_size))
  c.model.byte_pool.update(dict(byte_dim=16, encoder_layers=1, decoder_layers=1,
                                encoder_heads=2, decoder_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, max_bytes_per_chunk=4))
  c.model.update(pause)
  return c


def is_pause(inputs):
  return (inputs if inputs.ndim == 1 else inputs[:, 0]) == PAUSE_ID


def accounting(examples):
  """(targets, target bytes, count) of real targets, and the inputs that are not pauses."""
  full = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}
  real = full['loss_mask'] > 0
  return (full['targets'][real], full['target_bytes'][real], int(real.sum()),
          full['inputs'][~is_pause(full['inputs'])])


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('every,count', [(1, 1), (3, 2), (5, 1)])
def test_pauses_never_change_the_targets_or_their_bytes(kind, every, count):
  plain = factory.make_featurizer(config(kind), GPT2)
  paused = factory.make_featurizer(config(kind, pause_every=every, pause_count=count), GPT2)
  assert isinstance(paused, pauses.PauseFeaturizer)
  want, got = accounting(plain.document(TEXT)), accounting(paused.document(TEXT))
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
  examples = paused.document(TEXT)
  assert all(len(e['targets']) <= 16 for e in examples)
  n_pause = sum(is_pause(e['inputs']).sum() for e in examples)
  assert n_pause == count * (want[2] // every)
  # A pause predicts only when it is the last of its group: never from a plain pause input.
  full = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}
  nxt_is_pause = np.append(is_pause(full['inputs'])[1:], False)
  assert not (full['loss_mask'][nxt_is_pause] > 0).any()


@pytest.mark.parametrize('kind', KINDS)
def test_pair_pauses_keep_the_continuation_and_its_bytes(kind):
  plain = factory.make_featurizer(config(kind), GPT2)
  paused = factory.make_featurizer(
      config(kind, pause_every=4, pause_before_continuation=3), GPT2)
  ex0, m0 = plain.pair('The cat sat on the', ' mat, happily.')
  ex1, m1 = paused.pair('The cat sat on the', ' mat, happily.')
  np.testing.assert_array_equal(ex1['targets'][m1], ex0['targets'][m0])
  np.testing.assert_array_equal(ex1['target_bytes'][m1], ex0['target_bytes'][m0])
  assert ex1['loss_mask'].sum() == ex0['loss_mask'].sum()
  first = int(np.flatnonzero(m1)[0])
  # The first continuation target is predicted from the last of >= 3 pauses.
  assert is_pause(ex1['inputs'][first - 2:first + 1]).all()


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_model_reads_pauses_and_scores_the_same_bytes(kind):
  c = config(kind, pause_every=3, pause_before_continuation=2)
  model = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model, c.model)))
  assert params['pause_embedding'].shape == (32,)
  feat = factory.make_featurizer(c, GPT2)
  scorer = scorer_lib.Scorer(model, params, feat, max_len=16, batch_size=4, min_bucket=16)
  plain = scorer_lib.Scorer(model, params, factory.make_featurizer(config(kind), GPT2),
                            max_len=16, batch_size=4, min_bucket=16)
  reqs = [('The cat sat on the', ' mat.'), ('Once upon', ' a time, a fox 😀.')]
  got, want = scorer.loglikelihood(reqs), plain.loglikelihood(reqs)
  for g, w in zip(got, want):
    assert (g.bytes, g.chars, g.tokens) == (w.bytes, w.chars, w.tokens)
    assert np.isfinite(g.logprob) and g.logprob != w.logprob  # pauses do change the model
  (doc,), (doc0,) = scorer.loglikelihood_rolling([TEXT]), plain.loglikelihood_rolling([TEXT])
  assert (doc.bytes, doc.tokens) == (doc0.bytes, doc0.tokens)
  # The pause vector is what a pause position feeds the core.
  moved = dict(params, pause_embedding=params['pause_embedding'] + 1.0)
  scorer.params = moved
  assert scorer.loglikelihood(reqs[:1])[0].logprob != got[0].logprob


@pytest.mark.slow
def test_generation_places_pauses_where_the_featurizer_does():
  """Cached generation with pauses predicts each token from the same position as training."""
  c = config('baseline', pause_every=3, pause_count=2, vocab_size=257, max_len=32)
  model = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model, c.model)))
  ids = np.random.default_rng(0).integers(0, 257, 12).astype(np.int32)
  example = dict(inputs=ids, targets=np.roll(ids, -1), loss_mask=np.ones(12, np.float32),
                 target_bytes=np.ones(12, np.int32))
  paused, _ = pauses.insert_pauses(example, {i: 2 for i in range(2, 12, 3)})
  n = len(paused['inputs'])
  seg, pos = np.ones((1, n), np.int32), np.arange(n, dtype=np.int32)[None]
  full = model.apply({'params': params}, paused['inputs'][None], seg, pos, method='logits')
  predicting = np.flatnonzero(paused['loss_mask'] > 0)  # one per real input, in order
  ctx = decoding.token_context(model, params, c.model)
  outs = [ctx.prefill(list(ids[:4]))] + [ctx.feed(int(t)) for t in ids[4:]]
  np.testing.assert_allclose(np.stack(outs), full[0, predicting[3:]], rtol=1e-4, atol=1e-4)
  assert ctx.n_cached == n and ctx.layers_per_unit == 1.0
