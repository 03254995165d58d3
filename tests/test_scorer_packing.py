"""Scorer fast paths: packed rows and position-gathered heads give the plain path's scores."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.data.featurize import TokenFeaturizer
from stlm.eval import zero_shot
from stlm.eval import packing
from stlm.eval import scorer as scorer_lib
from stlm.models import factory
from stlm.models import kinds
from stlm.tokenizers import ByteTokenizer
from tests.param_fill import fill_like

WINDOW = 32
REQUESTS = [('The cat sat on the', ' mat'), ('', ' Colorless green ideas.'), ('', 'a'),
            ('Question: what is 2+2?\nAnswer:', ' 4'), ('Hi', ' there'), ('', ' Ok.'),
            ('A long context ' * 6, ' that gets cut from the left.'),
            ('Short', ' a continuation much longer than the window of thirty-two bytes'),
            ('x', '')]
DOCS = ['Short doc.', 'A document longer than one window of thirty-two bytes, rolled.', 'ab']


@pytest.fixture(scope='module')
def tiny():
  """A random 1-layer baseline over bytes (hidden 32, vocab 257), 32-token window."""
  c = config_lib.base_config()
  c.model.update(vocab_size=257, max_len=WINDOW, num_layers=1, hidden_dim=32, num_heads=4,
                 num_kv_heads=2, ffn_dim=48, dropout=0.0)
  model = factory.build_model(c.model)
  params = factory.init_params(model, c.model, jax.random.PRNGKey(0))
  return c, model, params, TokenFeaturizer(ByteTokenizer(), WINDOW)


_SCORERS = {}


def make(tiny, **kw):
  """One scorer per setting for the whole module (compiled shapes are shared)."""
  key = (id(tiny[1]), tuple(sorted(kw.items())))
  if key not in _SCORERS:
    _, model, params, feat = tiny
    _SCORERS[key] = scorer_lib.Scorer(model, params, feat, batch_size=3, min_bucket=16, **kw)
  return _SCORERS[key]


@pytest.fixture(scope='module')
def plain(tiny):
  s = make(tiny, pack=False, gather=False)
  return s, s.loglikelihood(REQUESTS), s.loglikelihood_rolling(DOCS)


def assert_same(got, want):
  np.testing.assert_allclose([g.logprob for g in got], [w.logprob for w in want],
                             rtol=1e-5, atol=1e-5)
  assert [g.is_greedy for g in got] == [w.is_greedy for w in want]
  assert [g.tokens for g in got] == [w.tokens for w in want]


def test_kind_declares_the_fast_paths(tiny):
  c = tiny[0]
  assert kinds.get_kind('baseline').scoring(c.model) == kinds.Scoring(gather=True, pack=True)
  c2 = c.copy_and_resolve_references()
  c2.model.update(num_layers=2, early_exit_layers='1')
  # Early exits need every position through the exit heads: packing only.
  assert kinds.get_kind('baseline').scoring(c2.model) == kinds.Scoring(gather=False, pack=True)
  s = make(tiny)
  assert (s.pack, s.gather) == (True, True)
  exported = types.SimpleNamespace(model=tiny[1], params=tiny[2], featurizer=tiny[3], config=c)
  assert zero_shot.make_scorer(exported, score_fraction=1.0).score_fraction == 1.0
  with pytest.raises(ValueError, match='score fraction'):
    zero_shot.make_scorer(exported, score_fraction=1.5)


@pytest.mark.parametrize('pack,gather', [(True, True), (True, False), (False, True)])
def test_fast_paths_equal_the_plain_path(tiny, plain, pack, gather):
  _, want, want_docs = plain
  s = make(tiny) if pack and gather else make(tiny, pack=pack, gather=gather)
  got = s.loglikelihood(REQUESTS)
  assert_same(got, want)
  assert got[-1].tokens == 0 and got[-1].logprob == 0.0  # empty continuation
  if pack:
    assert s.stats['rows'] < s.stats['pieces']  # short requests really share rows
  assert_same(s.loglikelihood_rolling(DOCS), want_docs)
  assert s.compile_count <= len(s.buckets)


def test_eot_convention_survives_packing(tiny):
  fast, slow = make(tiny), make(tiny, pack=False, gather=False)
  try:
    fast.always_prefix_eot = slow.always_prefix_eot = True
    got, want = fast.loglikelihood(REQUESTS[:6]), slow.loglikelihood(REQUESTS[:6])
  finally:
    fast.always_prefix_eot = slow.always_prefix_eot = False
  assert_same(got, want)
  assert got[0].tokens == 4  # ' mat': the EOT prefix adds a position, not a target
  assert got[0].logprob != make(tiny).loglikelihood(REQUESTS[:1])[0].logprob


def test_compiles_once_per_bucket_across_calls(tiny):
  s = make(tiny)
  assert s.buckets == (16, 32)
  rng = np.random.default_rng(0)
  reqs = [('x' * int(rng.integers(0, 40)), ' y' * int(rng.integers(1, 12))) for _ in range(40)]
  s.loglikelihood(reqs)
  s.loglikelihood(reqs[:7])
  s.loglikelihood([('', 'z' * 50)])
  s.loglikelihood_rolling(DOCS)
  assert 1 <= s.compile_count <= len(s.buckets)
  assert all(K == packing.budget(T, s.score_fraction)
             for T, K in s.stats['buckets'].items())


@pytest.mark.parametrize('ce_chunk', [pytest.param(0, marks=pytest.mark.slow), 5])
def test_gathered_head_equals_full_head(tiny, ce_chunk):
  c, _, params, _ = tiny
  cfg = c.model.copy_and_resolve_references()
  cfg.ce_chunk = ce_chunk
  model = factory.build_model(cfg)
  batch = {k: jnp.asarray(v) for k, v in kinds.get_kind('baseline').synthetic_batch(
      cfg, np.random.default_rng(1), (2,)).items()}
  full = model.apply({'params': params}, batch)
  idx = jnp.asarray([[0, 3, 31, 7], [5, 5, 0, 30]], jnp.int32)
  part = model.apply({'params': params}, dict(batch, score_idx=idx))
  assert part['logprobs'].shape == (2, 4)
  want = jnp.take_along_axis(full['logprobs'], idx, axis=1)
  np.testing.assert_allclose(part['logprobs'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(part['greedy'], jnp.take_along_axis(full['greedy'], idx, 1))


def test_pack_fills_rows_within_capacity():
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.integers(1, 33, 200)]
  targets = [int(rng.integers(0, min(n, 24) + 1)) for n in lengths]
  rows = packing.pack(lengths, targets, 32, 24)
  assert sorted(i for r in rows for i in r) == list(range(200))
  shapes = lambda rows, ln: sorted((sum(ln[i] for i in r), len(r)) for r in rows)
  back = packing.pack(lengths[::-1], targets[::-1], 32, 24)
  assert shapes(back, lengths[::-1]) == shapes(rows, lengths)  # order does not matter
  assert all(sum(lengths[i] for i in r) <= 32 and sum(targets[i] for i in r) <= 24
             for r in rows)
  assert len(rows) <= 1.15 * sum(lengths) / 32 + 2  # close to the length lower bound
  with pytest.raises(ValueError, match='exceeds a row'):
    packing.pack([33], [1], 32, 32)
  assert packing.budget(16, 0.5) == 8 and packing.budget(32, 1.0) == 32
  assert packing.pick_bucket((8, 16, 32), 10, 9, 0.5) == 32
  mask = np.array([0, 1, 1, 0, 1, 1, 1], bool)
  parts = packing.split(mask, 2)
  assert [list(np.flatnonzero(p)) for p in parts] == [[1, 2], [4, 5], [6]]
  assert packing.split(np.zeros(3, bool), 2) == []
  # Free slots of a bigger bucket's last batch take smaller buckets' rows.
  got = packing.batches({8: [[1], [2]], 16: [[3]], 32: [[4], [5], [6]]}, 2)
  assert got == [(32, [[4], [5]]), (32, [[6], [3]]), (8, [[1], [2]])]
  with pytest.raises(ValueError, match='score fraction'):
    packing.budget(8, 0.0)


@pytest.mark.parametrize('version', ['paper', 'v2'])
def test_byte_pool_keeps_the_plain_path(version):
  gpt2 = tokenizers.GPT2Tokenizer()
  c = config_lib.base_config()
  c.model.update(dict(kind='byte_pool', num_layers=1, hidden_dim=32, num_heads=4,
                      num_kv_heads=2, ffn_dim=48, max_len=16, dropout=0.0,
                      vocab_size=gpt2.vocab_size))
  c.model.byte_pool.update(dict(byte_dim=16, encoder_layers=1, decoder_layers=1,
                                encoder_heads=2, decoder_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, max_bytes_per_chunk=4, version=version))
  model = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model, c.model)))
  feat = factory.make_featurizer(c, gpt2)
  assert kinds.get_kind('byte_pool').scoring(c.model) == kinds.Scoring()
  s = scorer_lib.Scorer(model, params, feat, max_len=16, batch_size=4, min_bucket=16)
  assert (s.pack, s.gather) == (False, False)
  with pytest.raises(ValueError, match='pack=True'):
    scorer_lib.Scorer(model, params, feat, max_len=16, pack=True)
  reqs = [('The cat sat on', ' the mat.'), ('', ' Colorless green ideas.')]
  got = s.loglikelihood(reqs)
  want = [s.loglikelihood([r])[0] for r in reqs]  # alone in its batch: other row mates
  assert_same(got, want)
  assert all(np.isfinite(g.logprob) and g.tokens > 0 for g in got)
  assert all(K is None for _, K in s.compiles_by_shape)  # the full head, never gathered
  assert s.compile_count == 1
